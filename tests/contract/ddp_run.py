"""One 2-process CPU DDP fit of a registry entry; each rank saves its parameters. Run as a script."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.contract.multiprocess import finish  # noqa: E402
from tests.contract.registry import REGISTRY, Model  # noqa: E402
from tests.helpers import TinyClassifier, quiet_trainer  # noqa: E402

if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    model = TinyClassifier(batch_size=8, **REGISTRY[name].module)
    trainer = quiet_trainer(max_epochs=REGISTRY[name].max_epochs, accelerator="cpu", devices=2, strategy="ddp",
                            callbacks=REGISTRY[name].make(Model()), deterministic=False, **REGISTRY[name].trainer)
    trainer.fit(model)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(state, out / f"rank{trainer.global_rank}.pt")
    finish(trainer)
