"""NIfTI volumes and label maps (Medical Segmentation Decathlon / nnU-Net layout)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from medsam3.io.case import CaseError


def load_canonical(path: str | os.PathLike, channel: int | None = None, what: str = "image"):
    """Load a NIfTI file reoriented to RAS+ with ``nibabel.as_closest_canonical``.

    Returns ``(array, affine, zooms, (slope, intercept))``. The array keeps its stored dtype
    (scaling is returned, not applied) so a large int16 CT is not expanded to float64. Of a 4D
    volume only ``channel`` is read, through nibabel's proxy (the other channels are never decoded).
    """
    try:
        img = nib.load(os.fspath(path))
        slope = float(img.dataobj.slope) if np.isfinite(img.dataobj.slope) and img.dataobj.slope != 0 else 1.0
        inter = float(img.dataobj.inter) if np.isfinite(img.dataobj.inter) else 0.0
        shape = squeezed(img.shape)
        if len(shape) == 4:
            check_channel(path, shape, channel, what)
            # the proxy applies the scaling to what it reads
            raw = np.asanyarray(img.dataobj[(slice(None),) * 3 + (channel,) + (0,) * (len(img.shape) - 4)])
            slope, inter, channel = 1.0, 0.0, None
        else:
            raw = np.asanyarray(img.dataobj.get_unscaled())
    except CaseError:
        raise
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise CaseError(f"{what} {os.fspath(path)!s}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    return canonical(raw, img.affine, path, channel, what) + ((slope, inter),)


def squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A volume's shape without trailing axes of length 1 past the third."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_channel(path: str | os.PathLike, shape: tuple[int, ...], channel: int | None, what: str = "image") -> None:
    """A 4D volume is read one channel at a time: the configured one, which must exist."""
    if channel is None:
        raise CaseError(f"{what} {os.fspath(path)}: 4D volume {tuple(shape)} and no channel configured (set channel=N)")
    if not 0 <= channel < shape[3]:
        raise CaseError(f"{what} {os.fspath(path)}: channel {channel} out of range for shape {tuple(shape)}")


def canonical(raw: np.ndarray, affine: np.ndarray, path: str | os.PathLike, channel: int | None = None,
              what: str = "image") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A volume in its file's voxel order with its RAS affine → ``(array, affine, zooms)`` in RAS+
    (any reader's volume: NIfTI, NRRD); a 4D volume needs ``channel``."""
    raw = raw.reshape(squeezed(raw.shape))
    if raw.ndim == 4:
        check_channel(path, raw.shape, channel, what)
        raw = raw[..., channel]
    if raw.ndim != 3:
        raise CaseError(f"{what} {os.fspath(path)}: expected a 3D volume, got shape {raw.shape}")
    image = nib.as_closest_canonical(nib.Nifti1Image(raw, affine))
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return np.asanyarray(image.dataobj), image.affine, zooms


def load_label_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A canonical integer label map and its affine; non-integer values are an error."""
    data, affine, _, (slope, inter) = load_canonical(path, what="label map")
    if (slope, inter) != (1.0, 0.0):
        data = data * slope + inter
    if not np.issubdtype(data.dtype, np.integer) and not (
        np.all(np.isfinite(data)) and np.all(data == np.rint(data))
    ):
        raise CaseError(f"label map {os.fspath(path)}: values are not integers")
    if data.min() < 0 or data.max() > np.iinfo(np.uint16).max:
        raise CaseError(f"label map {os.fspath(path)}: label values outside 0..65535")
    dtype = np.uint8 if data.max() <= 255 else np.uint16
    return np.ascontiguousarray(data, dtype=dtype), affine
