"""Segmentation metrics on binary numpy masks (2D or 3D): Dice, IoU, NSD and HD95.

Surfaces and distances follow MONAI's definitions (the reference the tests compare against):
a mask's surface is its voxels that a binary erosion removes (the array border counts as
outside), and distances are Euclidean in millimetres using the voxel spacing.

Empty masks (MONAI returns NaN or inf there; a report needs a number):
- both empty: Dice = IoU = NSD = 1 and HD95 = 0 (a correct "absent");
- one empty: Dice = IoU = NSD = 0 and HD95 = inf (reports count inf separately; means
  are taken over finite values).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool, copy=False), np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, gt).sum()) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred, gt = _pair(pred, gt)
    union = int(np.logical_or(pred, gt).sum())
    return 1.0 if union == 0 else int(np.logical_and(pred, gt).sum()) / union


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)[:ndim]
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} does not fit a {ndim}D mask")
    return spacing


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None):
    """(distances from pred's surface voxels to gt's surface, and from gt's to pred's), in mm.

    Computed inside the union's bounding box plus one voxel: every surface voxel lies there,
    so the distances are exact and a small structure in a large volume stays cheap.
    """
    pred, gt = _pair(pred, gt)
    spacing = _spacing(spacing, pred.ndim)
    where = np.argwhere(pred | gt)
    if where.size == 0:
        return np.zeros(0), np.zeros(0)
    low, high = where.min(0), where.max(0) + 1
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    # one voxel of background around the box: erosion treats the box edge like the array edge
    pred, gt = np.pad(pred[box], 1), np.pad(gt[box], 1)
    edges_pred = pred ^ ndimage.binary_erosion(pred)
    edges_gt = gt ^ ndimage.binary_erosion(gt)
    if not edges_pred.any() or not edges_gt.any():
        return np.zeros(0), np.zeros(0)
    to_gt = ndimage.distance_transform_edt(~edges_gt, sampling=spacing)[edges_pred]
    to_pred = ndimage.distance_transform_edt(~edges_pred, sampling=spacing)[edges_gt]
    return to_gt, to_pred


def _empty_case(pred: np.ndarray, gt: np.ndarray) -> dict[str, float] | None:
    if pred.any() and gt.any():
        return None
    if not pred.any() and not gt.any():
        return {"nsd": 1.0, "hd95": 0.0}
    return {"nsd": 0.0, "hd95": float("inf")}


def _nsd(to_gt: np.ndarray, to_pred: np.ndarray, tolerance_mm: float) -> float:
    within = (to_gt <= tolerance_mm).sum() + (to_pred <= tolerance_mm).sum()
    return float(within / (to_gt.size + to_pred.size))


def _hd95(to_gt: np.ndarray, to_pred: np.ndarray) -> float:
    return float(max(np.percentile(to_gt, 95), np.percentile(to_pred, 95)))


def nsd(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, tolerance_mm: float = 1.0) -> float:
    """Normalized surface Dice: the share of both surfaces within ``tolerance_mm`` of the other."""
    pred, gt = _pair(pred, gt)
    empty = _empty_case(pred, gt)
    return empty["nsd"] if empty else _nsd(*surface_distances(pred, gt, spacing), tolerance_mm)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th percentile Hausdorff distance in mm (the larger of the two directed percentiles)."""
    pred, gt = _pair(pred, gt)
    empty = _empty_case(pred, gt)
    return empty["hd95"] if empty else _hd95(*surface_distances(pred, gt, spacing))


def all_metrics(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None,
                tolerance_mm: float = 1.0) -> dict[str, float]:
    """Dice, IoU, NSD and HD95 of one mask pair (the surfaces are found once)."""
    pred, gt = _pair(pred, gt)
    out = {"dice": dice(pred, gt), "iou": iou(pred, gt)}
    empty = _empty_case(pred, gt)
    if empty:
        return out | empty
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    return out | {"nsd": _nsd(to_gt, to_pred, tolerance_mm), "hd95": _hd95(to_gt, to_pred)}
