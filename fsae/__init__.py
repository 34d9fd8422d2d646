"""fsae: weakly-supervised semantic segmentation with Feature- and Spatial-level Activation Expansion."""

__version__ = "0.1.0"
