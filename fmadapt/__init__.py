"""fmadapt: adapt vision foundation models to medical image segmentation."""

__version__ = "0.1.0"
