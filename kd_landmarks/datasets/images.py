"""Reading photos and cutting the stored face crop (paper Section 4.3: the box comes from the landmarks).

The stored crop is the square landmark box (:func:`kd_landmarks.coords.square_box_from_landmarks`) scaled by
:data:`STORED_CROP_SCALE`, resized to ``size`` pixels. Training then cuts its own randomly expanded box out of
this crop on the device, so the stored margin must exceed every expansion and rotation training uses: with
the default augmentation (box up to 1.1x, centre shift up to 0.05, rotation up to 45 degrees) the output's
corners reach 0.55 (cos 45 + sin 45) + 0.05 = 0.83 landmark-box sides from the centre, inside the 0.85 kept.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from kd_landmarks import coords
from kd_landmarks import errors

# The margin around the landmark box kept on disk (contract: docs/contracts.md, "Stored examples").
STORED_CROP_SCALE = 1.7
# Side of the stored crop for the real datasets, in pixels: the evaluation crop (1.05 of the landmark box)
# then spans 1.05 / 1.7 * 360 = 222 stored pixels, about the model's 224 px input.
STORED_CROP_SIZE = 360


class ImageReadError(errors.UserError, ValueError):
  """An image file that is missing or cannot be decoded."""


# PIL's 16-bit greyscale modes; convert("RGB") clips their values at 255 (an all-white face).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# A face crop may leave the photo by its margin, but the landmark box itself must be mostly inside it.
MIN_BOX_INSIDE = 0.5


def to_rgb8(image: Image.Image, *, source: str) -> np.ndarray:
  """A PIL image of any mode as uint8 RGB ``[H, W, 3]``, or ImageReadError naming ``source``.

  16-bit greyscale (PNG, TIFF) is scaled by 255/65535 (rounded), 32-bit integer images too when their
  values fit 16 bits; floating-point images have no defined range and are refused. Every other mode
  (greyscale, palette, RGBA, CMYK, YCbCr, 1-bit, 48-bit RGB which PIL reads as RGB) goes through PIL's
  conversion.
  """
  mode = image.mode
  if mode in _SIXTEEN_BIT_MODES or mode == "I":
    values = np.asarray(image).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise ImageReadError(
          f"{source}: a 32-bit integer image (mode {mode}) with values {values.min()}..{values.max()}, "
          "outside 16 bits; save it as an 8- or 16-bit PNG or JPEG")
    grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
  if mode == "F":
    raise ImageReadError(f"{source}: a floating-point image (mode F) has no defined pixel range; save it as "
                         "an 8- or 16-bit PNG or JPEG")
  try:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except ValueError as error:
    raise ImageReadError(f"{source}: cannot convert image mode {mode} to RGB ({error}); save it as an "
                         "8-bit RGB PNG or JPEG") from None


def unreadable_reason(path, error: OSError) -> str:
  """Why ``path`` cannot be opened, in words: a symbolic link to nothing says where it points."""
  if os.path.islink(path) and not os.path.exists(path):
    return f"a symbolic link to {os.readlink(path)}, which does not exist"
  return error.strerror or type(error).__name__


def read_image(path) -> np.ndarray:
  """Reads an image file as uint8 RGB ``[H, W, 3]`` (every mode converted by :func:`to_rgb8`)."""
  path = os.fspath(path)
  try:
    with Image.open(path) as image:
      return to_rgb8(image, source=path)
  except ImageReadError:
    raise
  except FileNotFoundError as error:
    raise ImageReadError(f"{path}: image file not found ({unreadable_reason(path, error)})") from None
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    raise ImageReadError(f"{path}: cannot decode the image ({error}); replace the file with the "
                         "official one (re-extract the archive)") from None


def as_rgb(image, *, source: str = "image") -> np.ndarray:
  """Validates an in-memory image and returns it as uint8 ``[H, W, 3]`` (``[H, W]`` greyscale is repeated)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ImageReadError(f"{source}: expected a uint8 image, got dtype {image.dtype}")
  if image.ndim == 2:
    image = np.repeat(image[:, :, None], 3, axis=2)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ImageReadError(f"{source}: expected an image of shape [H, W, 3] or [H, W], got {image.shape}")
  return image


