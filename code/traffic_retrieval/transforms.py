"""Image transforms: the official BEiT-3 ones and the 4th-place solution's per-category training crops.

Eval (every stage that encodes a gallery): bicubic resize straight to a square (no crop, no aspect preservation),
then normalise with mean = std = 0.5, exactly as the official ``build_transform(is_train=False)``.

Train, by ``--train_crop``:
- ``official``: RandomResizedCrop(scale 0.5 to 1, bicubic) + horizontal flip (the official retrieval recipe);
- ``car``: RandomResizedCrop with scale 0.2 to 1 + flip (the 4th place's vehicle transform);
- ``people``: pad ``people_pad`` black pixels left and right, then a random resized crop (scale 0.5 to 1, aspect ratio
  3/4 to 4/3) whose horizontal offset is Binomial(W - w, 0.5) (so crops stay near the centre, where the pedestrian
  is; the vertical offset is uniform), + flip (the 4th place's pedestrian transform, :class:`CentreBiasedCrop`).
  With ``people_pad > 0`` the eval transform pads the same way, so train and test see the same framing.
- ``resize``: the eval resize + flip, no crop (for small from-scratch models on small images).
``randaug`` adds the official RandAugment (2 ops, magnitude 7 of 10, each applied with probability 0.5; bilinear
cv2 warps as ``beit3/randaug.py``).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import cv2
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
    """The 4th place's people crop (their ``XCenterResizeCropAndInterpolation``): a random resized crop, as
    torchvision's/timm's (area a uniform fraction ``scale`` of the image, aspect ratio log-uniform in ``ratio``, a
    centre crop after ``attempts`` misses), except that the horizontal offset is Binomial(W - w, 0.5): crops stay
    near the horizontal centre, where the pedestrian stands. The vertical offset stays uniform. Bicubic resize."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10) -> None:
        self.size, self.scale, self.ratio, self.attempts = size, scale, ratio, attempts

    @staticmethod
    def get_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                   attempts: int = 10) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a crop of a ``width`` x ``height`` image. Draws from ``random`` and
        ``np.random`` as the 4th place did; both are seeded per epoch and rank by training and per worker by
        the DataLoader, so a run is reproducible."""
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(attempts):
            target = random.uniform(*scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                return random.randint(0, height - h), int(np.random.binomial(width - w, 0.5)), h, w
        # No candidate fits (a very wide or tall image): the largest centred crop within the ratio range.
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            w, h = round(height * ratio[1]), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, h, w = self.get_params(*img.size, self.scale, self.ratio, self.attempts)
        return TF.resized_crop(img, top, left, h, w, [self.size, self.size], InterpolationMode.BICUBIC)


class RandAugment:
    """The RandAugment of the official BEiT-3 code (``beit3/randaug.py``, a copy of BLIP's): ``n`` ops drawn with
    replacement, each applied with probability 0.5 at magnitude ``m`` of 10.

    The geometric ops warp with ``cv2.warpAffine`` as the official code: its forward matrices (shears and
    translations about the top-left pixel, rotation about ``(W/2, H/2)``), bilinear, grey (128) outside. The
    photometric ops use PIL, whose output the official cv2 functions were written to reproduce.
    """

    OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
           "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    FILL = (128, 128, 128)

    def __init__(self, n: int = 2, m: int = 7) -> None:
        self.n, self.level = n, m / 10.0

    def _warp(self, img: Image.Image, matrix: np.ndarray) -> Image.Image:
        """``img`` through the official forward 2x3 affine ``matrix`` (cv2 pixel-centre coordinates)."""
        arr = np.asarray(img)
        out = cv2.warpAffine(arr, matrix.astype(np.float32), (arr.shape[1], arr.shape[0]),
                             flags=cv2.INTER_LINEAR, borderValue=self.FILL)
        return Image.fromarray(out)

    def _apply(self, img: Image.Image, op: str, sign: float | None = None) -> Image.Image:
        """Apply ``op`` at this magnitude; geometric ops take a random direction unless ``sign`` (+1/-1) is given."""
        lv = self.level
        if sign is None and op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            sign = -1.0 if random.random() > 0.5 else 1.0
        if op == "AutoContrast":
            return ImageOps.autocontrast(img)
        if op == "Equalize":
            return ImageOps.equalize(img)
        if op == "Brightness":
            return ImageEnhance.Brightness(img).enhance(lv * 1.8 + 0.1)
        if op == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(lv * 1.8 + 0.1)
        if op == "ShearX":
            return self._warp(img, np.array([[1, lv * 0.3 * sign, 0], [0, 1, 0]]))
        if op == "ShearY":
            return self._warp(img, np.array([[1, 0, 0], [lv * 0.3 * sign, 1, 0]]))
        if op == "TranslateX":  # lv * 10 pixels (translate_const 10), not a fraction of the size
            return self._warp(img, np.array([[1, 0, -lv * 10 * sign], [0, 1, 0]]))
        if op == "TranslateY":
            return self._warp(img, np.array([[1, 0, 0], [0, 1, -lv * 10 * sign]]))
        if op == "Rotate":
            w, h = img.size
            return self._warp(img, cv2.getRotationMatrix2D((w / 2, h / 2), lv * 30 * sign, 1.0))
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
