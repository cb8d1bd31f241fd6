"""NIfTI volumes and label maps (Medical Segmentation Decathlon / nnU-Net layout)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from medsam3.io.case import CaseError


def load_canonical(path: str | os.PathLike, channel: int | None = None, what: str = "image"):
    """Load a NIfTI file reoriented to RAS+ with ``nibabel.as_closest_canonical``.

    Returns ``(array, affine, zooms, (slope, intercept))``. The array keeps its stored dtype
    (scaling is returned, not applied) so a large int16 CT is not expanded to float64.
    """
    try:
        img = nib.load(os.fspath(path))
        raw = np.asanyarray(img.dataobj.get_unscaled())
    except Exception as exc:  # nibabel raises many types for truncated / corrupt files
        raise CaseError(f"{what} {os.fspath(path)!s}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    slope = float(img.dataobj.slope) if np.isfinite(img.dataobj.slope) and img.dataobj.slope != 0 else 1.0
    inter = float(img.dataobj.inter) if np.isfinite(img.dataobj.inter) else 0.0
    return canonical(raw, img.affine, path, channel, what) + ((slope, inter),)


def canonical(raw: np.ndarray, affine: np.ndarray, path: str | os.PathLike, channel: int | None = None,
              what: str = "image") -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """A volume in its file's voxel order with its RAS affine → ``(array, affine, zooms)`` in RAS+
    (any reader's volume: NIfTI, NRRD); a 4D volume needs ``channel``."""
    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim == 4:
        if channel is None:
            raise CaseError(
                f"{what} {os.fspath(path)}: 4D volume {raw.shape} and no channel configured (set channel=N)"
            )
        if not 0 <= channel < raw.shape[3]:
            raise CaseError(f"{what} {os.fspath(path)}: channel {channel} out of range for shape {raw.shape}")
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
