"""Image records: where an image's bytes live, its caption, and what a full scan learned about it.

Every source (a folder, a ``metadata.jsonl``, a Hugging Face dataset) is reduced to a list of
:class:`SourceItem`; :func:`scan_items` decodes each once, so a bad file stops the run before
training (or is skipped and counted, when asked), and keeps the size and content hash that
bucketing and the latent cache need.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from lightning_sd.data.images import (
    BadImageError,
    MissingCaptionError,
    decode_image,
    decode_mask,
    mask_path,
)

__all__ = ["DatasetRef", "FileRef", "ImageRecord", "SourceItem", "scan_items"]


@dataclass(frozen=True)
class FileRef:
    """An image file on disk."""

    path: Path

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise BadImageError(f"{self.path}: cannot be read ({err})") from err

    def read_mask(self) -> bytes | None:
        """The bytes of the ``.mask.png`` beside the image, None when there is none."""
        path = mask_path(self.path)
        return FileRef(path).read() if path.is_file() else None


@dataclass(frozen=True)
class DatasetRef:
    """Row ``index`` of a Hugging Face dataset whose image column is cast to ``decode=False``.

    The dataset is memory-mapped Arrow, so holding it here costs nothing and pickles cheaply
    into DataLoader workers.
    """

    dataset: Any  # datasets.Dataset
    column: str
    index: int

    def read(self) -> bytes:
        cell = self.dataset[self.index][self.column]
        if not cell:
            raise BadImageError(f"row {self.index}: column {self.column!r} holds no image")
        if cell.get("bytes"):
            return cell["bytes"]
        return FileRef(Path(cell["path"])).read()

    def read_mask(self) -> None:
        """Dataset rows carry no mask file; a mask comes from the image's alpha channel."""
        return None


ImageRef = FileRef | DatasetRef


@dataclass(frozen=True)
class SourceItem:
    """One image as a source lists it, before it is opened.

    Attributes:
        name: how errors name it: a path, or ``dataset[split] row N (path)``.
        ref: where its bytes are.
        caption: its caption; None when the source has none for it.
        caption_origin: where the caption should have come from, for the missing-caption error.
        problem: why the sample is unusable though its image may be fine (an unreadable
            caption file); raised, or skipped and counted, like a bad image.
    """

    name: str
    ref: ImageRef
    caption: str | None
    caption_origin: str = ""
    problem: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    """An image that decoded: its source, caption, upright size and content hash.

    Attributes:
        name: as in :class:`SourceItem`.
        ref: where its bytes are.
        caption: the caption (or the instance/class prompt).
        size: (height, width) after EXIF orientation.
        digest: SHA-256 of the encoded bytes; keys the latent cache, so an edited file is
            never served stale latents.
    """

    name: str
    ref: ImageRef
    caption: str
    size: tuple[int, int]
    digest: str

    def open(self) -> Image.Image:
        """The decoded, upright RGB image."""
        return decode_image(self.ref.read(), self.name)

    def open_mask(self) -> Image.Image:
        """The loss mask (``lightning_sd.data.images.decode_mask``): mask file, alpha or full."""
        return decode_mask(self.ref.read(), self.ref.read_mask(), self.name)


#: ``check(name, (height, width))`` raises :class:`BadImageError` for an unusable size.
SizeCheck = Callable[[str, tuple[int, int]], None]


def scan_items(
    items: Sequence[SourceItem], check_size: SizeCheck, skip_bad_images: bool, where: str
) -> list[ImageRecord]:
    """Decode every item once; raise on the first bad one, or skip bad ones with one warning.

    Args:
        items: what a source listed.
        check_size: raises for images too small to train on.
        skip_bad_images: skip corrupt, unreadable, too small or uncaptioned images (counted in
            a warning) instead of raising.
        where: the source, for the warning and the "nothing usable" error.

    Raises:
        BadImageError: a bad item (``skip_bad_images`` False) or no usable item at all.
    """
    records: list[ImageRecord] = []
    problems: list[str] = []
    for item in items:
        try:
            records.append(_scan_one(item, check_size))
        except BadImageError as err:
            if not skip_bad_images:
                raise
            problems.append(str(err))
    if problems:
        shown = "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "")
        warnings.warn(
            f"skip_bad_images: skipped {len(problems)} of {len(items)} images in {where}:\n"
            f"  {shown}",
            stacklevel=2,
        )
    if not records:
        raise BadImageError(f"{where}: no usable images ({len(problems)} skipped)")
    empty = [r.name for r in records if not r.caption.strip()]
    if empty:
        warnings.warn(
            f"{len(empty)} of {len(records)} images in {where} have an empty caption and train "
            f"unconditioned, e.g. {empty[0]}",
            stacklevel=2,
        )
    return records


def _scan_one(item: SourceItem, check_size: SizeCheck) -> ImageRecord:
    if item.problem:
        raise BadImageError(item.problem)
    data = item.ref.read()
    image = decode_image(data, item.name)
    if item.caption is None:
        raise MissingCaptionError(f"{item.name}: missing caption (expected {item.caption_origin})")
    size = (image.height, image.width)
    check_size(item.name, size)
    return ImageRecord(item.name, item.ref, item.caption, size, hashlib.sha256(data).hexdigest())
