"""What a resume must agree on with the checkpoint, and what it may change.

The adapters' kind, rank and alpha must match (said in one sentence, instead of one
``size mismatch`` line per tensor); the learning rates may change (lowering them after a
divergence is the usual fix), and the configured ones then replace the restored ones.

Continuing a finished run, from the ``last.ckpt`` that ``fit`` wrote at ``max_steps``:

"Train N steps, then extend to M" is the most common resume of all. Lightning (2.6) writes
that ``last.ckpt`` in ``on_train_end``, after the fit loop has closed the epoch it stopped in,
even mid-epoch: restored, the run starts a new epoch and keeps the old epoch's batch counters,
so from its second step on it trains on other batches than an uninterrupted run (checked:
10 steps, extended to 12, differ from step 12). A checkpoint written after a training batch
(every N steps, on SIGTERM) has no such problem, so an end-of-fit checkpoint is rewritten,
as it is loaded, into exactly the state a checkpoint after its last batch would hold.

Extending the step count also changes schedules that are a function of the total (cosine,
linear, polynomial decay, the pivotal-token stop step): that is inexact by nature, and said
once at resume.
"""

from __future__ import annotations

import math
from typing import Any

from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sd.adapters import AdapterConfig

__all__ = [
    "apply_configured_learning_rates",
    "check_learning_rates",
    "check_resumable",
    "reopen_last_epoch",
    "schedule_changed_warning",
]

_ADAPTERS = ("adapter", "text_encoder_adapter", "text_encoder_2_adapter")


def check_resumable(checkpoint: dict, module: LightningModule) -> None:
    """The checkpoint's adapters fit this module's: same kind, rank, alpha and shapes."""
    _check_adapters_match(checkpoint.get("hyper_parameters", {}), module.hparams)
    state = checkpoint["state_dict"]
    params = dict(module.named_parameters())
    wrong = [k for k, v in state.items() if k in params and v.shape != params[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{len(wrong)} adapter tensors of the checkpoint have other shapes than this "
            f"model's, e.g. {k}: {tuple(state[k].shape)} vs {tuple(params[k].shape)}: it was "
            "trained with another adapter rank or targets; configure those of the checkpoint"
        )


def apply_configured_learning_rates(module: LightningModule) -> None:
    """A resume restores the checkpoint's learning rates; this run's configured ones win.

    Lowering the rate after a divergence is the usual fix, so a changed rate is applied
    (to the optimizer group and the schedule's base) and said, not silently dropped.
    """
    configured = {g["name"]: g["lr"] for g in module.param_groups()}
    optimizers = module.trainer.optimizers
    schedulers = [c.scheduler for c in module.trainer.lr_scheduler_configs]
    if len(optimizers) != 1 or len(schedulers) != 1:
        return
    optimizer, scheduler = optimizers[0], schedulers[0]
    for i, group in enumerate(optimizer.param_groups):
        new = configured.get(group.get("name"))
        old = group.get("initial_lr", group["lr"])
        if new is None or new == old:
            continue
        group["initial_lr"] = scheduler.base_lrs[i] = new
        lambdas = getattr(scheduler, "lr_lambdas", None)
        group["lr"] = new * (lambdas[i](scheduler.last_epoch) if lambdas else 1.0)
        rank_zero_info(
            f"learning rate of {group['name']}: {old:g} in the checkpoint, {new:g} "
            "configured for this run: using the configured one"
        )


def check_learning_rates(**rates: float | None) -> None:
    """Negative or non-finite rates train away from the data; 0 is allowed (a frozen part)."""
    for name, rate in rates.items():
        if rate is not None and not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {rate}")


def _check_adapters_match(saved: dict, configured) -> None:
    """A resume needs the checkpoint's adapter kind, rank and alpha: say which one differs."""
    for key in _ADAPTERS:
        old, new = saved.get(key), configured.get(key)
        if not old or not new:
            continue
        old, new = AdapterConfig(**old), AdapterConfig(**new)
        diffs = [
            f"{field} {a} in the checkpoint, {b} configured"
            for field, a, b in (
                ("kind", old.kind, new.kind),
                ("rank", old.rank, new.rank),
                ("alpha", old.lora_alpha, new.lora_alpha),
            )
            if a != b
        ]
        if diffs:
            flag = f"--model.{key}." + ("alpha" if diffs[0].startswith("alpha") else "rank")
            raise ValueError(
                f"cannot resume: the checkpoint's {key} differs ({'; '.join(diffs)}). Configure "
                f"the checkpoint's values (e.g. {flag}) or start a new run"
            )


def _settled(progress: dict[str, Any]) -> bool:
    """Every counter of a progress tracker's total agrees: nothing was in flight."""
    total = progress["total"]
    return len({total[k] for k in ("ready", "started", "processed", "completed")}) == 1


def reopen_last_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite an end-of-fit checkpoint's loop state into its after-the-last-batch form.

    Lightning then resumes it as it resumes any mid-run checkpoint: in the same epoch,
    after the same batch, or at the next epoch when that batch was the epoch's last. Returns
    whether the checkpoint was of that shape (other checkpoints are left as they are).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop:
        return False
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    if not (_settled(epochs) and _settled(batches)) or batches["total"]["completed"] == 0:
        return False
    for part in ("total", "current"):
        epochs[part]["processed"] -= 1  # the epoch is started, not yet processed/completed
        epochs[part]["completed"] -= 1
        batches[part]["completed"] -= 1  # the last batch is processed; its end hook pending
    checkpoint["epoch"] -= 1
    return True


def schedule_changed_warning(saved_total: int | None, total: int, schedule: str) -> None:
    """Warn once when a resumed run's step total changes a total-dependent LR schedule."""
    if saved_total is None or saved_total == total or schedule == "constant":
        return
    rank_zero_warn(
        f"resuming a run planned for {saved_total} optimizer steps with {total}: the "
        f"{schedule!r} learning-rate schedule (and any pivotal-token stop step) is a function "
        "of the total, so from here on the learning rates differ from those of a run planned "
        f"for {total} from the start. Use lr_scheduler: constant to extend runs exactly"
    )
