"""A synthetic traffic dataset in the challenge's exact raw layout, for the CPU demo and the tests.

Reads nothing. Writes, under ``out_dir``::

    train/train_images/*.jpg  train/train_label.txt     (name$attribute$caption, vehicles first, then pedestrians)
    train/val_images/*.jpg    train/val_label.txt
    test/test_images/*.jpg    test/test_text.txt         (one query per test image, vehicles first)
    test/test_gt.txt                                     (official scorer format: query$img1$img2..., test_text order)
    annotations/{train,val,test}_boxes.json              (true boxes, COCO detection format, file_name relative
                                                          to <out>/train/ resp. <out>/test/; 0 = person, 1 = car)
    annotations/test_labels.txt                          (the test images' hidden name$attribute$caption)
    meta.json                                            (seed, style, counts, the deliberately dirty images)

What is drawn (see the drawing functions): vehicles as a side-view body whose outline encodes the type (Sedan, SUV,
Minivan, Microbus, Bus, Truck), whose body colour is the colour and whose door carries the brand as a logo plate
(a shape in a colour; every brand has its own pair); pedestrians as a figure whose 21 PA-100K attributes are visible
(long hair = female, grey hair and a cane = over 60, a large head = under 18, face/back/profile = orientation, hat,
glasses, handbag, shoulder bag with strap, backpack or its straps, a box held in front, sleeve length, stripes /
logo / plaid / two-tone top, long coat, skirt). Objects sit at random positions and sizes on road, grass, sky,
wall or pavement textures with occasional clutter and, now and then, a second smaller object, so detection is a
real task. A small fraction of train/val images is deliberately dirty (no object, or an object of the other
category than the label says) so the cleaning stage has something to find; ``meta.json`` lists them.

Two caption styles:
- ``real`` mirrors the real data, including its train/test mismatch: train/val vehicle captions name colour+brand
  (about 85%), the type only (14%) or the brand only (1%), with the attribute ``colour Brand.``; test queries and
  attributes are ``colour Brand Type.``; pedestrian captions describe all 21 attributes in varied phrasings.
- ``demo`` (the default) keeps every format but is learnable by a tiny model trained from scratch in minutes:
  train/val vehicle captions are composed like the test queries (and the attribute is ``colour Brand Type.`` too, so
  the attribute says what the caption says), 4 colours, 3 brands and 3 types, and pedestrians use only the most
  visible attributes (gender, orientation, hat, backpack), all named in one short canonical sentence. Its drawing
  makes the named cues stand out, because a tiny model from scratch learns the dominant colours first and, on the
  real style's figures, stayed at the ln(batch) loss plateau: larger brand plates; pedestrians in muted clothes
  with a bright hat and backpack, women in a long dress of their own colours, a white shirt from the front.

Generation is deterministic: the same arguments give byte-identical files. The dataset is built in a temporary
sibling directory and moved into place at the end, so an interrupted run leaves no half-written dataset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .categories import (
    CATEGORIES,
    FEMALE_INDEX,
    PEDESTRIAN_ATTRIBUTES,
    VEHICLE_BRANDS,
    VEHICLE_COLOURS,
    VEHICLE_TYPES,
    format_pedestrian_code,
)
from .fileio import write_json, write_text
from .labels import LabelRecord, write_ground_truth, write_label_file

log = logging.getLogger(__name__)

STYLES: tuple[str, ...] = ("demo", "real")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_COUNTS: dict[str, int] = {"train": 2400, "val": 300, "test": 400}
JPEG_QUALITY = 90
GENERATOR = "traffic_retrieval.demo_data"  # meta.json's "generator": marks the folders this module made
GENERATOR_VERSION = 4  # bump when the drawing or captions change, so meta.json tells datasets apart
DEFAULT_DIRTY_FRACTION = 0.02
COCO_CATEGORIES = [{"id": 0, "name": "person"}, {"id": 1, "name": "car"}]
COCO_ID = {"people": 0, "car": 1}
SUPERSAMPLE = 2  # objects are drawn at 2x and downsampled: smooth edges at 64 px for little cost

# The demo style's vocabulary is small on purpose: a tiny model trained from scratch for a few CPU minutes must be
# able to learn every attribute from a few hundred images of each category (4 x 3 x 3 = 36 vehicle classes).
DEMO_COLOURS: tuple[str, ...] = ("black", "white", "red", "blue")
DEMO_BRANDS: tuple[str, ...] = VEHICLE_BRANDS[:3]  # their marks differ in both shape and colour (see _brand_mark)
DEMO_TYPES: tuple[str, ...] = ("Sedan", "Bus", "Truck")  # the most distinct outlines
# Attributes the demo style uses: the ones a 64-px image shows clearly. Age is always 18-60 there.
DEMO_PEDESTRIAN_ATTRIBUTES: tuple[str, ...] = (
    "Female", "Age18-60", "Front", "Side", "Back", "Hat", "Backpack",
)

_A = {name: i for i, name in enumerate(PEDESTRIAN_ATTRIBUTES)}

VEHICLE_RGB: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30), "blue": (35, 75, 200), "brown": (125, 80, 40), "green": (45, 150, 60),
    "grey": (135, 135, 138), "orange": (245, 135, 25), "pink": (245, 155, 195), "purple": (125, 55, 165),
    "red": (210, 35, 35), "white": (238, 238, 236), "yellow": (240, 215, 35),
}
MARK_SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "plus", "star", "ring", "bars", "cross", "down_triangle",
)
MARK_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 25, 25), (25, 70, 235), (235, 185, 20), (30, 180, 60), (215, 40, 205), (25, 205, 225),
)
CLOTH_RGB: tuple[tuple[int, int, int], ...] = (
    (200, 40, 40), (40, 80, 190), (40, 140, 60), (230, 200, 40), (240, 240, 240), (30, 30, 30),
    (150, 60, 160), (240, 130, 40), (120, 120, 120), (110, 70, 40), (90, 180, 220), (230, 120, 160),
)
TROUSER_RGB: tuple[tuple[int, int, int], ...] = (
    (30, 40, 80), (25, 25, 25), (90, 90, 95), (160, 140, 100), (80, 55, 35),
)
# The demo style's pedestrians: muted clothes, so that the bright hats and backpacks the captions name stand out.
MUTED_CLOTH_RGB: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (90, 90, 95), (110, 95, 80), (70, 80, 95), (150, 145, 135), (95, 105, 90),
)
DRESS_RGB: tuple[tuple[int, int, int], ...] = ((165, 50, 85), (50, 125, 135), (140, 95, 175), (205, 110, 120))
# Hats and backpacks do not share colours, so a bright colour alone does not say which of them a figure has.
BRIGHT_HAT_RGB: tuple[tuple[int, int, int], ...] = ((250, 210, 20), (235, 35, 35))
BRIGHT_BAG_RGB: tuple[tuple[int, int, int], ...] = ((230, 40, 200), (20, 200, 230))
BAG_RGB: tuple[tuple[int, int, int], ...] = ((120, 70, 30), (30, 30, 30), (180, 30, 40), (40, 60, 150), (200, 170, 120))
HAT_RGB: tuple[tuple[int, int, int], ...] = ((200, 30, 30), (30, 60, 180), (240, 220, 40), (240, 240, 240), (20, 20, 20))
SKIN_RGB: tuple[tuple[int, int, int], ...] = ((240, 200, 170), (215, 170, 130), (170, 120, 85), (110, 75, 50))
HAIR_RGB: tuple[tuple[int, int, int], ...] = ((20, 15, 10), (70, 45, 25), (150, 110, 60), (200, 170, 110))
GREY_HAIR_RGB: tuple[tuple[int, int, int], ...] = ((200, 200, 200), (235, 235, 235), (160, 160, 160))


def _brand_mark(brand_index: int) -> tuple[str, tuple[int, int, int]]:
    """Logo (shape, colour) of a brand; distinct for the first 60 brands.

    shape = i mod 10, colour = (i + i div 10) mod 6: since gcd(11, 6) = 1 no two brands below 60 share both, and the
    first six brands (the demo's) differ in shape and in colour.
    """
    return MARK_SHAPES[brand_index % len(MARK_SHAPES)], MARK_RGB[(brand_index + brand_index // 10) % len(MARK_RGB)]


# ------------------------------------------------------------------------------------------------- data model
@dataclass
class _Sample:
    """One generated image with its label. ``boxes`` are (category, x, y, w, h) in image pixels."""

    name: str
    category: str
    attribute: str
    caption: str
    width: int = 0
    height: int = 0
    boxes: list[tuple[str, int, int, int, int]] = field(default_factory=list)
    dirty: str | None = None  # None, "empty" (no object drawn) or "wrong_category" (the other category drawn)
    content: Any = None  # the sampled _Vehicle or pedestrian bits; dropped once the image is drawn


@dataclass(frozen=True)
class _Vehicle:
    colour: str
    brand: str
    vtype: str


# ------------------------------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _vehicle_caption(v: _Vehicle, kind: str, rng: np.random.Generator) -> str:
    """Caption in the real data's phrasings.

    ``kind``: ``full`` (test style, colour Brand Type), ``colour_brand``, ``type`` or ``brand``.
    """
    words = {
        "full": f"{v.colour} {v.brand} {v.vtype}",
        "colour_brand": f"{v.colour} {v.brand}",
        "type": v.vtype,
        "brand": v.brand,
    }[kind]
    if rng.random() < 0.5:
        return f"This is {_article(words).lower()} {words}."
    return f"{_article(words)} {words}."


def _join_and(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _demo_pedestrian_caption(bits: Sequence[int]) -> str:
    """The demo's one canonical phrasing: every set attribute is named, always in the same words and order.

    Short, and the view first: a text tower trained from scratch starts by averaging its tokens, and in long
    captions that share most of their words the few that differ are drowned (training then sits at loss ln(batch)
    for epochs; "A male pedestrian facing the camera." and "... seen from the side." stayed 0.97 apart in cosine).
    """
    view = "Front" if bits[_A["Front"]] else "Side" if bits[_A["Side"]] else "Back"
    extras = [w for a, w in (("Hat", "a hat"), ("Backpack", "a backpack")) if bits[_A[a]]]
    person = "woman" if bits[_A["Female"]] else "man"
    return f"{view} view of a {person}" + (f" with {_join_and(extras)}." if extras else ".")


def _real_pedestrian_caption(bits: Sequence[int], rng: np.random.Generator) -> str:
    """Varied phrasings in the style of the real captions, generated from all 21 attributes."""
    female = bool(bits[_A["Female"]])
    pron, pos = ("She", "her") if female else ("He", "his")
    adj, noun = ("female", "woman") if female else ("male", "man")
    if bits[_A["AgeOver60"]]:
        age = ("is over 60 years old", "is elderly")
    elif bits[_A["AgeLess18"]]:
        age = ("is age 18 or younger", "is not an adult", "is under 18")
    else:
        age = ("is between 18 and 60 years old", "is an adult")
    age_text = age[int(rng.integers(len(age)))]
    opener = int(rng.integers(3))
    if opener == 0:
        first = f"A {adj} pedestrian is someone who walks on foot, {age_text}"
    elif opener == 1:
        first = f"A walking {noun} who {age_text}"
    else:
        first = f"A pedestrian who is {adj} {age_text}"
    if bits[_A["Front"]]:
        first += f", with {pos} body facing the camera"
    elif bits[_A["Back"]]:
        first += f", with {pos} body back to the camera"
    else:
        first += f", with {pos} side to the camera"
    bags = [w for a, w in (("HandBag", "a handbag"), ("ShoulderBag", "a shoulderbag"), ("Backpack", "a backpack"))
            if bits[_A[a]]]
    if bags:
        verb = ("has", "with", "carrying")[int(rng.integers(3))]
        first += f" and {verb} {_join_and(bags)}"
    if bits[_A["HoldObjectsInFront"]]:
        first += f", holding something in front of {pos} body"
    short = bool(bits[_A["ShortSleeve"]])
    top = "tee shirt" if short else ("shirt", "jacket", "sweater")[int(rng.integers(3))]
    second = f"{pron} is in a {top} with {'short' if short else 'long'} sleeves"
    patterns = [w for a, w in (("UpperStride", "stripes"), ("UpperLogo", "a logo"), ("UpperPlaid", "a plaid pattern"),
                                ("UpperSplice", "spliced colours")) if bits[_A[a]]]
    if patterns:
        second += f" and {_join_and(patterns)}"
    if bits[_A["LongCoat"]]:
        second += ", and wears a long coat"
    if bits[_A["Skirt&Dress"]]:
        second += (", and a skirt", ", and a dress")[int(rng.integers(2))]
    sentences = [first + ".", second + "."]
    if bits[_A["Glasses"]]:
        # "wearning" is a typo of the real captions; keeping it sometimes mirrors the data a model will meet.
        sentences.append(f"{pron} is {'wearning' if rng.random() < 0.3 else 'wearing'} glasses.")
    if bits[_A["Hat"]]:
        sentences.append(f"{pron} wears a hat.")
    return " ".join(sentences)


# ------------------------------------------------------------------------------------------------- attributes
def _sample_pedestrian_bits(rng: np.random.Generator, style: str) -> list[int]:
    """A plausible PA-100K attribute vector: one age, one orientation, one sleeve length, at most one pattern."""
    bits = [0] * len(PEDESTRIAN_ATTRIBUTES)
    demo = style == "demo"
    female = rng.random() < 0.45
    bits[_A["Female"]] = int(female)
    age = "Age18-60" if demo else ("AgeOver60", "Age18-60", "AgeLess18")[int(rng.choice(3, p=[0.1, 0.75, 0.15]))]
    bits[_A[age]] = 1
    orient = ("Front", "Side", "Back")[int(rng.integers(3))]
    bits[_A[orient]] = 1
    bits[_A["Hat"]] = int(rng.random() < (0.25 if demo else 0.12))
    if not demo and orient != "Back":  # glasses cannot be seen from behind; keep the code truthful
        bits[_A["Glasses"]] = int(rng.random() < 0.18)
    bag = rng.random()
    if bag < (0.35 if demo else 0.2):
        bits[_A["Backpack"]] = 1
    elif demo:
        pass  # the demo style has backpacks only
    elif bag < 0.4:
        bits[_A["ShoulderBag"]] = 1
    elif bag < 0.55:
        bits[_A["HandBag"]] = 1
    if not demo and rng.random() < 0.08:
        bits[_A["HoldObjectsInFront"]] = 1
    short = rng.random() < 0.45
    if not demo:  # sleeves are too thin to see at the demo's 64 px: demo figures all wear long sleeves, unnamed
        bits[_A["ShortSleeve" if short else "LongSleeve"]] = 1
    if not demo:
        pattern = rng.random()
        for i, attr in enumerate(("UpperStride", "UpperLogo", "UpperPlaid", "UpperSplice")):
            if 0.08 * i <= pattern < 0.08 * (i + 1):
                bits[_A[attr]] = 1
    if not demo and not short and rng.random() < 0.1:
        bits[_A["LongCoat"]] = 1
    if not demo and female and rng.random() < 0.4:
        bits[_A["Skirt&Dress"]] = 1
    return bits


def vehicle_vocabulary(style: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(colours, brands, types) the vehicles of a caption style are drawn from (and ``meta.json`` lists)."""
    if style == "demo":
        return DEMO_COLOURS, DEMO_BRANDS, DEMO_TYPES
    return VEHICLE_COLOURS, VEHICLE_BRANDS, VEHICLE_TYPES


def _sample_vehicle(rng: np.random.Generator, style: str) -> _Vehicle:
    colours, brands, types = vehicle_vocabulary(style)
    return _Vehicle(
        colours[int(rng.integers(len(colours)))],
        brands[int(rng.integers(len(brands)))],
        types[int(rng.integers(len(types)))],
    )


def _vehicle_label(v: _Vehicle, split: str, style: str, rng: np.random.Generator) -> tuple[str, str]:
    """(attribute, caption) of a vehicle for a split and style (see the module docstring)."""
    if split == "test" or style == "demo":
        return f"{v.colour} {v.brand} {v.vtype}.", _vehicle_caption(v, "full", rng)
    u = rng.random()
    kind = "colour_brand" if u < 0.85 else "type" if u < 0.99 else "brand"
    return f"{v.colour} {v.brand}.", _vehicle_caption(v, kind, rng)


def _pedestrian_label(bits: Sequence[int], style: str, rng: np.random.Generator) -> tuple[str, str]:
    caption = _demo_pedestrian_caption(bits) if style == "demo" else _real_pedestrian_caption(bits, rng)
    return format_pedestrian_code(list(bits)), caption


# ------------------------------------------------------------------------------------------------- drawing helpers
def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _pick(options: Sequence[Any], rng: np.random.Generator) -> Any:
    return options[int(rng.integers(len(options)))]


def _shade(rgb: Sequence[int], f: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)  # type: ignore[return-value]


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _contrast(rgb: Sequence[int]) -> tuple[int, int, int]:
    return (35, 35, 35) if _luma(rgb) > 130 else (240, 240, 240)


def _low_freq(rng: np.random.Generator, w: int, h: int, grid: int, amp: float) -> np.ndarray:
    """Smooth random field in [-amp, amp] of shape (h, w, 1): a small random grid upsampled bilinearly."""
    small = rng.uniform(-amp, amp, size=(grid, grid)).astype(np.float32)
    big = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(big, dtype=np.float32)[..., None]


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Road, grass, sky over ground, wall or pavement texture, with noise at two scales."""
    kind = _pick(("road", "grass", "sky", "wall", "pavement"), rng)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    if kind == "road":
        base = np.array(_jitter((100, 100, 104), rng, 20), np.float32)
        img = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "grass":
        base = np.array(_jitter((80, 130, 55), rng, 20), np.float32)
        img = np.broadcast_to(base, (h, w, 3)).copy()
    elif kind == "sky":
        top = np.array(_jitter((120, 170, 230), rng, 20), np.float32)
        bottom = np.array(_jitter((200, 220, 240), rng, 15), np.float32)
        ground = np.array(_pick(((100, 100, 104), (80, 130, 55), (150, 140, 120)), rng), np.float32)
        horizon = rng.uniform(0.35, 0.65)
        sky = top + (bottom - top) * (ys / horizon)
        img = np.where(ys < horizon, sky, ground).astype(np.float32) * np.ones((1, w, 1), np.float32)
    elif kind == "wall":
        base = np.array(_jitter((180, 150, 120), rng, 30), np.float32)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        step = int(rng.integers(6, 14))
        img[::step, :, :] *= 0.75  # mortar lines
    else:
        base = np.array(_jitter((175, 175, 170), rng, 20), np.float32)
        img = np.broadcast_to(base, (h, w, 3)).copy()
        step = int(rng.integers(10, 20))
        img[::step, :, :] *= 0.8
        img[:, ::step, :] *= 0.8
    img += _low_freq(rng, w, h, int(rng.integers(3, 7)), 25.0)
    img += rng.normal(0.0, 6.0, size=(h, w, 1)).astype(np.float32)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if kind == "road" and rng.random() < 0.6:  # lane marking
        d = ImageDraw.Draw(out)
        y = int(rng.uniform(0.2, 0.9) * h)
        colour = _pick(((230, 230, 230), (230, 200, 40)), rng)
        dash = int(rng.integers(6, 16))
        for x in range(0, w, 2 * dash):
            d.rectangle([x, y, x + dash, y + max(1, h // 40)], fill=colour)
    return out


def _clutter(img: Image.Image, rng: np.random.Generator) -> None:
    """Muted non-object shapes behind the object: poles, bushes, boxes, signs."""
    d = ImageDraw.Draw(img)
    w, h = img.size
    for _ in range(int(rng.integers(1, 4))):
        kind = _pick(("pole", "bush", "box", "sign"), rng)
        x, y = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        s = int(rng.uniform(0.08, 0.25) * min(w, h)) + 2
        if kind == "pole":
            d.rectangle([x, 0, x + max(1, s // 5), h], fill=_jitter((70, 70, 75), rng))
        elif kind == "bush":
            d.ellipse([x - s, y - s // 2, x + s, y + s // 2], fill=_jitter((50, 100, 45), rng))
        elif kind == "box":
            d.rectangle([x, y, x + s, y + s], fill=_jitter((130, 110, 85), rng))
        else:
            d.rectangle([x, y, x + max(1, s // 6), h], fill=(90, 90, 90))
            d.ellipse([x - s // 2, y - s, x + s // 2, y], fill=_jitter((150, 150, 160), rng))


def _mark(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw a brand mark of radius ``r`` centred at (cx, cy)."""
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        q = r * 0.85
        d.rectangle([cx - q, cy - q, cx + q, cy + q], fill=colour)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=colour)
    elif shape == "down_triangle":
        d.polygon([(cx, cy + r), (cx + r, cy - r * 0.8), (cx - r, cy - r * 0.8)], fill=colour)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    elif shape == "plus":
        t = r * 0.35
        d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif shape == "cross":
        t = max(1.0, r * 0.45)
        d.line([(cx - r, cy - r), (cx + r, cy + r)], fill=colour, width=int(t))
        d.line([(cx - r, cy + r), (cx + r, cy - r)], fill=colour, width=int(t))
    elif shape == "star":
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=colour)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(1, int(r * 0.4)))
    elif shape == "bars":
        t = r * 0.3
        d.rectangle([cx - r, cy - r * 0.75, cx + r, cy - r * 0.75 + 2 * t], fill=colour)
        d.rectangle([cx - r, cy + r * 0.75 - 2 * t, cx + r, cy + r * 0.75], fill=colour)
    else:
        raise ValueError(f"unknown mark shape {shape!r}")


