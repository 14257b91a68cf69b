"""Where captioned images come from: sidecar ``.txt`` files, an imagefolder, a HF dataset.

Each source lists :class:`SourceItem` s (an image reference and its caption, or None when it
has none); opening, checking and skipping are shared (``records.scan_items``). In YAML a
source is a ``class_path`` with its ``init_args``, like the objective's parts.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning_sd.data.images import list_images
from lightning_sd.data.records import DatasetRef, FileRef, SourceItem

__all__ = ["CaptionSource", "HFDataset", "ImageFolder", "SidecarCaptions"]


class CaptionSource:
    """Base class: ``items()`` lists every image with its caption."""

    def items(self) -> list[SourceItem]:
        raise NotImplementedError

    def describe(self) -> str:
        """How messages name the source."""
        raise NotImplementedError


class SidecarCaptions(CaptionSource):
    """Images in a folder, each captioned by a text file of the same stem (``cat.png`` +
    ``cat.txt``), the kohya / DreamBooth-captions layout.

    Args:
        folder: the image folder.
        extension: the caption files' suffix.
    """

    def __init__(self, folder: str, extension: str = ".txt"):
        self.folder = folder
        self.extension = extension

    def describe(self) -> str:
        return str(self.folder)

    def items(self) -> list[SourceItem]:
        items = []
        for path in list_images(self.folder):
            sidecar = path.with_suffix(self.extension)
            caption, problem = None, None
            if sidecar.is_file():
                try:
                    caption = sidecar.read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as err:  # skippable, like a bad image
                    problem = f"{sidecar}: caption cannot be read ({err})"
            items.append(SourceItem(str(path), FileRef(path), caption, f"in {sidecar}", problem))
        return items


class ImageFolder(CaptionSource):
    """The Hugging Face imagefolder layout: images plus ``metadata.jsonl`` lines such as
    ``{"file_name": "a/cat.png", "text": "a cat"}``.

    Read here rather than through ``datasets`` so that an image without a metadata line, a line
    naming a missing file, or a non-image file is reported instead of skipped in silence.

    Args:
        folder: the dataset folder (images may sit in subfolders).
        caption_column: the metadata key holding the caption.
        metadata: the metadata file name inside ``folder``.
    """

    def __init__(self, folder: str, caption_column: str = "text", metadata: str = "metadata.jsonl"):
        self.folder = folder
        self.caption_column = caption_column
        self.metadata = metadata

    def describe(self) -> str:
        return str(Path(self.folder) / self.metadata)

    def _captions(self) -> dict[Path, str | None]:
        root = Path(self.folder).expanduser()
        meta = root / self.metadata
        if not meta.is_file():
            raise FileNotFoundError(f"{meta} does not exist: an imagefolder needs it for captions")
        captions: dict[Path, str | None] = {}
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = root / row["file_name"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{meta} line {n}: not a JSON object with file_name ({err})"
                ) from err
            if not path.is_file():
                raise FileNotFoundError(f"{meta} line {n} names {path}, which does not exist")
            captions[path.resolve()] = row.get(self.caption_column)
        return captions

    def items(self) -> list[SourceItem]:
        captions = self._captions()
        origin = f"a {self.caption_column!r} entry in {self.describe()}"
        return [
            SourceItem(str(p), FileRef(p), captions.get(p.resolve()), origin)
            for p in list_images(self.folder, recursive=True)
        ]


class HFDataset(CaptionSource):
    """A Hugging Face ``datasets`` dataset: a hub name, a local folder ``load_dataset`` reads
    (imagefolder, parquet, ...), or a folder written by ``save_to_disk``.

    Args:
        path: hub id or local folder.
        split: the split to train on.
        image_column: the column of images (an ``Image`` feature or file paths).
        caption_column: the column of captions.
        revision: hub revision.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
        revision: str | None = None,
    ):
        self.path = path
        self.split = split
        self.image_column = image_column
        self.caption_column = caption_column
        self.revision = revision

    def describe(self) -> str:
        return f"{self.path}[{self.split}]"

    def load(self):
        """The split as a ``datasets.Dataset``."""
        import datasets

        local = Path(self.path).expanduser()
        if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(local))  # save_to_disk output
            if isinstance(ds, datasets.DatasetDict):
                if self.split not in ds:
                    raise KeyError(f"{self.path} has no split {self.split!r}: {list(ds)}")
                ds = ds[self.split]
            return ds
        return datasets.load_dataset(self.path, split=self.split, revision=self.revision)

    def items(self) -> list[SourceItem]:
        import datasets

        ds = self.load()
        for role, column in (("image", self.image_column), ("caption", self.caption_column)):
            if column not in ds.column_names:
                raise KeyError(
                    f"{self.describe()} has no {role} column {column!r}; "
                    f"its columns are {ds.column_names}"
                )
        ds = ds.select_columns([self.image_column, self.caption_column])
        ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        origin = f"in column {self.caption_column!r}"
        items = []
        for i, row in enumerate(ds):
            path = (row[self.image_column] or {}).get("path")
            name = f"{self.describe()} row {i}" + (f" ({path})" if path else "")
            ref = DatasetRef(ds, self.image_column, i)
            items.append(SourceItem(name, ref, row[self.caption_column], origin))
        return items
