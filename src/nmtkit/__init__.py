"""nmtkit: Transformer encoder-decoder translation models in plain PyTorch."""

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config
    from .records import Alternative, Hypothesis, ReferenceScore, ReferenceToken, TokenStep, Translation
    from .translator import Translator

# The public names, imported on first use: `import nmtkit` alone must not load torch, because the `nmtkit` command
# may re-execute itself under another allocator (allocator.py) before doing any work.
_EXPORTS = {
    "Config": "config", "ConfigError": "config", "load_config": "config", "Translator": "translator",
    **{name: "records" for name in ("Alternative", "Hypothesis", "ReferenceScore", "ReferenceToken", "TokenStep", "Translation")},
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nmtkit' has no attribute {name!r}")

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
