"""Reading dataset images the way Detectron2 does (PIL, EXIF orientation applied), with
16-bit images scaled to 8 bit instead of saturated."""

import numpy as np
from detectron2.data.detection_utils import _apply_exif_orientation, convert_PIL_to_numpy
from PIL import Image

__all__ = ["open_image", "read_image"]

# PIL modes of single-channel images with more than 8 bits ("I" is how Pillow opens 16-bit PNGs).
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_image(file_name: str) -> Image.Image:
    """The fully decoded image with its EXIF orientation applied (as Detectron2's
    ``read_image``); a truncated or corrupt file raises here (``OSError`` or PIL's error)."""
    with open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
    image = _apply_exif_orientation(image)
    if image.mode in _WIDE_GRAY_MODES:
        # 16-bit range -> 8 bit (PIL's convert("RGB") would clip every value above 255).
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return image


def read_image(file_name: str, format: str = "RGB") -> np.ndarray:
    """(H, W, 3) uint8 image in Detectron2 ``format`` ("RGB" or "BGR"): grayscale, palette
    and RGBA images are converted, 16-bit images scaled (65535 -> 255), EXIF orientation
    applied (so the size matches Detectron2's ``read_image``)."""
    return convert_PIL_to_numpy(open_image(file_name), format)
