"""medsam3.metrics against MONAI's DiceMetric, MeanIoU, SurfaceDiceMetric and HausdorffDistanceMetric."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric
from PIL import Image
from scipy import ndimage

from medsam3.io.npz import load_npz
from medsam3.metrics import all_metrics, dice, hd95, iou, nsd
from tests.builders import SAMMED2D, SHARED


def monai_reference(pred: np.ndarray, gt: np.ndarray, spacing, tolerance: float) -> dict[str, float]:
    as_onehot = [torch.from_numpy(np.stack([~m, m])[None].astype(np.float32)) for m in (pred, gt)]
    y_pred, y = as_onehot
    spacing = list(spacing)
    return {
        "dice": DiceMetric(include_background=False)(y_pred, y).item(),
        "iou": MeanIoU(include_background=False)(y_pred, y).item(),
        "nsd": SurfaceDiceMetric([tolerance], include_background=False)(y_pred, y, spacing=spacing).item(),
        "hd95": HausdorffDistanceMetric(include_background=False, percentile=95)(y_pred, y, spacing=spacing).item(),
    }


def random_blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 10)
    return noise > np.quantile(noise, rng.uniform(0.6, 0.9))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape,spacing", [((64, 80), (0.7, 1.3)), ((40, 48, 24), (0.8, 0.8, 2.5))])
def test_random_masks_match_monai(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    gt = random_blob(rng, shape)
    pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(0, 3))) ^ (random_blob(rng, shape) & gt)
    pred &= ~random_blob(rng, shape) | gt  # misses and false positives, some touching the border
    assert gt.any() and pred.any()
    got = all_metrics(pred, gt, spacing, tolerance_mm=2.0)
    want = monai_reference(pred, gt, spacing, 2.0)
    for key in ("dice", "iou", "nsd", "hd95"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["dice"] == pytest.approx(dice(pred, gt)) and got["hd95"] == pytest.approx(hd95(pred, gt, spacing))
    assert got["iou"] == pytest.approx(iou(pred, gt)) and got["nsd"] == pytest.approx(nsd(pred, gt, spacing, 2.0))


def test_real_masks_match_monai():
    """A real liver mask against a shifted, eroded copy (2D), and a real 3D lesion against its dilation."""
    liver = np.asarray(Image.open(SAMMED2D / "masks" / "amos_0004_75_liver_000.png")) > 0
    pred = np.roll(ndimage.binary_erosion(liver, iterations=3), (4, -6), axis=(0, 1))
    got, want = all_metrics(pred, liver, (0.78, 0.78), 1.5), monai_reference(pred, liver, (0.78, 0.78), 1.5)
    assert got == pytest.approx(want, rel=1e-5)
    assert 0.5 < got["dice"] < 0.99 and got["hd95"] > 4 * 0.78

    case = load_npz(sorted((SHARED / "medsam2-recist-ct").glob("*.npz"))[0])
    lesion = case["gts"] > 0
    zyx_spacing = tuple(float(s) for s in case["spacing"][::-1])  # gts is (D, H, W); spacing is (x, y, z)
    pred = ndimage.binary_dilation(lesion, iterations=2)
    got, want = all_metrics(pred, lesion, zyx_spacing, 2.0), monai_reference(pred, lesion, zyx_spacing, 2.0)
    assert got == pytest.approx(want, rel=1e-5)


def test_hand_computed_values():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True  # 100 pixels
    pred = np.zeros_like(gt)
    pred[5:15, 8:18] = True  # shifted 3 columns: overlap 70
    assert dice(pred, gt) == pytest.approx(0.7)
    assert iou(pred, gt) == pytest.approx(70 / 130)
    # each surface is 3 columns away from the other at most: HD95 in mm scales with the spacing
    assert hd95(pred, gt, (1.0, 2.0)) == pytest.approx(6.0)
    assert nsd(pred, gt, (1.0, 2.0), tolerance_mm=6.0) == 1.0
    assert nsd(pred, gt, (1.0, 2.0), tolerance_mm=0.5) < 1.0


def test_empty_mask_conventions():
    empty, some = np.zeros((8, 8, 4), bool), np.zeros((8, 8, 4), bool)
    some[2:5, 2:5, 1:3] = True
    assert all_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}
    for pred, gt in ((empty, some), (some, empty)):
        got = all_metrics(pred, gt)
        assert got["dice"] == got["iou"] == got["nsd"] == 0.0 and math.isinf(got["hd95"])
    with pytest.raises(ValueError, match="shape"):
        dice(some, some[..., :2])
