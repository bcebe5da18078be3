"""``DinoPredictor``: Detectron2's ``DefaultPredictor`` that accepts more image formats
(:func:`to_bgr_uint8`) and refuses images too small for the model."""

import numpy as np
from detectron2.engine import DefaultPredictor

__all__ = ["DinoPredictor", "MIN_RESIZED_SIDE", "to_bgr_uint8"]

# Both sides of the resized network input must have at least one stride-32 feature cell.
MIN_RESIZED_SIDE = 32


def to_bgr_uint8(image: np.ndarray) -> np.ndarray:
    """The (H, W, 3) uint8 BGR image ``DefaultPredictor`` expects, from any of:

    * layout: (H, W) or (H, W, 1) grayscale (replicated to 3 channels), (H, W, 3) BGR,
      (H, W, 4) BGRA (alpha dropped);
    * dtype: uint8 as is; uint16 divided by 257 (65535 -> 255); float with all values in
      [0, 1] multiplied by 255, float in [0, 255] as is (rounded).

    Raises ``TypeError`` / ``ValueError`` saying what was given and what is needed for anything
    else: another layout or dtype, an empty image, NaN / Inf or out-of-range float values.
    """
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image as a numpy array (H, W, 3) BGR, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"image of shape {image.shape}: expected (H, W) or (H, W, 1) grayscale, (H, W, 3) BGR or (H, W, 4) BGRA"
        )
    if image.size == 0:
        raise ValueError(f"empty image of shape {image.shape}: expected at least one pixel")
    image = image[:, :, :3] if image.shape[2] == 4 else image
    if image.dtype == np.uint16:
        image = image.astype(np.float32) / 257.0
    elif np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ValueError(f"image has {int((~np.isfinite(image)).sum())} NaN/Inf values; expected finite pixels")
        low, high = float(image.min()), float(image.max())
        if low < 0 or high > 255:
            raise ValueError(f"float image with values in [{low:g}, {high:g}]: expected [0, 1] or [0, 255]")
        image = image * 255.0 if high <= 1 else image
    elif image.dtype != np.uint8:
        raise ValueError(f"image of dtype {image.dtype}: expected uint8, uint16 or float")
    image = np.rint(image).astype(np.uint8) if image.dtype != np.uint8 else image
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


class DinoPredictor(DefaultPredictor):
    """Detectron2's ``DefaultPredictor`` (same config, weights and output) whose input may be
    any image :func:`to_bgr_uint8` converts; an image that the test-time resize
    (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) would shrink below ``MIN_RESIZED_SIDE``
    pixels on a side is refused with its size."""

    def __call__(self, original_image: np.ndarray):
        image = to_bgr_uint8(original_image)
        h, w = image.shape[:2]
        short, longest = self.aug.short_edge_length[0], self.aug.max_size
        size = self.aug.get_output_shape(h, w, short, longest) if short else (h, w)
        if min(size) < MIN_RESIZED_SIDE:
            raise ValueError(
                f"image of {h}x{w} pixels is too small or too elongated: resized for the model (INPUT.MIN_SIZE_TEST "
                f"{short}, MAX_SIZE_TEST {longest}) it becomes {size[0]}x{size[1]}; both sides must be at least "
                f"{MIN_RESIZED_SIDE} pixels"
            )
        return super().__call__(image)
