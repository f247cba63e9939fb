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


def main() -> None:
    """Entry point of ``lightning-transfer fit|validate|test|predict``."""
    build_cli()


if __name__ == "__main__":  # pragma: no cover
    main()
