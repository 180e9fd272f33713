"""parcae: train and study stable looped language models (Prairie et al., arXiv 2604.12946)."""

__version__ = "0.1.0"
