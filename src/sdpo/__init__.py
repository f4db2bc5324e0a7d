"""sdpo: Self-Distilled Policy Optimization for language models."""

from sdpo.config import SDPOConfig

__all__ = ["SDPOConfig"]
__version__ = "0.1.0"
