"""The library's callbacks, one per module."""

from lightning_transfer.callbacks.base import GradientRegularizer
from lightning_transfer.callbacks.bss import BSS
from lightning_transfer.callbacks.co_tuning import CoTuning
from lightning_transfer.callbacks.dtnh import DTNH
from lightning_transfer.callbacks.feature_map import FeatureMapRegularization
from lightning_transfer.callbacks.freeze import FreezeSchedule
from lightning_transfer.callbacks.l2sp import L2SP
from lightning_transfer.callbacks.lines import LiNeS
from lightning_transfer.callbacks.mei import MaxEntropyHeadInit
from lightning_transfer.callbacks.rifle import RIFLE
from lightning_transfer.callbacks.similarity import RepresentationSimilarity
from lightning_transfer.callbacks.spd import SPD
from lightning_transfer.callbacks.stoch_norm import StochNorm
from lightning_transfer.callbacks.wise_ft import WiSEFT

__all__ = [
    "BSS",
    "SPD",
    "CoTuning",
    "DTNH",
    "RIFLE",
    "FeatureMapRegularization",
    "FreezeSchedule",
    "GradientRegularizer",
    "L2SP",
    "LiNeS",
    "MaxEntropyHeadInit",
    "RepresentationSimilarity",
    "StochNorm",
    "WiSEFT",
]
