"""The ``lightning-transfer`` command: LightningCLI with any LightningModule and LightningDataModule."""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["SaveRunConfig", "TransferCLI", "build_cli", "compose_callbacks", "main"]


def _config_paths(args: Sequence[str]) -> list[tuple[int, str]]:
    """``(index of the last argument of the option, path)`` of every ``--config`` file in ``args``."""
    found = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            found.append((i + 1, args[i + 1]))
        elif arg.startswith("--config="):
            found.append((i, arg.split("=", 1)[1]))
    return [(i, p) for i, p in found if Path(p).is_file()]


def _callbacks_of(path: str) -> list[Any] | None:
    config = yaml.safe_load(Path(path).read_text()) or {}
    trainer = config.get("trainer") if isinstance(config, dict) else None
    callbacks = trainer.get("callbacks") if isinstance(trainer, dict) else None
    if callbacks is None:
        return None
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _identity(entry: Any) -> str:
    """A callback entry with its defaults filled in, so that ``{alpha: 0.01}`` and ``{alpha: 0.01, norm: l2}``
    of the same class compare equal."""
    if isinstance(entry, str):
        entry = {"class_path": entry}
    if not isinstance(entry, dict) or "class_path" not in entry:
        return json.dumps(entry, sort_keys=True, default=str)
    args = dict(entry.get("init_args") or {})
    try:
        module, _, name = entry["class_path"].rpartition(".")
        signature = inspect.signature(getattr(importlib.import_module(module), name))
        args = {**{k: p.default for k, p in signature.parameters.items() if p.default is not p.empty}, **args}
    except (ImportError, AttributeError, ValueError, TypeError):
        pass  # jsonargparse reports an unknown class itself
    return json.dumps({"class_path": entry["class_path"], "init_args": args}, sort_keys=True, default=str)


def compose_callbacks(args: Sequence[str]) -> list[str]:
    """Make stacked ``--config`` files add up their ``trainer.callbacks`` instead of replacing them.

    jsonargparse gives a later config's list precedence over an earlier one, so
    ``--config quickstart.yaml --config l2sp.yaml --config freeze_depth.yaml`` would keep only the
    FreezeSchedule while l2sp.yaml's other settings still applied. Here, when two or more config files
    list callbacks, their lists are concatenated in order and passed as one explicit
    ``--trainer.callbacks`` right after the last of them (later ``--trainer.callbacks+=...`` arguments
    still append). The same callback with the same arguments in two files is an error: it would apply
    twice.

    Example::

        >>> compose_callbacks(["fit", "--trainer.max_epochs=3"])
        ['fit', '--trainer.max_epochs=3']
    """
    args = list(args)
    sources = [(i, p, cbs) for i, p in _config_paths(args) if (cbs := _callbacks_of(p)) is not None]
    if len(sources) < 2:
        return args
    merged: list[Any] = []
    seen: dict[str, str] = {}
    for _, path, callbacks in sources:
        for cb in callbacks:
            key = _identity(cb)
            if key in seen:
                raise ValueError(
                    f"Config files {seen[key]} and {path} both add {cb}. Stacked configs add up their "
                    "trainer.callbacks, so it would apply twice: remove it from one of the files."
                )
            merged.append(cb)
            seen[key] = path
    names = ", ".join(f"{Path(p).name}: {len(c)}" for _, p, c in sources)
    rank_zero_info(f"lightning-transfer: trainer.callbacks composed from the stacked configs ({names}).")
    last = sources[-1][0]
    return [*args[: last + 1], f"--trainer.callbacks={json.dumps(merged)}", *args[last + 1:]]


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config into the logger's run folder; never into a folder it could clobber.

    Without a logger, Lightning's ``log_dir`` is ``default_root_dir``, by default the working directory,
    where a ``config.yaml`` may be the user's own file: nothing is saved then (an info line says so).
    With a logger each run has its own versioned folder, so writing there cannot overwrite another run.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            rank_zero_info("lightning-transfer: no logger, so the run's config is not saved (it would land in "
                           f"{trainer.default_root_dir}). Enable a logger to keep it with the run.")
            return
        super().setup(trainer, pl_module, stage)


class TransferCLI(LightningCLI):
    """LightningCLI that composes stacked configs' callbacks and prints the final validation metrics after ``fit``.

    Modules and data modules are chosen with ``class_path`` (any importable LightningModule /
    LightningDataModule); ``lightning_transfer.TransferClassifier`` and
    ``lightning_transfer.AnimalMNISTDataModule`` are the defaults.
    """

    def parse_arguments(self, parser, args) -> None:
        if args is None or isinstance(args, (list, tuple)):
            # Parsed here rather than handed to LightningCLI, which warns whenever it gets ``args`` while
            # sys.argv holds arguments: the composed list IS sys.argv's (or replaces it, for `rank`).
            self.config = parser.parse_args(compose_callbacks(sys.argv[1:] if args is None else args))
            return
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": "lightning_transfer.TransferClassifier"},
                "data": {"class_path": "lightning_transfer.AnimalMNISTDataModule"},
            }
        )

    def after_fit(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val")}
        if metrics and self.trainer.is_global_zero:
            summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"Final validation (epoch {self.trainer.current_epoch}): {summary}", flush=True)


