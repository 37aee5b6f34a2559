"""nmtkit: Transformer encoder-decoder translation models in plain PyTorch."""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config
from .records import Alternative, Hypothesis, ReferenceScore, ReferenceToken, TokenStep, Translation
from .translator import Translator

__all__ = [
    "Alternative",
    "Config",
    "ConfigError",
    "Hypothesis",
    "ReferenceScore",
    "ReferenceToken",
    "TokenStep",
    "Translation",
    "Translator",
    "__version__",
    "load_config",
]
