"""EAGAN: SAGAN-style GANs with external attention (Guo et al., 2021, arXiv 2105.02358)."""
from eagan.sampling import load_generator

__version__ = "0.1.0"
__all__ = ["load_generator", "__version__"]
