"""res_unet: residual and EfficientNet U-Nets for aerial and satellite image segmentation."""

__version__ = "0.1.0"
