"""A callback for the DDP subprocess test: each rank writes what it ended with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lightning import Callback

from lightning_sd.callbacks import LoRAExport


class RankReport(Callback):
    """After fit, ``<folder>/rank<N>.json``: adapter digest, steps, whether it exported.

    ``teardown`` runs after every callback's ``on_fit_end`` (where the export happens).
    """

    def __init__(self, folder: str):
        self.folder = folder

    def teardown(self, trainer, pl_module, stage):
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().float().numpy().tobytes())
        export = next(c for c in trainer.callbacks if isinstance(c, LoRAExport))
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "pid": os.getpid(),
            "steps": trainer.global_step,
            "adapters": digest.hexdigest(),
            "tensors": len(pl_module.state_dict()),
            "exported": bool(export.written),
        }
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
