"""EAGAN entry point: python run.py -c CONFIG (--train | --eval | --sample) [options]."""
import sys

from eagan.cli import main

if __name__ == "__main__":
    sys.exit(main())
