"""lightning-transfer: fine-tuning research methods as PyTorch Lightning callbacks."""

from lightning_transfer.anatomy import AnatomyError, find_head, list_blocks
from lightning_transfer.callbacks import (
    BSS,
    DTNH,
    L2SP,
    RIFLE,
    SPD,
    CoTuning,
    FeatureMapRegularization,
    FreezeSchedule,
    LiNeS,
    MaxEntropyHeadInit,
    RepresentationSimilarity,
    StochNorm,
    WiSEFT,
)
from lightning_transfer.data import AnimalMNISTDataModule, ArrayDataModule, ImageFolderDataModule
from lightning_transfer.model import TransferClassifier, build_backbone
from lightning_transfer.optim import build_param_groups
from lightning_transfer.rank import block_features, rank_depths, rank_models
from lightning_transfer.scan import depth_scan
from lightning_transfer.soup import greedy_soup, model_stock
from lightning_transfer.text import BBCNewsDataModule, TextClassificationDataModule

__version__ = "0.1.0"

__all__ = [
    "BSS",
    "SPD",
    "DTNH",
    "L2SP",
    "RIFLE",
    "AnatomyError",
    "CoTuning",
    "FeatureMapRegularization",
    "FreezeSchedule",
    "MaxEntropyHeadInit",
    "RepresentationSimilarity",
    "StochNorm",
    "AnimalMNISTDataModule",
    "ArrayDataModule",
    "ImageFolderDataModule",
    "BBCNewsDataModule",
    "TextClassificationDataModule",
    "TransferClassifier",
    "build_backbone",
    "build_param_groups",
    "depth_scan",
    "find_head",
    "list_blocks",
    "WiSEFT",
    "LiNeS",
    "greedy_soup",
    "model_stock",
    "block_features",
    "rank_depths",
    "rank_models",
]
