"""Image transforms: the official BEiT-3 ones and the 4th-place solution's per-category training crops.

Eval (every stage that encodes a gallery): bicubic resize straight to a square (no crop, no aspect preservation),
then normalise with mean = std = 0.5, exactly as the official ``build_transform(is_train=False)``.

Train, by ``--train_crop``:
- ``official``: RandomResizedCrop(scale 0.5 to 1, bicubic) + horizontal flip (the official retrieval recipe);
- ``car``: RandomResizedCrop with scale 0.2 to 1 + flip (the 4th place's vehicle transform);
- ``people``: pad ``people_pad`` black pixels left and right, then a crop of scale 0.5 to 1 whose horizontal offset is
  drawn from a binomial (so crops stay near the centre, where the pedestrian is), + flip (the 4th place's pedestrian
  transform). With ``people_pad > 0`` the eval transform pads the same way, so train and test see the same framing.
- ``resize``: the eval resize + flip, no crop (for small from-scratch models on small images).
``randaug`` adds the official RandAugment (2 ops, magnitude 7 of 10, each applied with probability 0.5).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

MEAN = STD = (0.5, 0.5, 0.5)  # timm IMAGENET_INCEPTION_MEAN / STD, used by BEiT-3
TRAIN_CROPS = ("official", "car", "people", "resize")


class PadSides:
    """Pad black pixels on the left and right of a PIL image."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, img: Image.Image) -> Image.Image:
        return TF.pad(img, [self.pad, 0, self.pad, 0], fill=0) if self.pad > 0 else img


class CentreBiasedCrop:
    """Random crop of scale ``scale`` whose offsets are binomially distributed around the centre, resized."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0), trials: int = 10) -> None:
        self.size, self.scale, self.trials = size, scale, trials

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        area = random.uniform(*self.scale)
        cw, ch = max(1, round(w * math.sqrt(area))), max(1, round(h * math.sqrt(area)))
        # Binomial(n, 0.5) / n has mean 0.5 and concentrates around it: the crop rarely cuts off the centre.
        left = round((w - cw) * np.random.binomial(self.trials, 0.5) / self.trials)
        top = round((h - ch) * np.random.binomial(self.trials, 0.5) / self.trials)
        return TF.resized_crop(img, top, left, ch, cw, [self.size, self.size], InterpolationMode.BICUBIC)


class RandAugment:
    """The RandAugment of the official BEiT-3 code (a copy of BLIP's): ``n`` ops drawn with replacement, each
    applied with probability 0.5 at magnitude ``m`` of 10; geometric ops fill with grey (128)."""

    OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
           "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    FILL = (128, 128, 128)

    def __init__(self, n: int = 2, m: int = 7) -> None:
        self.n, self.level = n, m / 10.0

    def _sign(self) -> float:
        return -1.0 if random.random() > 0.5 else 1.0

    def _apply(self, img: Image.Image, op: str) -> Image.Image:
        lv = self.level
        if op == "AutoContrast":
            return ImageOps.autocontrast(img)
        if op == "Equalize":
            return ImageOps.equalize(img)
        if op == "Brightness":
            return ImageEnhance.Brightness(img).enhance(lv * 1.8 + 0.1)
        if op == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(lv * 1.8 + 0.1)
        if op in ("ShearX", "ShearY"):
            s = math.degrees(math.atan(lv * 0.3 * self._sign()))
            shear = [s, 0.0] if op == "ShearX" else [0.0, s]
            return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, fill=list(self.FILL))
        if op in ("TranslateX", "TranslateY"):
            t = round(lv * 10 * self._sign())  # pixels, as in the official code
            return TF.affine(img, angle=0.0, translate=[t, 0] if op == "TranslateX" else [0, t], scale=1.0,
                             shear=[0.0, 0.0], fill=list(self.FILL))
        if op == "Rotate":
            return TF.rotate(img, lv * 30 * self._sign(), fill=list(self.FILL))
        return img  # Identity

    def __call__(self, img: Image.Image) -> Image.Image:
        for op in random.choices(self.OPS, k=self.n):
            if random.random() < 0.5:
                img = self._apply(img, op)
        return img


def eval_transform(input_size: int, people_pad: int = 0) -> Callable[[Image.Image], torch.Tensor]:
    """Bicubic resize to ``input_size`` square, to tensor, normalise (optionally after the people side padding)."""
    return T.Compose([
        PadSides(people_pad),
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def train_transform(input_size: int, crop: str = "official", randaug: bool = False,
                    people_pad: int = 70) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform by crop policy (see the module docstring)."""
    if crop not in TRAIN_CROPS:
        raise ValueError(f"unknown train crop {crop!r}; choose one of {TRAIN_CROPS}")
    if crop == "people":
        ops: list = [PadSides(people_pad), CentreBiasedCrop(input_size, scale=(0.5, 1.0))]
    elif crop == "resize":  # no crop at all: keeps small attributes (a hat, a bag) that a random crop can cut off
        ops = [T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC)]
    else:
        scale = (0.2, 1.0) if crop == "car" else (0.5, 1.0)
        ops = [T.RandomResizedCrop(input_size, scale=scale, interpolation=InterpolationMode.BICUBIC)]
    ops.append(T.RandomHorizontalFlip())
    if randaug:
        ops.append(RandAugment(2, 7))
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)
