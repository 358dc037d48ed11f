"""Image loading shared by every stage, and the check that decides whether a file is usable.

Images are decoded by content, not by extension, so a PNG saved as ``.jpg`` is fine; CMYK, grayscale and palette
images are accepted and converted to RGB. No EXIF rotation is applied, like torchvision's ``default_loader`` that the
official BEiT-3 code uses, so training and inference see the same pixels as the original pipeline.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file cannot be used; the message names the file and the reason."""


def _decode(path: Path) -> Image.Image:
    """Fully decode ``path`` into an RGB image; raises ImageReadError with a short reason."""
    if not path.exists():
        raise ImageReadError("missing")
    if not path.is_file():
        raise ImageReadError("not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError("empty file")
    try:
        with warnings.catch_warnings():
            # PIL only warns about some damaged files (e.g. bad EXIF); treat the file as readable then.
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()  # decodes every byte: a truncated JPEG fails here, not later in a DataLoader worker
                return im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageReadError("unreadable (not an image format PIL knows)") from None
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise ImageReadError(f"truncated ({msg})") from None
        raise ImageReadError(f"unreadable ({msg})") from None
    except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"unreadable ({e})") from None


def check_image(path: str | os.PathLike) -> str | None:
    """None if ``path`` is a usable image, else the reason (``missing``, ``empty file``, ``truncated (...)``, ...).

    No size check: PIL refuses a header with a zero width or height when it opens the file ("unreadable").
    """
    try:
        _decode(Path(path))
    except ImageReadError as e:
        return str(e)
    return None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Load an image as RGB.

    Raises:
        ImageReadError: the file is missing or cannot be decoded; the message is ``"<path>: <reason>"``.
    """
    try:
        return _decode(Path(path))
    except ImageReadError as e:
        raise ImageReadError(f"{path}: {e}") from None
