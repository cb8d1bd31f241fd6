"""Per-image transforms over numpy arrays: orientation, intensity, resize/pad, boxes.

Plain functions with no Ray or torch dependency, shared by ``prepare`` (training shards) and by
inference, so training and production see identical pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

_MODALITY_ALIASES = {
    "CT": "CT",
    "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR",
    "T1GD": "MR", "T1CE": "MR", "ADC": "MR", "DWI": "MR", "CINE": "MR",
    "US": "US", "ULTRASOUND": "US",
    "PET": "PET", "PT": "PET",
    "XR": "XR", "CR": "XR", "DX": "XR", "X-RAY": "XR", "XRAY": "XR",
    "MG": "MG", "MAMMOGRAPHY": "MG",
    "ENDO": "ENDO", "ENDOSCOPY": "ENDO", "ES": "ENDO", "COLONOSCOPY": "ENDO",
    "DERM": "DERM", "DERMOSCOPY": "DERM",
    "FUNDUS": "FUNDUS", "OCT": "OCT",
    "PATH": "PATH", "PATHOLOGY": "PATH", "HISTOPATHOLOGY": "PATH", "SM": "PATH", "MICROSCOPY": "PATH",
}


def normalize_modality(name: str | None) -> str:
    """Canonical modality code: "MRI"/"T2"/"FLAIR" → "MR", "Ultrasound" → "US", unknown → upper case."""
    if name is None or str(name).strip() == "":
        return "UNKNOWN"
    key = str(name).strip().upper()
    return _MODALITY_ALIASES.get(key, key)


# --- orientation -----------------------------------------------------------------------------

def display_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """Slice ``index`` of a RAS-canonical volume along ``axis``, in radiological display order.

    Rows run posterior (axial) or inferior (coronal, sagittal) downward; columns run toward the
    patient's left (axial, coronal) or posterior (sagittal). The same flip-and-transpose holds
    for all three axes because both remaining RAS axes point the "wrong" way for display.
    """
    plane = volume[(slice(None),) * axis + (index,)]  # a view; np.take would copy
    return plane[::-1, ::-1].T


def undisplay_slice(plane: np.ndarray) -> np.ndarray:
    """Inverse of :func:`display_slice`'s reordering (display order → canonical plane)."""
    return plane.T[::-1, ::-1]


def display_spacing(spacing: Sequence[float], axis: int) -> tuple[float, float, float]:
    """(row, column, through-plane) spacing of a display slice cut along ``axis``."""
    a, b = [i for i in range(3) if i != axis]
    return float(spacing[b]), float(spacing[a]), float(spacing[axis])


# --- intensity -------------------------------------------------------------------------------

def window_to_uint8(values: np.ndarray, width: float, level: float) -> np.ndarray:
    """CT windowing: [level - width/2, level + width/2] HU → 0..255."""
    low = level - width / 2.0
    scaled = (values.astype(np.float32) - low) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def range_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and scale to 0..255 (a flat range maps to 0)."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def robust_range(
    volume: np.ndarray, percentiles: Sequence[float] = (0.5, 99.5), max_samples: int = 4_000_000
) -> tuple[float, float]:
    """Percentile range of a whole image or volume, from a regular subsample to bound memory."""
    flat = volume.reshape(-1)
    step = max(1, flat.size // max_samples)
    sample = np.asarray(flat[::step], dtype=np.float32)
    low, high = np.percentile(sample, [percentiles[0], percentiles[1]])
    return float(low), float(high)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) → (H, W, 3) by repeating the channel; (H, W, 3) passes through."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


# --- geometry --------------------------------------------------------------------------------

def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shape after scaling the longest side to ``size`` (aspect ratio kept, at least 1 pixel)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_pad(image: np.ndarray, size: int, nearest: bool = False, channels: int | None = None) -> np.ndarray:
    """Resize the longest side to ``size`` and zero-pad bottom/right to a ``size``² square.

    Images use bilinear interpolation (antialiased when shrinking), masks ``nearest=True``.
    Padding only at the bottom/right keeps pixel coordinates of the content unchanged.
    ``channels=3`` writes a grayscale image straight into an RGB output (no extra copy).
    """
    if image.dtype != np.uint8:
        raise TypeError(f"resize_pad expects uint8, got {image.dtype}")
    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, size)
    if (new_h, new_w) != (height, width):
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=resample))
    if channels is not None and image.ndim == 2:
        out = np.zeros((size, size, channels), np.uint8)
        out[:new_h, :new_w] = image[:, :, None]
        return out
    out = np.zeros((size, size) + image.shape[2:], np.uint8)
    out[:new_h, :new_w] = image
    return out


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Bounding box ``[x0, y0, x1, y1]`` of a mask's foreground in pixel edges (x1, y1 exclusive).

    An empty mask gives ``[0, 0, 0, 0]``.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return np.zeros(4, np.float32)
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


# --- model input -----------------------------------------------------------------------------

def resize_square(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """A stored square (uint8 image or mask) resized to the model's ``size``²."""
    if array.shape[0] == size and array.shape[1] == size:
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size, size), resample=resample))


def model_pixels(square: np.ndarray, size: int) -> np.ndarray:
    """A stored RGB (or grayscale) uint8 square → SAM3's input: float32 (3, size, size) in [-1, 1]
    (SAM3's mean and std are 0.5). Training, evaluation, predict and serve all call this."""
    image = resize_square(np.ascontiguousarray(square), size)
    if image.ndim == 2:  # a grayscale square: resizing one band equals resizing three equal ones
        image = image[:, :, None].repeat(3, axis=2)
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0