def stored_crop_affine(landmarks_px, *, size: int, scale: float = STORED_CROP_SCALE) -> np.ndarray:
  """The ``[2, 3]`` affine mapping stored-crop pixels to original-image pixels, from the landmark box."""
  box = coords.square_box_from_landmarks(landmarks_px, scale=scale)
  if not box[2] > 0:
    raise errors.DataError(f"the landmarks span a zero-size box ({box.tolist()}); cannot crop a face from them")
  return coords.crop_affine(box, size)


def check_box_inside(landmarks_px, image_shape, *, source: str) -> None:
  """Refuses a face whose landmark box lies mostly outside the photo (less than ``MIN_BOX_INSIDE`` of
  its area inside): its stored crop would be mostly black padding, and its landmarks most likely belong to
  another image or are in another unit."""
  cx, cy, side = (float(v) for v in coords.square_box_from_landmarks(landmarks_px))
  height, width = image_shape[:2]
  # The photo spans [-0.5, W - 0.5] x [-0.5, H - 0.5] in the pixel-centre frame.
  inside_x = max(0.0, min(cx + side / 2, width - 0.5) - max(cx - side / 2, -0.5))
  inside_y = max(0.0, min(cy + side / 2, height - 0.5) - max(cy - side / 2, -0.5))
  fraction = inside_x * inside_y / (side * side) if side > 0 else 0.0
  if fraction < MIN_BOX_INSIDE:
    raise ImageReadError(
        f"{source}: the landmark box (centre {cx:.1f}, {cy:.1f}, side {side:.1f} px) lies mostly outside the "
        f"{width}x{height} photo ({100 * fraction:.0f}% inside); the landmarks do not fit this image: "
        "check its annotation file (wrong image, or coordinates not in pixels)")


def crop_face(image: np.ndarray, crop_to_original: np.ndarray, size: int) -> np.ndarray:
  """Cuts the axis-aligned square crop described by ``crop_to_original`` out of ``image``.

  Uses PIL's box resize, which filters in proportion to the scale (no aliasing when a large photo is
  shrunk to the stored size). The area outside the photo is black.
  """
  scale = float(crop_to_original[0, 0])
  if abs(crop_to_original[0, 1]) > 1e-9 or abs(crop_to_original[1, 0]) > 1e-9 or abs(
      crop_to_original[1, 1] - scale) > 1e-9 * max(1.0, scale):
    raise ValueError(f"crop_face needs an axis-aligned square crop affine, got {crop_to_original.tolist()}")
  height, width = image.shape[:2]
  # The crop's extent [-0.5, size - 0.5] in its pixel-centre frame, mapped to the photo and then shifted by
  # +0.5 into PIL's pixel-corner frame.
  left = crop_to_original[0, 2] - 0.5 * scale + 0.5
  top = crop_to_original[1, 2] - 0.5 * scale + 0.5
  side = scale * size
  # PIL's box must lie inside the image: pad just enough black border (integers keep the geometry exact).
  pad_left = max(0, int(np.ceil(-left)))
  pad_top = max(0, int(np.ceil(-top)))
  pad_right = max(0, int(np.ceil(left + side - width)))
  pad_bottom = max(0, int(np.ceil(top + side - height)))
  if pad_left or pad_top or pad_right or pad_bottom:
    padded = np.zeros((height + pad_top + pad_bottom, width + pad_left + pad_right, 3), np.uint8)
    padded[pad_top:pad_top + height, pad_left:pad_left + width] = image
    image = padded
  box = (left + pad_left, top + pad_top, left + pad_left + side, top + pad_top + side)
  # Clamp rounding noise at the borders: PIL rejects a box a hair outside the image.
  box = (max(0.0, box[0]), max(0.0, box[1]), min(float(image.shape[1]), box[2]),
         min(float(image.shape[0]), box[3]))
  resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box)
  return np.asarray(resized, dtype=np.uint8)


def encode_image(image: np.ndarray, encoding: str) -> bytes:
  """Encodes uint8 ``[H, W, 3]`` as ``'jpeg'`` (quality 95) or ``'png'`` bytes with PIL (no TensorFlow)."""
  buffer = io.BytesIO()
  if encoding == "jpeg":
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
  elif encoding == "png":
    Image.fromarray(image).save(buffer, format="PNG")
  else:
    raise ValueError(f"unknown image encoding {encoding!r}; choose from ['jpeg', 'png']")
  return buffer.getvalue()


def as_str(value) -> str:
  """An image id (str, bytes, or a numpy scalar or 0-d array of either) as str."""
  value = np.asarray(value).item() if not isinstance(value, (str, bytes)) else value
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
