"""Pure tensor math of the methods (no Lightning): penalties, projections, Fisher, similarity."""

from lightning_transfer.functional.feature_maps import feature_map_penalty
from lightning_transfer.functional.fisher import estimate_fisher, load_fisher, match_fisher, save_fisher
from lightning_transfer.functional.head_init import output_entropy, reinitialize_, zero_head_
from lightning_transfer.functional.penalties import NORMS, group_by_device_dtype, sp_penalty_and_grad
from lightning_transfer.functional.projection import project_conflicting
from lightning_transfer.functional.similarity import linear_cka, neighbourhood_overlap
from lightning_transfer.functional.transferability import hscore, leep, logme, logme_evidence, nce

__all__ = [
    "NORMS",
    "estimate_fisher",
    "feature_map_penalty",
    "group_by_device_dtype",
    "linear_cka",
    "load_fisher",
    "match_fisher",
    "neighbourhood_overlap",
    "output_entropy",
    "project_conflicting",
    "reinitialize_",
    "save_fisher",
    "sp_penalty_and_grad",
    "zero_head_",
    "hscore",
    "leep",
    "logme",
    "logme_evidence",
    "nce",
]