# Side views in unit coordinates (x along the length, y from roof to ground, both 0..1 of the layer).
# aspect = length / height of the layer; wheels are (x, y, radius as a fraction of the height); logo (x, y, radius).
_VEHICLE_SHAPES: dict[str, dict[str, Any]] = {
    "Sedan": dict(
        aspect=2.6,
        body=[[(0.0, 0.50), (0.04, 0.40), (0.24, 0.36), (0.36, 0.08), (0.68, 0.08), (0.82, 0.36), (0.98, 0.42),
               (1.0, 0.55), (1.0, 0.80), (0.0, 0.80)]],
        windows=[[(0.38, 0.14), (0.51, 0.14), (0.51, 0.36), (0.29, 0.36)],
                 [(0.54, 0.14), (0.66, 0.14), (0.77, 0.36), (0.54, 0.36)]],
        wheels=[(0.2, 0.8, 0.18), (0.8, 0.8, 0.18)], logo=(0.52, 0.58, 0.14),
    ),
    "SUV": dict(
        aspect=2.2,
        body=[[(0.0, 0.45), (0.03, 0.33), (0.2, 0.30), (0.3, 0.04), (0.96, 0.04), (1.0, 0.30), (1.0, 0.78),
               (0.0, 0.78)]],
        windows=[[(0.32, 0.10), (0.5, 0.10), (0.5, 0.30), (0.26, 0.30)], [(0.53, 0.10), (0.72, 0.10), (0.72, 0.30),
                                                                         (0.53, 0.30)],
                 [(0.75, 0.10), (0.94, 0.10), (0.96, 0.30), (0.75, 0.30)]],
        wheels=[(0.2, 0.78, 0.2), (0.8, 0.78, 0.2)], logo=(0.52, 0.54, 0.14),
    ),
    "Minivan": dict(
        aspect=2.1,
        body=[[(0.0, 0.55), (0.06, 0.38), (0.24, 0.06), (0.97, 0.04), (1.0, 0.12), (1.0, 0.80), (0.0, 0.80)]],
        windows=[[(0.25, 0.12), (0.42, 0.12), (0.42, 0.36), (0.12, 0.36)],
                 [(0.45, 0.12), (0.68, 0.12), (0.68, 0.36), (0.45, 0.36)],
                 [(0.71, 0.12), (0.95, 0.12), (0.95, 0.36), (0.71, 0.36)]],
        wheels=[(0.18, 0.82, 0.16), (0.82, 0.82, 0.16)], logo=(0.56, 0.58, 0.13),
    ),
    "Microbus": dict(
        aspect=1.7,
        body=[[(0.0, 0.15), (0.04, 0.03), (1.0, 0.03), (1.0, 0.84), (0.0, 0.84)]],
        windows=[[(0.03 + 0.245 * k, 0.10), (0.22 + 0.245 * k, 0.10), (0.22 + 0.245 * k, 0.38),
                  (0.03 + 0.245 * k, 0.38)] for k in range(4)],
        wheels=[(0.2, 0.84, 0.14), (0.82, 0.84, 0.14)], logo=(0.5, 0.6, 0.13),
    ),
    "Bus": dict(
        aspect=3.0,
        body=[[(0.0, 0.06), (0.02, 0.02), (1.0, 0.02), (1.0, 0.86), (0.0, 0.86)]],
        windows=[[(0.03 + 0.16 * k, 0.10), (0.16 + 0.16 * k, 0.10), (0.16 + 0.16 * k, 0.42),
                  (0.03 + 0.16 * k, 0.42)] for k in range(6)],
        wheels=[(0.15, 0.86, 0.12), (0.85, 0.86, 0.12)], logo=(0.5, 0.64, 0.13),
    ),
    "Truck": dict(
        aspect=2.4,
        body=[[(0.0, 0.35), (0.03, 0.12), (0.22, 0.10), (0.24, 0.82), (0.0, 0.82)],
              [(0.26, 0.0), (1.0, 0.0), (1.0, 0.74), (0.26, 0.74)]],
        windows=[[(0.04, 0.16), (0.2, 0.16), (0.2, 0.42), (0.02, 0.42)]],
        wheels=[(0.12, 0.82, 0.16), (0.68, 0.82, 0.16), (0.86, 0.82, 0.16)], logo=(0.63, 0.37, 0.17),
    ),
}