def build_cli(args: list[str] | None = None, run: bool = True) -> TransferCLI:
    """Build (and by default run) the CLI; ``args`` replaces ``sys.argv[1:]`` (tests, notebooks)."""
    return TransferCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},  # safe: SaveRunConfig writes only into versioned run folders
        auto_configure_optimizers=False,
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def depth_scan_main(argv: list[str]) -> None:
    """``lightning-transfer depth-scan``: see :func:`lightning_transfer.scan.depth_scan`."""
    import argparse

    import yaml

    from lightning_transfer.scan import depth_scan

    parser = argparse.ArgumentParser(
        prog="lightning-transfer depth-scan",
        description="Fine-tune once per transfer depth k (first k blocks frozen) from the same start; "
        "pick k on validation. Arguments not listed here go to every LightningCLI fit run.",
    )
    parser.add_argument("--scan-config", help="YAML with any of: config, depths, seeds, per_class, out")
    parser.add_argument("--config", action="append", default=None, help="LightningCLI fit config (repeatable)")
    parser.add_argument("--depths", type=_ints, default=None, help="e.g. 0,2,4 (default: every depth)")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2 (default: 0)")
    parser.add_argument("--per-class", type=_ints, default=None, help="data sizes, e.g. 10,100")
    parser.add_argument("--out", default=None, help="output folder (default: runs/depth_scan)")
    args, extra = parser.parse_known_args(argv)
    settings = {}
    if args.scan_config:
        with open(args.scan_config) as f:
            settings = yaml.safe_load(f) or {}
    configs = args.config or settings.get("config")
    if not configs:
        parser.error("give at least one --config (a LightningCLI fit config), or config: in --scan-config")
    depth_scan(
        configs=[configs] if isinstance(configs, str) else configs,
        depths=args.depths if args.depths is not None else settings.get("depths"),
        seeds=args.seeds or settings.get("seeds", [0]),
        per_class=args.per_class or settings.get("per_class", [None]),
        out_dir=args.out or settings.get("out", "runs/depth_scan"),
        extra_args=extra + list(settings.get("extra_args", [])),
    )


def rank_main(argv: list[str]) -> None:
    """``lightning-transfer rank``: see :func:`lightning_transfer.rank.rank_depths` and ``rank_models``."""
    import argparse

    from lightning_transfer.backbones import build_backbone
    from lightning_transfer.rank import Normalized, rank_depths, rank_models, save_ranking

    parser = argparse.ArgumentParser(
        prog="lightning-transfer rank",
        description="Score each transfer depth of the config's model (and optionally other pre-trained models) "
        "for its data, from features alone, before fine-tuning. Arguments not listed here go to LightningCLI.",
    )
    parser.add_argument("--config", action="append", required=True, help="LightningCLI fit config (repeatable)")
    parser.add_argument("--models", nargs="+", default=[], help="backbone names to rank too (build_backbone names)")
    parser.add_argument("--estimators", default="logme,hscore", help="of logme,hscore (models also get leep,nce)")
    parser.add_argument("--max-batches", type=int, default=None, help="read at most this many batches")
    parser.add_argument("--split", default="train", choices=["train", "val"], help="which loader to score on")
    parser.add_argument("--out", default="runs/rank", help="folder of rank.csv and rank.png (default: runs/rank)")
    args, extra = parser.parse_known_args(argv)
    cli = build_cli([a for c in args.config for a in ("--config", c)] + extra, run=False)
    datamodule = cli.datamodule
    if "augment" in getattr(datamodule, "hparams", {}):
        datamodule.hparams.augment = False  # scores of the images as they are, reproducibly
    estimators = [e for e in args.estimators.split(",") if e]
    depth_rows = rank_depths(cli.model, datamodule, estimators, max_batches=args.max_batches, split=args.split)
    candidates = {}
    for name in args.models:
        net, normalization = build_backbone(name, num_classes=None)  # keeps the source head: LEEP and NCE
        candidates[name] = net if normalization is None else Normalized(net, *normalization)
    model_rows = rank_models(candidates, datamodule, [*estimators, "leep", "nce"], max_batches=args.max_batches,
                             split=args.split) if candidates else []
    print(save_ranking(depth_rows, model_rows, args.out), flush=True)
    print(f"Wrote {Path(args.out) / 'rank.csv'} and {Path(args.out) / 'rank.png'}", flush=True)


def _close_process_group() -> None:
    """End a multi-process run cleanly: Lightning closes only NCCL process groups; a gloo group's threads, still
    running at interpreter exit, can abort it (return code -6) after a successful fit (``configs/fsdp2.yaml``
    on CPU). Every rank waits for the others, then closes the group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    """Entry point of ``lightning-transfer fit|validate|test|predict|depth-scan|rank``."""
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "depth-scan":
        depth_scan_main(sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "rank":
        rank_main(sys.argv[2:])
    else:
        build_cli()
        _close_process_group()


if __name__ == "__main__":  # pragma: no cover
    main()
