"""moco-transfer: pretrain MoCo v2 ResNet encoders and measure them the way the field does."""

__version__ = "0.1.0"