def _draw_vehicle(v: _Vehicle, width: int, rng: np.random.Generator, salient: bool = False) -> Image.Image:
    """An RGBA side view of ``v``, ``width`` pixels long (height from the type's aspect), randomly mirrored.

    ``salient`` (the demo style) draws the brand plate 1.6 times larger: at 64 px the real-style plate is 4 pixels.
    """
    shape = _VEHICLE_SHAPES[v.vtype]
    s = SUPERSAMPLE
    W = max(8, width) * s
    H = max(4, int(round(width / shape["aspect"]))) * s
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    body = _jitter(VEHICLE_RGB[v.colour], rng, 10)
    outline = _shade(body, 0.6) if _luma(body) > 60 else (70, 70, 75)

    def pts(poly: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(x * (W - 1), y * (H - 1)) for x, y in poly]

    # chassis under the body (dark), so that the wheels sit on something even for light colours
    d.rectangle([0.02 * W, 0.62 * H, 0.98 * W, 0.86 * H], fill=(40, 40, 42, 255))
    for poly in shape["body"]:
        d.polygon(pts(poly), fill=body + (255,), outline=outline + (255,), width=s)
    glass = _jitter((150, 180, 205), rng, 12) + (255,)
    for poly in shape["windows"]:
        d.polygon(pts(poly), fill=glass)
    for x, y, r in shape["wheels"]:
        cx, cy, rr = x * (W - 1), y * (H - 1), r * H
        d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=(25, 25, 25, 255))
        d.ellipse([cx - rr * 0.45, cy - rr * 0.45, cx + rr * 0.45, cy + rr * 0.45], fill=(160, 160, 165, 255))
    # lights: front (x=0) white-yellow, rear red; small so they do not read as a body colour
    lw = max(1.0, 0.03 * W)
    d.rectangle([0, 0.42 * H, lw, 0.52 * H], fill=(250, 240, 190, 255))
    d.rectangle([W - 1 - lw, 0.42 * H, W - 1, 0.5 * H], fill=(200, 30, 30, 255))
    # brand: a contrasting plate carrying the brand's mark
    mark_shape, mark_rgb = _brand_mark(VEHICLE_BRANDS.index(v.brand))
    lx, ly, lr = shape["logo"]
    cx, cy, r = lx * (W - 1), ly * (H - 1), lr * H * (1.6 if salient else 1.0)
    d.rounded_rectangle([cx - r, cy - r, cx + r, cy + r], radius=r * 0.3, fill=_contrast(body) + (255,))
    _mark(d, mark_shape, cx, cy, r * 0.72, mark_rgb + (255,))
    layer = layer.resize((W // s, H // s), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def _draw_pedestrian(bits: Sequence[int], height: int, rng: np.random.Generator, salient: bool = False) -> Image.Image:
    """An RGBA figure ``height`` pixels tall (width 0.5 x height) showing the attributes in ``bits``.

    ``salient`` (the demo style) makes the named cues the most visible thing in the figure, since a tiny model
    trained from scratch learns colours long before shapes: muted clothes, a bright hat and backpack (thick straps
    from the front), women in a long dress of colours men's clothes never have and with long hair, a white shirt
    under an open jacket from the front, large heads.
    """
    b = {name: bool(bits[i]) for name, i in _A.items()}
    s = SUPERSAMPLE
    H = max(16, height) * s
    W = max(8, int(round(height * 0.5))) * s
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)

    def X(u: float) -> float:
        return u * (W - 1)

    def Y(u: float) -> float:
        return u * (H - 1)

    def rect(x0: float, y0: float, x1: float, y1: float, rgb: Sequence[int]) -> None:
        d.rectangle([X(x0), Y(y0), X(x1), Y(y1)], fill=tuple(rgb) + (255,))

    skin = _jitter(_pick(SKIN_RGB, rng), rng, 8)
    hair = _jitter(_pick(GREY_HAIR_RGB if b["AgeOver60"] else HAIR_RGB, rng), rng, 8)
    upper = _jitter(_pick(MUTED_CLOTH_RGB if salient else CLOTH_RGB, rng), rng, 10)
    lower = _jitter(_pick(TROUSER_RGB, rng), rng, 8)
    if salient and b["Female"]:  # a long one-colour dress whose colours men's clothes never have
        upper = _jitter(_pick(DRESS_RGB, rng), rng, 10)
    accent = _contrast(upper) if rng.random() < 0.5 else _jitter(_pick(CLOTH_RGB, rng), rng, 10)
    if accent == upper:
        accent = _contrast(upper)
    bag_rgb = _jitter(_pick(BRIGHT_BAG_RGB if salient else BAG_RGB, rng), rng)
    side = b["Side"]
    back = b["Back"]

    # a child's head is larger relative to the body; the demo style draws large heads so a face (front) and the
    # back of a head (hair) differ in more than a few pixels at 64 px
    head_r = 0.095 if b["AgeLess18"] or salient else 0.072
    top = 0.05
    hc = top + head_r  # head centre (y, as a fraction of the height; the hat goes above)
    r_px = head_r * H  # head radius in pixels (round head)
    cx = X(0.5)
    sy = hc + head_r + 0.025  # shoulders
    hip = sy + (0.30 if b["AgeLess18"] else 0.33)
    sw = 0.17 if side else 0.28  # half shoulder width, fraction of the width
    arm_w = 0.09

    # long hair behind the shoulders (drawn first, the body covers part of it); to the waist in the demo style
    if b["Female"]:
        hx0 = cx - r_px * (0.9 if side else 1.25) + (r_px * 0.5 if side else 0)
        hair_end = (sy + hip) / 2 if salient else sy + 0.1
        d.rectangle([hx0, Y(hc), hx0 + r_px * (1.6 if side else 2.5), Y(hair_end)], fill=hair + (255,))

    # backpack seen from the side or behind sits behind the torso
    if b["Backpack"] and side:
        rect(0.5 + sw - 0.02, sy + 0.02, 0.5 + sw + 0.22, hip - 0.04, bag_rgb)

    # legs: trousers, or skin under a skirt; shoes
    skirt = b["Skirt&Dress"] or (salient and b["Female"])
    leg_rgb = skin if skirt else lower
    if side:
        d.polygon([(X(0.42), Y(hip)), (X(0.56), Y(hip)), (X(0.38), Y(0.95)), (X(0.26), Y(0.95))], fill=leg_rgb + (255,))
        d.polygon([(X(0.46), Y(hip)), (X(0.60), Y(hip)), (X(0.74), Y(0.95)), (X(0.62), Y(0.95))], fill=leg_rgb + (255,))
        rect(0.22, 0.94, 0.40, 0.99, (30, 30, 30))
        rect(0.60, 0.94, 0.78, 0.99, (30, 30, 30))
    else:
        rect(0.5 - 0.17, hip, 0.5 - 0.03, 0.95, leg_rgb)
        rect(0.5 + 0.03, hip, 0.5 + 0.17, 0.95, leg_rgb)
        rect(0.5 - 0.19, 0.94, 0.5 - 0.02, 0.99, (30, 30, 30))
        rect(0.5 + 0.02, 0.94, 0.5 + 0.19, 0.99, (30, 30, 30))
    if skirt:
        skirt_rgb = upper if salient else _jitter(_pick(CLOTH_RGB, rng), rng, 10)  # demo: a one-colour dress
        hem = hip + (0.3 if salient else 0.2)
        d.polygon([(X(0.5 - sw + 0.02), Y(hip - 0.02)), (X(0.5 + sw - 0.02), Y(hip - 0.02)),
                   (X(0.5 + sw + 0.1), Y(hem)), (X(0.5 - sw - 0.1), Y(hem))], fill=skirt_rgb + (255,))

    # torso (a long coat reaches the knees and flares)
    if b["LongCoat"]:
        d.polygon([(X(0.5 - sw), Y(sy)), (X(0.5 + sw), Y(sy)), (X(0.5 + sw + 0.08), Y(hip + 0.24)),
                   (X(0.5 - sw - 0.08), Y(hip + 0.24))], fill=upper + (255,))
        d.line([(cx, Y(sy + 0.05)), (cx, Y(hip + 0.24))], fill=_shade(upper, 0.6) + (255,), width=s)
    else:
        rect(0.5 - sw, sy, 0.5 + sw, hip, upper)
    if salient and not side and not back:  # from the front: an open jacket over a white shirt
        rect(0.5 - 0.07, sy, 0.5 + 0.07, hip, (236, 236, 230))
    # patterns on the upper body
    if b["UpperSplice"]:
        rect(0.5, sy, 0.5 + sw, hip, accent)
    if b["UpperStride"]:
        n = 4
        for k in range(n):
            y0 = sy + (hip - sy) * (k + 0.5) / n
            rect(0.5 - sw, y0, 0.5 + sw, y0 + (hip - sy) / (2.5 * n), accent)
    if b["UpperPlaid"]:
        for k in range(1, 4):
            y0 = sy + (hip - sy) * k / 4
            d.line([(X(0.5 - sw), Y(y0)), (X(0.5 + sw), Y(y0))], fill=accent + (255,), width=s)
            x0 = 0.5 - sw + 2 * sw * k / 4
            d.line([(X(x0), Y(sy)), (X(x0), Y(hip))], fill=accent + (255,), width=s)
    if b["UpperLogo"]:
        lr = 0.06
        ly = sy + 0.08
        d.ellipse([X(0.5 - 2 * lr), Y(ly - lr), X(0.5 + 2 * lr), Y(ly + lr)], fill=accent + (255,))

    if salient and b["Female"] and back:  # long hair over the upper back
        hx0 = cx - r_px * 1.1
        d.rectangle([hx0, Y(hc), hx0 + r_px * 2.2, Y((sy + hip) / 2)], fill=hair + (255,))
    # backpack from behind covers the back; from the front only its straps show
    if b["Backpack"] and back:
        rect(0.5 - sw + 0.04, sy + 0.03, 0.5 + sw - 0.04, hip - 0.03, bag_rgb)
    elif b["Backpack"] and not side:
        strap = bag_rgb if salient else _shade(bag_rgb, 0.8)
        sw_strap, strap_end = (0.10, hip - 0.04) if salient else (0.07, sy + 0.2)
        rect(0.5 - sw + 0.05, sy, 0.5 - sw + 0.05 + sw_strap, strap_end, strap)
        rect(0.5 + sw - 0.05 - sw_strap, sy, 0.5 + sw - 0.05, strap_end, strap)
    if b["ShoulderBag"]:
        d.line([(X(0.5 - sw + 0.04), Y(sy)), (X(0.5 + sw), Y(hip - 0.03))], fill=_shade(bag_rgb, 0.7) + (255,),
               width=max(s, int(0.05 * W)))
        rect(0.5 + sw - 0.06, hip - 0.07, 0.5 + sw + 0.16, hip + 0.06, bag_rgb)

    # arms: sleeves in the upper colour (short: to the elbow, then skin), hands in skin
    sleeve_end = sy + 0.11 if b["ShortSleeve"] else hip
    if side:
        arm_x = [(0.5 - arm_w / 2, 0.5 + arm_w / 2)]
    else:
        arm_x = [(0.5 - sw - arm_w, 0.5 - sw), (0.5 + sw, 0.5 + sw + arm_w)]
    sleeve = _shade(upper, 0.8) if _luma(upper) > 60 else _shade((90, 90, 90), 1.0)  # arms stand out from the torso
    for x0, x1 in arm_x:
        rect(x0, sy, x1, hip + 0.02, skin)
        rect(x0, sy, x1, sleeve_end, sleeve)
    if b["HandBag"]:
        hx = arm_x[0][0] - (0.0 if side else 0.08)
        d.line([(X(hx + 0.05), Y(hip + 0.01)), (X(hx + 0.11), Y(hip + 0.05))], fill=(40, 40, 40, 255), width=s)
        rect(hx, hip + 0.04, hx + 0.2, hip + 0.14, bag_rgb)
    if b["HoldObjectsInFront"]:
        obj = _jitter(_pick(((200, 170, 120), (240, 240, 240), (60, 120, 200)), rng), rng)
        ox = 0.30 if side else 0.5 - 0.16
        rect(ox, hip - 0.15, ox + 0.32, hip - 0.03, obj)
    if b["AgeOver60"]:  # a walking stick
        x_hand = arm_x[-1][1]
        d.line([(X(x_hand), Y(hip)), (X(x_hand + 0.08), Y(0.99))], fill=(110, 70, 30, 255), width=max(s, int(0.04 * W)))

    # head: face (front), back of the head (back), profile (side)
    box = [cx - r_px, Y(hc) - r_px, cx + r_px, Y(hc) + r_px]
    if back:
        d.ellipse(box, fill=hair + (255,))
    else:
        d.ellipse(box, fill=skin + (255,))
        if side:
            d.pieslice(box, 270, 90, fill=hair + (255,))  # hair on the back half of the head
        d.chord([box[0] - s, box[1] - s, box[2] + s, box[3] - r_px * 0.6], 180, 360, fill=hair + (255,))
        eye_y = Y(hc) + r_px * 0.05
        eyes = [cx - r_px * 0.55] if side else [cx - r_px * 0.4, cx + r_px * 0.4]
        er = max(1.0, r_px * 0.14)
        for ex in eyes:
            d.ellipse([ex - er, eye_y - er, ex + er, eye_y + er], fill=(20, 20, 20, 255))
        if b["Glasses"]:
            gx0 = cx - r_px * (0.95 if side else 0.7)
            gx1 = cx - r_px * 0.15 if side else cx + r_px * 0.7
            d.rectangle([gx0, eye_y - er * 1.6, gx1, eye_y + er * 1.6], outline=(10, 10, 10, 255),
                        width=max(s, int(er)))
    if b["Hat"]:
        hat = _jitter(_pick(BRIGHT_HAT_RGB if salient else HAT_RGB, rng), rng)
        g = 1.3 if salient else 1.0  # a bigger hat in the demo style
        brim_y = Y(hc) - r_px * 0.55
        d.rectangle([cx - r_px * 1.35 * g, brim_y - r_px * 0.2 * g, cx + r_px * 1.35 * g, brim_y + r_px * 0.12 * g],
                    fill=hat + (255,))
        d.chord([cx - r_px * 0.95 * g, brim_y - r_px * 1.0 * g, cx + r_px * 0.95 * g, brim_y + r_px * 0.9 * g], 180,
                360, fill=hat + (255,))
    layer = layer.resize((W // s, H // s), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def _paste(img: Image.Image, layer: Image.Image, x: int, y: int) -> tuple[int, int, int, int] | None:
    """Alpha-paste ``layer`` at (x, y); returns the tight box (x, y, w, h) of what became visible, or None."""
    img.paste(layer, (x, y), layer)
    alpha = layer.getchannel("A").point(lambda a: 255 if a >= 128 else 0)
    bb = alpha.getbbox()
    if bb is None:
        return None
    x0, y0 = max(0, x + bb[0]), max(0, y + bb[1])
    x1, y1 = min(img.width, x + bb[2]), min(img.height, y + bb[3])
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def _overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of box ``a``'s area (x, y, w, h) covered by box ``b``."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0, iw) * max(0, ih) / max(1, a[2] * a[3])


def _object_layer(
    category: str, content: Any, target: float, rng: np.random.Generator, w: int, h: int, style: str
) -> Image.Image:
    """An object layer scaled so its main extent is ``target`` of the image's, and never larger than the image."""
    if category == "car":
        length = int(target * w)
        aspect = _VEHICLE_SHAPES[content.vtype]["aspect"]
        length = min(length, int(0.97 * h * aspect))
        return _draw_vehicle(content, max(12, length), rng, salient=style == "demo")
    tall = int(target * h)
    tall = min(tall, int(0.97 * w / 0.5))
    return _draw_pedestrian(content, max(24, tall), rng, salient=style == "demo")


def _random_content(category: str, style: str, rng: np.random.Generator) -> Any:
    return _sample_vehicle(rng, style) if category == "car" else _sample_pedestrian_bits(rng, style)


def _image_size(category: str, rng: np.random.Generator, min_size: int, max_size: int) -> tuple[int, int]:
    """(width, height): the long side in [min_size, max_size]; pedestrians tall, vehicles wide, as in the real data."""
    long_side = int(rng.integers(min_size, max_size + 1))
    if category == "car":
        return long_side, max(8, int(round(long_side * rng.uniform(0.55, 0.8))))
    return max(8, int(round(long_side * rng.uniform(0.45, 0.65)))), long_side


def _render(
    category: str, content: Any, style: str, rng: np.random.Generator, min_size: int, max_size: int, dirty: str | None
) -> tuple[Image.Image, list[tuple[str, int, int, int, int]]]:
    """Draw one image; the image's shape follows the label's category even when the content is dirty."""
    w, h = _image_size(category, rng, min_size, max_size)
    img = _background(rng, w, h)
    if rng.random() < 0.4:
        _clutter(img, rng)
    boxes: list[tuple[str, int, int, int, int]] = []
    if dirty == "empty":
        return img, boxes
    if dirty == "wrong_category":
        category = "people" if category == "car" else "car"
        content = _random_content(category, style, rng)
    lo = 0.7 if style == "demo" else 0.5
    main_target = rng.uniform(lo, 0.95) if category == "car" else rng.uniform(lo + 0.05, 0.95)
    layer = _object_layer(category, content, main_target, rng, w, h, style)
    x = int(rng.integers(0, max(1, w - layer.width + 1)))
    y = int(rng.integers(0, max(1, h - layer.height + 1)))
    # Now and then a smaller second object of either category behind the main one, so a detector has to pick the
    # main object. It goes where it overlaps the main object least (of a few tries); if the main object still
    # hides most of it, it is not annotated.
    if rng.random() < 0.06:
        other = _pick(CATEGORIES, rng)
        layer2 = _object_layer(other, _random_content(other, style, rng), rng.uniform(0.2, 0.35), rng, w, h, style)
        tries = [(int(rng.integers(0, max(1, w - layer2.width + 1))),
                  int(rng.integers(0, max(1, h - layer2.height + 1)))) for _ in range(4)]
        main_box = (x, y, layer.width, layer.height)
        x2, y2 = min(tries, key=lambda t: _overlap((t[0], t[1], layer2.width, layer2.height), main_box))
        box2 = _paste(img, layer2, x2, y2)
        if box2 and _overlap(box2, main_box) <= 0.5:
            boxes.append((other,) + box2)
    box = _paste(img, layer, x, y)
    if box:
        boxes.append((category,) + box)
    return img, boxes


# ------------------------------------------------------------------------------------------------- names
def _letter_names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique 10-letter lower-case names, like the real vehicle images."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        for row in rng.integers(0, 26, size=(n - len(names), 10)):
            name = "".join(chr(97 + int(c)) for c in row) + ".jpg"
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def _number_names(rng: np.random.Generator, n: int, low: int, high: int, fmt: str) -> list[str]:
    """``n`` unique names ``fmt.format(k)`` with k drawn from [low, high)."""
    if n > high - low:
        raise ValueError(f"cannot draw {n} unique names from a range of {high - low}")
    ks = low + rng.choice(high - low, size=n, replace=False)
    return [fmt.format(int(k)) for k in ks]


# ------------------------------------------------------------------------------------------------- relevance
def relevant_images(samples: Sequence[_Sample]) -> list[list[str]]:
    """For each sample as a query, the names of the samples relevant to it by the official rule, sorted.

    Equivalent to :func:`traffic_retrieval.categories.is_relevant` over all pairs, but grouped by string for
    vehicles and vectorised for pedestrians (same gender bit, the query's set bits a subset of the image's).
    """
    by_attr: dict[str, list[str]] = {}
    for smp in samples:
        by_attr.setdefault(smp.attribute, []).append(smp.name)
    ped = [smp for smp in samples if smp.category == "people"]
    codes = np.array([[v == "1" for v in smp.attribute.split(",")] for smp in ped], dtype=bool)
    codes = codes.reshape(len(ped), len(PEDESTRIAN_ATTRIBUTES))
    ped_index = {smp.name: i for i, smp in enumerate(ped)}
    ped_names = [smp.name for smp in ped]
    out = []
    for smp in samples:
        if smp.category == "people":
            q = codes[ped_index[smp.name]]
            ok = (codes[:, FEMALE_INDEX] == q[FEMALE_INDEX]) & ~np.any(q[None, :] & ~codes, axis=1)
            out.append(sorted(ped_names[k] for k in np.flatnonzero(ok)))
        else:
            out.append(sorted(by_attr[smp.attribute]))
    return out


# ------------------------------------------------------------------------------------------------- generation
def _split_counts(n: int) -> dict[str, int]:
    return {"car": n // 2, "people": n - n // 2}


def _coco(samples: Sequence[_Sample], image_dir: str) -> dict[str, Any]:
    images, annotations = [], []
    for i, smp in enumerate(samples, start=1):
        images.append({"id": i, "file_name": f"{image_dir}/{smp.name}", "width": smp.width, "height": smp.height})
        for cat, x, y, bw, bh in smp.boxes:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i, "category_id": COCO_ID[cat],
                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0,
            })
    return {"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}


def _make_split(
    split: str, names: dict[str, list[str]], style: str, rng: np.random.Generator, image_dir: Path,
    min_size: int, max_size: int, dirty_fraction: float, progress: tqdm,
) -> list[_Sample]:
    """Sample labels, draw and save the images of one split; vehicles first, then pedestrians."""
    samples: list[_Sample] = []
    for category in CATEGORIES:
        for name in names[category]:
            if category == "car":
                content: Any = _sample_vehicle(rng, style)
                attribute, caption = _vehicle_label(content, split, style, rng)
            else:
                content = _sample_pedestrian_bits(rng, style)
                attribute, caption = _pedestrian_label(content, style, rng)
            samples.append(_Sample(name, category, attribute, caption, content=content))
    if split != "test" and samples and dirty_fraction > 0:
        n_dirty = dirty_count(len(samples), dirty_fraction)
        for k, i in enumerate(sorted(rng.choice(len(samples), size=n_dirty, replace=False).tolist())):
            samples[i].dirty = ("empty", "wrong_category")[k % 2]
    image_dir.mkdir(parents=True, exist_ok=True)
    for smp in samples:
        img, smp.boxes = _render(smp.category, smp.content, style, rng, min_size, max_size, smp.dirty)
        smp.content = None
        smp.width, smp.height = img.size
        img.save(image_dir / smp.name, format="JPEG", quality=JPEG_QUALITY)
        progress.update(1)
    return samples


def dirty_count(n: int, dirty_fraction: float) -> int:
    """How many of a train or val split's ``n`` images are drawn dirty (the cleaning stage should drop them)."""
    return int(round(dirty_fraction * n))


def read_meta(root: str | os.PathLike) -> dict[str, Any] | None:
    """The ``meta.json`` of a dataset root, or None when there is none or it is not a JSON object."""
    try:
        meta = json.loads((Path(root) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable or not JSON: not a dataset of ours
        return None
    return meta if isinstance(meta, dict) else None


def is_demo_dataset(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a dataset this module generated (its ``meta.json`` names the generator): the only
    kind of folder that ``generate(force=True)`` and the demo replace or delete."""
    meta = read_meta(root)
    return meta is not None and meta.get("generator") == GENERATOR


def _prepare_out(out_dir: Path, force: bool) -> None:
    """Refuse an ``out_dir`` that holds anything but an earlier demo dataset, and that one unless ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not is_demo_dataset(out_dir):
        # --force must not become a way to delete a user's folder (a typo, the real dataset): only our own output
        raise FileExistsError(
            f"--out {out_dir} is not empty and holds no generated dataset (no meta.json written by {GENERATOR}); "
            "it is never replaced, not even with --force: choose a new or empty folder"
        )
    if not force:
        raise FileExistsError(f"--out {out_dir} exists and is not empty; pass --force to replace it")


def generate(
    out_dir: str | os.PathLike,
    seed: int = 0,
    style: str = "demo",
    n_train: int = DEFAULT_COUNTS["train"],
    n_val: int = DEFAULT_COUNTS["val"],
    n_test: int = DEFAULT_COUNTS["test"],
    min_size: int = 64,
    max_size: int = 128,
    dirty_fraction: float = DEFAULT_DIRTY_FRACTION,
    force: bool = False,
) -> dict[str, dict[str, int]]:
    """Generate the synthetic dataset under ``out_dir`` (layout in the module docstring).

    Args:
        out_dir: dataset root; must be missing or empty, or with ``force`` hold a dataset generated here earlier
            (which is then replaced; any other folder is refused).
        seed: random seed; the same arguments give byte-identical files.
        style: ``demo`` (learnable) or ``real`` (mirrors the real captions and their train/test mismatch).
        n_train, n_val, n_test: images per split, half vehicles (rounded down) and half pedestrians; 0 is allowed
            and gives an empty split.
        min_size, max_size: range of the long image side in pixels.
        dirty_fraction: share of train/val images whose picture does not match the label (no object, or the other
            category), for the cleaning stage to find; listed in ``meta.json``.
        force: replace an earlier generated dataset in ``out_dir``.

    Returns:
        Image counts, ``{"train": {"car": n, "people": n}, "val": {...}, "test": {...}}``.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    counts_in = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in counts_in.items():
        if n < 0:
            raise ValueError(f"n_{split} must be >= 0, got {n}")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if not 0.0 <= dirty_fraction <= 0.5:
        raise ValueError(f"dirty_fraction must be in [0, 0.5], got {dirty_fraction}")
    out_dir = Path(out_dir)
    _prepare_out(out_dir, force)

    rng = np.random.default_rng(seed)
    counts = {split: _split_counts(n) for split, n in counts_in.items()}
    n_tv = {cat: counts["train"][cat] + counts["val"][cat] for cat in CATEGORIES}
    car_tv = _letter_names(rng, n_tv["car"])
    ped_tv = _number_names(rng, n_tv["people"], 1, 90000, "{:06d}.jpg")  # PA-100K style; test uses 09xxxx
    names = {
        "train": {"car": car_tv[: counts["train"]["car"]], "people": ped_tv[: counts["train"]["people"]]},
        "val": {"car": car_tv[counts["train"]["car"]:], "people": ped_tv[counts["train"]["people"]:]},
        "test": {
            "car": sorted(_number_names(rng, counts["test"]["car"], 0, 10**7, "vehicle_{:07d}.jpg")),
            "people": sorted(_number_names(rng, counts["test"]["people"], 90000, 100000, "{:06d}.jpg")),
        },
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        splits: dict[str, list[_Sample]] = {}
        total = sum(counts_in.values())
        with tqdm(total=total, desc="demo images", unit="img", disable=total < 200) as progress:
            for split in SPLITS:
                root = tmp / ("test" if split == "test" else "train")
                splits[split] = _make_split(
                    split, names[split], style, rng, root / f"{split}_images", min_size, max_size, dirty_fraction,
                    progress,
                )
        _write_texts(tmp, splits, rng)
        colours, brands, types = vehicle_vocabulary(style)
        meta = {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "seed": seed,
            "style": style,
            "min_size": min_size,
            "max_size": max_size,
            "dirty_fraction": dirty_fraction,
            "counts": counts,
            "dirty": {split: {s.name: s.dirty for s in splits[split] if s.dirty} for split in ("train", "val")},
            "colours": list(colours),
            "brands": list(brands),
            "types": list(types),
            "pedestrian_attributes": list(DEMO_PEDESTRIAN_ATTRIBUTES if style == "demo" else PEDESTRIAN_ATTRIBUTES),
        }
        write_json(tmp / "meta.json", meta, indent=1)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s dataset to %s: %s", style, out_dir, counts)
    return counts


def _write_texts(root: Path, splits: dict[str, list[_Sample]], rng: np.random.Generator) -> None:
    """Label files, test queries (shuffled within category, vehicles first), ground truth, COCO boxes."""
    for split in ("train", "val"):
        write_label_file(root / "train" / f"{split}_label.txt",
                         [LabelRecord(s.name, s.attribute, s.caption) for s in splits[split]])
    test = splits["test"]
    relevant = relevant_images(test)
    order: list[int] = []
    for category in CATEGORIES:  # CATEGORIES starts with "car": vehicles first, as in the real test_text.txt
        idx = [i for i, s in enumerate(test) if s.category == category]
        order.extend(idx[j] for j in rng.permutation(len(idx)).tolist())
    write_text(root / "test" / "test_text.txt", "".join(test[i].caption + "\n" for i in order))
    write_ground_truth(root / "test" / "test_gt.txt", [(test[i].caption, relevant[i]) for i in order])
    write_label_file(root / "annotations" / "test_labels.txt",
                     [LabelRecord(s.name, s.attribute, s.caption) for s in test])
    for split, image_dir in (("train", "train_images"), ("val", "val_images"), ("test", "test_images")):
        write_json(root / "annotations" / f"{split}_boxes.json", _coco(splits[split], image_dir))


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished dataset into place; an old one is removed only after the new one is in."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
