"""Training and reference data: datasets on disk to uint8 images in memory (``load_images``) or
to lists of files (``find_image_files``), and the endless, resumable batch sources over them."""
from eagan.data.batches import DeviceBatchSource, LoaderBatchSource, make_batch_source
from eagan.data.datasets import HELD_OUT_SPLITS, SPLITS, find_image_files, load_images
from eagan.data.image_set import ImageFiles, ImageSet

__all__ = ["DeviceBatchSource", "HELD_OUT_SPLITS", "ImageFiles", "ImageSet", "LoaderBatchSource",
           "SPLITS", "find_image_files", "load_images", "make_batch_source"]
