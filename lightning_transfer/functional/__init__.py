"""Pure tensor math of the methods (no Lightning): penalties, projections, Fisher, similarity."""

from lightning_transfer.functional.fisher import estimate_fisher, load_fisher, match_fisher, save_fisher
from lightning_transfer.functional.penalties import NORMS, group_by_device_dtype, sp_penalty_and_grad

__all__ = [
    "NORMS",
    "estimate_fisher",
    "group_by_device_dtype",
    "load_fisher",
    "match_fisher",
    "save_fisher",
    "sp_penalty_and_grad",
]
