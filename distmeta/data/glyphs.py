"""Rendered glyphs -> shards: characters of scripts that Omniglot does not contain, for testing how a
model meta-trained on Omniglot's handwriting transfers to printed characters of unseen alphabets.

Each class is one character. Its 20 examples are renderings in every face and weight Debian's
``fonts-noto-core`` has for the script (sans, serif, looped; regular, bold), each with a small
random affine jitter (rotation, scale, shear, shift), drawn dark on light and then made exactly as
Omniglot's drawings are (grayscale, 28x28 Lanczos, inverted: bright strokes). A character is kept if
every face has a glyph for it (not the font's empty box), its ink spans at least a fifth of the
canvas (no combining marks or dots alone) and its rendering differs from every character kept
before it; its ink is scaled to fill 70% of the canvas, as a drawing fills its box. Scripts go to
splits whole (``default/train``, ``default/val``, ``default/test``), so a test alphabet is never
seen in training. The rendering is seeded: the same fonts give the same shards.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from distmeta.config import ImageFormat
from distmeta.data import NOTO_DEBIAN
from distmeta.data.images import prepare
from distmeta.data.shards import ClassImages, ShardError, write_shards
from distmeta.report import print_now

FORMAT = ImageFormat(channels=1, height=28, width=28, invert=True)  # as Omniglot's
EXAMPLES = 20
CANVAS = 96  # rendering size, before the jitter and the resize to 28x28
GLYPH_SIZE = 56  # font size on that canvas
MIN_INK = 0.2  # of the canvas, in width or height, as the font draws it
FILL = 0.7  # of the canvas, the larger side of a character's ink once scaled
SEED = 20260501

# script -> (the fonts' family names, the Unicode ranges of its letters), none of them among
# Omniglot's 50 alphabets (which include Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew, Arabic,
# the Indic scripts Bengali, Devanagari, Gujarati, Gurmukhi, Kannada, Malayalam, Oriya, Tibetan,
# Ge'ez, Syriac, Mongolian, Tifinagh, Balinese, Burmese, N'Ko, Tagalog, Glagolitic, Avestan, Runic,
# Canadian syllabics, Korean and Japanese kana).
SCRIPTS: dict[str, tuple[tuple[str, ...], tuple[tuple[int, int], ...]]] = {
    "Thai": (("NotoSansThai", "NotoSerifThai", "NotoLoopedThai"), ((0x0E01, 0x0E2E),)),
    "Lao": (("NotoSansLao", "NotoSerifLao", "NotoLoopedLao"), ((0x0E81, 0x0EAE),)),
    "Khmer": (("NotoSansKhmer", "NotoSerifKhmer"), ((0x1780, 0x17B3),)),
    "Tamil": (("NotoSansTamil", "NotoSerifTamil"), ((0x0B85, 0x0BB9),)),
    "Telugu": (("NotoSansTelugu", "NotoSerifTelugu"), ((0x0C05, 0x0C39),)),
    "Sinhala": (("NotoSansSinhala", "NotoSerifSinhala"), ((0x0D85, 0x0DC6),)),
    "Thaana": (("NotoSansThaana",), ((0x0780, 0x07A5),)),
    "Cherokee": (("NotoSansCherokee",), ((0x13A0, 0x13F5),)),
    "Vai": (("NotoSansVai",), ((0xA500, 0xA60B),)),
    "Javanese": (("NotoSansJavanese",), ((0xA984, 0xA9B2),)),
    "Sundanese": (("NotoSansSundanese",), ((0x1B83, 0x1BA0),)),
    "Cham": (("NotoSansCham",), ((0xAA00, 0xAA28),)),
    "Lisu": (("NotoSansLisu",), ((0xA4D0, 0xA4F7),)),
    "Adlam": (("NotoSansAdlam",), ((0x1E900, 0x1E943),)),
    "Bamum": (("NotoSansBamum",), ((0xA6A0, 0xA6EF),)),
    "Osmanya": (("NotoSansOsmanya",), ((0x10480, 0x1049D),)),
    "Deseret": (("NotoSansDeseret",), ((0x10400, 0x1044F),)),
    "Shavian": (("NotoSansShavian",), ((0x10450, 0x1047F),)),
    "Old Italic": (("NotoSansOldItalic",), ((0x10300, 0x1031F),)),
    "Gothic": (("NotoSansGothic",), ((0x10330, 0x1034A),)),
    "Linear B": (("NotoSansLinearB",), ((0x10000, 0x1005D),)),
    "Cypriot": (("NotoSansCypriot",), ((0x10800, 0x1083F),)),
    "Phoenician": (("NotoSansPhoenician",), ((0x10900, 0x10915),)),
    "Old Turkic": (("NotoSansOldTurkic",), ((0x10C00, 0x10C48),)),
    "Ol Chiki": (("NotoSansOlChiki",), ((0x1C5A, 0x1C7D),)),
    "Coptic": (("NotoSansCoptic",), ((0x2C80, 0x2CE4),)),
    "Tai Le": (("NotoSansTaiLe",), ((0x1950, 0x1974),)),
    "Buginese": (("NotoSansBuginese",), ((0x1A00, 0x1A16),)),
    "Ogham": (("NotoSansOgham",), ((0x1681, 0x169A),)),
    "Yi": (("NotoSansYi",), ((0xA000, 0xA0FF),)),
}
# Whole scripts per split: about 60% / 20% / 20% of the characters.
VAL_SCRIPTS = ("Tamil", "Cherokee", "Gothic", "Ol Chiki", "Tai Le", "Cypriot", "Ogham")
TEST_SCRIPTS = ("Thai", "Vai", "Adlam", "Shavian", "Old Italic", "Lisu", "Buginese", "Phoenician")


def build_glyphs(fonts: str | Path = NOTO_DEBIAN, out: str | Path = "data/glyphs", progress=print_now) -> Path:
    fonts, out = Path(fonts), Path(out)
    if not fonts.is_dir():
        raise ShardError(
            f"{fonts} is not a folder of fonts: install Debian's Noto fonts (apt-get install fonts-noto-core, "
            f"into {NOTO_DEBIAN}) or pass --fonts FOLDER holding Noto*.ttf files"
        )
    rng = np.random.default_rng(SEED)
    classes: list[ClassImages] = []
    splits: dict[str, list[int]] = {"default/train": [], "default/val": [], "default/test": []}
    seen: set[bytes] = set()
    for script, (families, ranges) in SCRIPTS.items():
        faces = _faces(fonts, families)
        if not faces:
            progress(f"{script}: no font in {fonts}, skipped")
            continue
        split = "test" if script in TEST_SCRIPTS else "val" if script in VAL_SCRIPTS else "train"
        kept = 0
        for start, stop in ranges:
            for code in range(start, stop + 1):
                drawings = [_draw(face, chr(code)) for face in faces]
                if any(d is None for d in drawings):
                    continue
                fingerprint = hashlib.sha256(drawings[0].tobytes()).digest()
                if fingerprint in seen:
                    continue
                seen.add(fingerprint)
                images = np.stack([_jittered(drawings[i % len(faces)], rng) for i in range(EXAMPLES)])
                splits[f"default/{split}"].append(len(classes))
                classes.append(ClassImages(f"{script}/U+{code:04X}", script, images))
                kept += 1
        progress(f"{script}: {kept} characters in {len(faces)} faces ({split})")
    if not classes:
        raise ShardError(f"no glyphs rendered from {fonts}: it holds none of the Noto fonts {sorted(SCRIPTS)} use")
    path = write_shards(out, classes, splits, dataset="glyphs", source=str(fonts), inverted=FORMAT.invert)
    progress(f"wrote {len(classes)} classes to {out}")
    return path


def _faces(fonts: Path, families: tuple[str, ...]) -> list[ImageFont.FreeTypeFont]:
    """Every regular and bold face of ``families`` found in ``fonts``."""
    faces = []
    for family in families:
        for weight in ("Regular", "Bold"):
            path = fonts / f"{family}-{weight}.ttf"
            if path.is_file():
                faces.append(ImageFont.truetype(str(path), GLYPH_SIZE))
    return faces


def _render(face: ImageFont.FreeTypeFont, text: str) -> Image.Image:
    image = Image.new("L", (CANVAS, CANVAS), 255)
    ImageDraw.Draw(image).text((CANVAS / 2, CANVAS / 2), text, font=face, fill=0, anchor="mm")
    return image


@functools.cache
def _empty_box(face: ImageFont.FreeTypeFont) -> bytes:
    """What ``face`` draws for a character it lacks: a private-use point no font has (once per face)."""
    return _render(face, "\U0010fffd").tobytes()


def _draw(face: ImageFont.FreeTypeFont, char: str) -> Image.Image | None:
    """``char`` drawn dark on light, its ink centred and scaled to fill ``FILL`` of the canvas, or None
    if the face has no glyph for it (it draws the face's empty box) or the ink is too small to be a
    character on its own."""
    image = _render(face, char)
    if image.tobytes() == _empty_box(face):
        return None
    box = Image.eval(image, lambda v: 255 - v).getbbox()
    if box is None or max(box[2] - box[0], box[3] - box[1]) < MIN_INK * CANVAS:
        return None
    ink = image.crop(box)
    scale = FILL * CANVAS / max(ink.size)  # every character fills the canvas alike, as a drawing in a box
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.Resampling.LANCZOS)
    centred = Image.new("L", (CANVAS, CANVAS), 255)
    centred.paste(ink, ((CANVAS - ink.width) // 2, (CANVAS - ink.height) // 2))
    return centred


def _jittered(drawing: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """A random small affine copy of ``drawing`` (rotation +-10 degrees, scale 0.85-1.1, shear +-0.1,
    shift +-4% of the canvas), prepared as Omniglot's drawings are: [1, 28, 28] uint8."""
    angle = math.radians(rng.uniform(-10, 10))
    scale = rng.uniform(0.85, 1.1)
    shear = rng.uniform(-0.1, 0.1)
    dx, dy = rng.uniform(-0.04, 0.04, 2) * CANVAS
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    # PIL maps each output pixel back to its input: the inverse of rotate-scale-shear about the centre
    a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin
    c = CANVAS / 2 - a * (CANVAS / 2 + dx) - b * (CANVAS / 2 + dy)
    f = CANVAS / 2 - d * (CANVAS / 2 + dx) - e * (CANVAS / 2 + dy)
    moved = drawing.transform(
        drawing.size, Image.Transform.AFFINE, (a, b, c, d, e, f), Image.Resampling.BICUBIC, fillcolor=255
    )
    return prepare(moved, FORMAT)
