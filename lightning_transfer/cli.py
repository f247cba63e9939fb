"""The ``lightning-transfer`` command: LightningCLI with any LightningModule and LightningDataModule."""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

__all__ = ["TransferCLI", "build_cli", "main"]


class TransferCLI(LightningCLI):
    """LightningCLI that prints the final validation metrics after ``fit``.

    Modules and data modules are chosen with ``class_path`` (any importable LightningModule /
    LightningDataModule); ``lightning_transfer.TransferClassifier`` and
    ``lightning_transfer.AnimalMNISTDataModule`` are the defaults.
    """

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
        save_config_kwargs={"overwrite": True},
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


def main() -> None:
    """Entry point of ``lightning-transfer fit|validate|test|predict|depth-scan``."""
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "depth-scan":
        depth_scan_main(sys.argv[2:])
    else:
        build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
