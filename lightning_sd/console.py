"""A console that shows progress, this package's summaries and what a user must act on.

Each filter below silences one message that this package causes on purpose, or that no user
of it can act on, matched narrowly by its text; every other warning still shows. They are
installed once, when ``lightning_sd`` is imported.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_known_noise"]

# (message regex, why it is noise here)
INTENDED_WARNINGS: list[tuple[str, str]] = [
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        "the frozen base (VAE, text encoders, UNet) is in eval mode by design; adapters train",
    ),
    (
        r"The number of training batches \(\d+\) is smaller than the logging interval",
        "runs are step-based: Lightning counts the logging interval in optimizer steps across "
        "epochs, so a DreamBooth set of two batches still logs every N steps (tested)",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        "Lightning 2.6's own pytree helper calls an API torch 2.14 deprecated",
    ),
]

# (logger, message prefix, why)
NOISY_LOG_RECORDS: list[tuple[str, str, str]] = [
    (
        "lightning.pytorch.utilities.rank_zero",
        "💡 Tip",
        "advertisements for Lightning's cloud products (litlogger, litmodels)",
    ),
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward",
        "bitsandbytes tries to download an optional CPU kernel at import; offline it falls "
        "back to its own, and 8-bit AdamW does not use it",
    ),
    (
        "DeepSpeed",
        "Setting accelerator to CPU",
        "accelerate (which diffusers uses to load models) imports DeepSpeed, which says it found "
        "no GPU; Lightning's DeepSpeed strategy says so itself when it is asked for",
    ),
]


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


_installed = False


def quiet_known_noise() -> None:
    """Install the filters above (idempotent)."""
    global _installed
    if _installed:
        return
    for message, _why in INTENDED_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for logger, prefix, _why in NOISY_LOG_RECORDS:
        logging.getLogger(logger).addFilter(_DropPrefix(prefix))
    _installed = True
