"""Finding and opening training images, with errors that name the file and the problem."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImageError", "list_images", "open_rgb"]

# Files that live beside images in training folders and are not images themselves.
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".csv", ".npz", ".safetensors"}


class BadImageError(ValueError):
    """An input image that cannot be used; the message names the file and why."""


def list_images(folder: str | Path) -> list[Path]:
    """Every image file in a folder, sorted; caption sidecars and hidden files are ignored.

    Any other file is taken to be an image, so a stray PDF fails loudly in ``open_rgb``
    instead of being dropped in silence.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in SIDECAR_SUFFIXES
    )
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no images")
    return files


def open_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image fully decoded, upright (EXIF orientation applied) and in RGB.

    Transparent images are composited over ``background`` instead of having their alpha dropped,
    which would leave whatever colour the transparent pixels happen to store.
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file must fail here, not in a worker later
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError as err:
        raise BadImageError(f"{path}: not a readable image file ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{path}: corrupt or truncated image ({err})") from err
    return to_rgb(im, background)


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; alpha (RGBA, LA, P with transparency) over a background."""
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip everything above 255 to white.
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")
