import numpy as np
import pytest

from medsam3.transforms import (
    display_slice,
    display_spacing,
    mask_to_box,
    normalize_modality,
    range_to_uint8,
    resize_pad,
    robust_range,
    undisplay_slice,
    window_to_uint8,
)


def test_window_maps_edges_and_level():
    hu = np.array([-2000, -160, 40, 240, 3000], np.int16)
    assert window_to_uint8(hu, 400, 40).tolist() == [0, 0, 128, 255, 255]
    lung = window_to_uint8(np.array([-1350, -600, 150]), 1500, -600)
    assert lung.tolist() == [0, 128, 255]


def test_range_and_robust_percentiles():
    values = np.arange(1000, dtype=np.float32)
    low, high = robust_range(values, (0.5, 99.5))
    assert low == pytest.approx(np.percentile(values, 0.5), abs=1e-3)
    assert high == pytest.approx(np.percentile(values, 99.5), abs=1e-3)
    assert range_to_uint8(np.array([low - 5, low, high, high + 5]), low, high).tolist() == [0, 0, 255, 255]
    assert range_to_uint8(np.ones(3), 1.0, 1.0).tolist() == [0, 0, 0]


def test_resize_pad_keeps_geometry():
    mask = np.zeros((100, 50), np.uint8)
    mask[10:30, 5:15] = 1  # 20 x 10 rectangle
    out = resize_pad(mask, 200, nearest=True)
    assert out.shape == (200, 200)
    assert out[:, 100:].sum() == 0 and out[200 // 1 - 1:, :].sum() == 0  # padded region empty
    assert out.sum() == 20 * 10 * 4  # exact x2 scale
    assert mask_to_box(out).tolist() == [10, 20, 30, 60]
    rgb = resize_pad(np.full((10, 20, 3), 7, np.uint8), 40)
    assert rgb.shape == (40, 40, 3) and rgb[:20].min() == 7 and rgb[20:].max() == 0


def test_box_of_empty_mask_is_zero():
    assert mask_to_box(np.zeros((5, 5), np.uint8)).tolist() == [0, 0, 0, 0]


def test_display_slice_radiological_view():
    # RAS volume: mark the patient's right (high x) and anterior (high y) corner of slice 2.
    vol = np.zeros((4, 3, 5), np.uint8)
    vol[3, 2, 2] = 1
    plane = display_slice(vol, 2, 2)
    assert plane.shape == (3, 4)  # rows = y, cols = x
    assert plane[0, 0] == 1  # anterior at the top, patient's right on the viewer's left
    assert np.array_equal(undisplay_slice(plane), vol[:, :, 2])
    assert display_spacing((0.5, 0.7, 3.0), 2) == (0.7, 0.5, 3.0)
    assert display_spacing((0.5, 0.7, 3.0), 0) == (3.0, 0.7, 0.5)


def test_modality_names():
    assert [normalize_modality(m) for m in ("CT", "MRI", "t2", "Ultrasound", None, "weird")] == [
        "CT", "MR", "MR", "US", "UNKNOWN", "WEIRD"]
