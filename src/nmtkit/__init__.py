"""nmtkit: Transformer encoder-decoder translation models in plain PyTorch."""

__version__ = "0.1.0"
