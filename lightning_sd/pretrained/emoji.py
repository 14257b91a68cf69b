"""A real captioned image set built offline: Noto Color Emoji drawn with Pillow.

Each single-codepoint emoji of the font is drawn in colour, cropped to its bounding box,
centred on white and resized; its Unicode name ("hot dog", "crescent moon") is the caption.
The font is Debian's ``fonts-noto-color-emoji`` (SIL Open Font License 1.1); only building
the set needs it. The images are written in the Hugging Face imagefolder layout
(``metadata.jsonl``) that ``CaptionDataModule(ImageFolder(...))`` reads, in three splits:

- ``train``: what the base model is pretrained on;
- ``heldout``: a fixed fraction of the other emoji (chosen by name hash), for evaluation;
- ``subject``: one whole family (every emoji whose name contains "cat"), never seen in
  pretraining, for DreamBooth.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

__all__ = ["EMOJI_FONT", "LICENCE", "build_emoji_dataset", "emoji_records", "render_emoji"]

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
LICENCE = (
    "Images drawn from Noto Color Emoji (Google, SIL Open Font License 1.1, "
    "https://github.com/googlefonts/noto-emoji); captions are Unicode character names."
)
SUBJECT_WORD = "cat"
# Noto's bitmap strikes are 109 px: the one size the colour font draws at.
_FONT_SIZE = 109


def _is_subject(caption: str) -> bool:
    return SUBJECT_WORD in caption.split()


def _heldout(caption: str, fraction: float) -> bool:
    digest = hashlib.sha256(caption.encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def emoji_records(font_path: Path = EMOJI_FONT) -> list[tuple[str, str]]:
    """(character, caption) for every single-codepoint emoji the font draws in colour."""
    from fontTools.ttLib import TTFont

    cmap = TTFont(str(font_path)).getBestCmap()
    records = []
    for code in sorted(cmap):
        if code < 0x2000:  # digits, '#', '*', (c), (r): text-like glyphs, not pictures
            continue
        name = unicodedata.name(chr(code), "")
        if not name or "REGIONAL INDICATOR" in name or "VARIATION" in name:
            continue
        records.append((chr(code), name.lower()))
    return records


def render_emoji(char: str, size: int, font=None):
    """One emoji as an RGB image of ``size`` px, cropped to its ink and centred on white."""
    from PIL import Image, ImageDraw, ImageFont

    font = font or ImageFont.truetype(str(EMOJI_FONT), _FONT_SIZE)
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square.convert("RGB").resize((size, size), Image.LANCZOS)


def build_emoji_dataset(
    out_dir: str | Path, size: int = 64, heldout_fraction: float = 0.05
) -> dict[str, int]:
    """Write ``train/``, ``heldout/`` and ``subject/`` imagefolders; returns their sizes.

    Deterministic: the same font gives the same files, the split comes from name hashes.
    """
    from PIL import ImageFont

    if not EMOJI_FONT.is_file():
        raise FileNotFoundError(
            f"{EMOJI_FONT} is missing: `apt-get install fonts-noto-color-emoji` (only building "
            "the data set needs it)"
        )
    out_dir = Path(out_dir)
    font = ImageFont.truetype(str(EMOJI_FONT), _FONT_SIZE)
    lines: dict[str, list[str]] = {"train": [], "heldout": [], "subject": []}
    for char, caption in emoji_records():
        image = render_emoji(char, size, font)
        if image is None or image.getextrema() == ((255, 255),) * 3:
            continue  # blank glyph
        split = (
            "subject"
            if _is_subject(caption)
            else "heldout"
            if _heldout(caption, heldout_fraction)
            else "train"
        )
        name = f"u{ord(char):05x}.png"
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        image.save(out_dir / split / name)
        lines[split].append(json.dumps({"file_name": name, "text": caption}))
    for split, rows in lines.items():
        (out_dir / split / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (out_dir / "LICENCE.txt").write_text(LICENCE + "\n")
    return {split: len(rows) for split, rows in lines.items()}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(build_emoji_dataset(args.out_dir, args.size))
