"""Finding and opening training images, with errors that name the file and the problem."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BadImageError",
    "MissingCaptionError",
    "decode_image",
    "decode_mask",
    "list_images",
    "mask_path",
    "open_rgb",
]

# Files that live beside images in training folders and are not images themselves.
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".csv", ".npz", ".safetensors"}
#: A loss mask beside its image: ``cat.jpg`` + ``cat.mask.png`` (white trains, black is ignored).
MASK_SUFFIX = ".mask.png"


class BadImageError(ValueError):
    """An input sample that cannot be used; the message names the file and why."""


class MissingCaptionError(BadImageError):
    """An image of a captioned set without its caption; the message names the image."""


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Every image file in a folder, sorted; caption sidecars and hidden files are ignored.

    Any other file is taken to be an image, so a stray PDF fails loudly in ``open_rgb``
    instead of being dropped in silence.

    Args:
        folder: the folder to list.
        recursive: include subfolders (hidden ones excluded), as an imagefolder may have them.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a folder")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    visible = [
        p
        for p in candidates
        if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.suffix.lower() not in SIDECAR_SUFFIXES
        and not p.name.lower().endswith(MASK_SUFFIX)
    ]
    files = sorted(p for p in visible if p.is_file())
    _report_left_out(folder, visible, recursive, len(files))
    if not files:
        raise FileNotFoundError(f"image folder {folder} holds no images")
    return files


def _report_left_out(folder: Path, visible: list[Path], recursive: bool, used: int) -> None:
    """One line counting what a listing leaves out, so nothing is dropped in silence."""
    broken = [p for p in visible if p.is_symlink() and not p.exists()]
    nested = 0
    if not recursive:
        for sub in (p for p in visible if p.is_dir()):
            nested += sum(
                1
                for q in sub.rglob("*")
                if q.is_file()
                and q.suffix.lower() not in SIDECAR_SUFFIXES
                and not any(part.startswith(".") for part in q.relative_to(folder).parts)
            )
    parts = []
    if nested:
        parts.append(f"{nested} files in subfolders (not searched)")
    if broken:
        parts.append(f"{len(broken)} broken symlinks (e.g. {broken[0].name})")
    if parts:
        warnings.warn(f"{folder}: {used} images used; left out: {', '.join(parts)}", stacklevel=3)


def open_rgb(path: str | Path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open an image file fully decoded, upright (EXIF orientation applied) and in RGB.

    Transparent images are composited over ``background`` instead of having their alpha dropped,
    which would leave whatever colour the transparent pixels happen to store.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BadImageError(f"{path}: cannot be read ({err})") from err
    return decode_image(data, str(path), background)


def decode_image(
    data: bytes, name: str, background: tuple[int, int, int] = (255, 255, 255)
) -> Image.Image:
    """Decode encoded image bytes to an upright RGB image; ``name`` goes into error messages."""
    return to_rgb(_decode_upright(data, name), background)


def _decode_upright(data: bytes, name: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now: a truncated file must fail here, not in a worker later
            return ImageOps.exif_transpose(im)
    except UnidentifiedImageError as err:
        raise BadImageError(f"{name}: not a readable image file ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{name}: corrupt or truncated image ({err})") from err


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB; alpha (RGBA, LA, P with transparency) over a background.

    CMYK, YCbCr, LAB, HSV and 1-bit convert through PIL. 16-bit greyscale is scaled to 8 bits
    (48/64-bit PNGs already open as 8-bit RGB/RGBA in PIL); float images are taken as [0, 1].
    """
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip everything above 255 to white.
        im = im.point(lambda v: v / 256).convert("L")
    elif im.mode == "F":
        im = im.point(lambda v: v * 255).convert("L")
    if im.mode in ("RGBA", "RGBa", "LA", "PA"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")


def mask_path(image: Path) -> Path:
    """Where an image's loss mask lives: ``cat.jpg`` -> ``cat.mask.png``."""
    return image.with_name(image.stem + MASK_SUFFIX)


def decode_mask(image_data: bytes, mask_data: bytes | None, name: str) -> Image.Image:
    """An image's loss mask as an upright 8-bit greyscale image of the image's size.

    The mask file's luminance when there is one, else the image's alpha channel, else a full
    mask (every pixel trains), so a set where only some images have masks still batches.

    Raises:
        BadImageError: a mask that does not decode, or whose size differs from the image's.
    """
    image = _decode_upright(image_data, name)
    if mask_data is not None:
        mask = _decode_upright(mask_data, f"{name} (its mask)").convert("L")
        if mask.size != image.size:
            raise BadImageError(
                f"{name}: its mask is {mask.width}x{mask.height} px but the image is "
                f"{image.width}x{image.height}: masks must match their image pixel for pixel"
            )
        return mask
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        return image.convert("RGBA").getchannel("A")
    return Image.new("L", image.size, 255)
