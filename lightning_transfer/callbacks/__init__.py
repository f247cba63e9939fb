"""The library's callbacks, one per module."""

from lightning_transfer.callbacks.base import GradientRegularizer
from lightning_transfer.callbacks.l2sp import L2SP

__all__ = ["L2SP", "GradientRegularizer"]
