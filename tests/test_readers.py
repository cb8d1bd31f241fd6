"""Every input layout, on real data: the NPZ CT volumes, and NIfTI / DICOM+SEG copies of them.

The NIfTI and DICOM copies hold Hounsfield units (the inverse of the soft-tissue window the NPZ
was stored with) in other orientations and file orders; preparing them must give the NPZ's
pixels and masks back, slice for slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsam3.config import load_config
from medsam3.io import CaseError, discover, read_case
from medsam3.io.npz import to_canonical
from medsam3.samples import case_rows
from medsam3.transforms import resize_pad, resized_shape
from medsam3.vocab import Vocabulary
from preprocessing.prepare import plans_for
from tests.builders import (
    SAMMED2D,
    load_recist,
    reorient,
    uint8_to_hu,
    write_ct_series,
    write_msd_dataset,
    write_seg,
)

SIZE = 256


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.from_file()


def cfg(**kw):
    return load_config("prepare", [f"{k}={v}" for k, v in {"image_size": SIZE, **kw}.items()])


def rows_of(folder, config, vocab):
    refs, _ = discover(folder, config, vocab)
    return {ref.case_id: list(case_rows(read_case(ref, config), config, plans_for(config))) for ref in refs}


def by_slice(rows):
    return {(r["slice_index"], r["label"]): r for r in rows}


@pytest.fixture(scope="module")
def recist():
    return load_recist()


@pytest.fixture(scope="module")
def npz_rows(recist, vocab):
    rows = rows_of(Path(load_recist.__globals__["RECIST"]), cfg(empty_fraction=1.0), vocab)
    return rows[recist["name"]]


def test_npz_medsam2_layout(recist, npz_rows):
    imgs, gts = recist["imgs"], recist["gts"]
    positive = [r for r in npz_rows if r["area"] > 0]
    assert {r["slice_index"] for r in positive} == {k for k in range(len(gts)) if gts[k].any()}
    assert len(npz_rows) == len(gts)  # empty_fraction=1: every slice has a row
    for row in positive:
        k = row["slice_index"]
        # stored image is the stored slice, resized: alignment of image and mask is the NPZ's own
        assert np.array_equal(row["image"][..., 0], resize_pad(imgs[k], SIZE))
        assert np.array_equal(row["mask"], resize_pad(gts[k], SIZE, nearest=True))
        scale = (SIZE / 512) ** 2
        assert abs(row["area"] - gts[k].sum() * scale) <= 0.1 * gts[k].sum() * scale + 4
        assert row["prompt"] == "lesion" and row["modality"] == "CT" and row["num_slices"] == len(gts)
        assert row["spacing"] == pytest.approx([recist["spacing"][1] * 2, recist["spacing"][0] * 2, 5.0], rel=1e-5)
        x0, y0, x1, y1 = row["box"].astype(int)
        assert row["mask"][y0:y1, x0:x1].sum() == row["area"]


@pytest.mark.parametrize("axcodes", ["LPS", "PIR", "SAL"])
def test_nifti_msd_layout_any_orientation_matches_npz(tmp_path, recist, npz_rows, vocab, axcodes):
    canonical = to_canonical(uint8_to_hu(recist["imgs"]))
    labels = to_canonical(recist["gts"])
    affine = np.diag([*recist["spacing"], 1.0])
    image, aff = reorient(canonical, affine, axcodes)
    label, _ = reorient(labels, affine, axcodes)
    write_msd_dataset(tmp_path / "msd", {"case1": (image, label, aff)}, {1: "lesion"})
    rows = rows_of(tmp_path / "msd", cfg(empty_fraction=1.0), vocab)["case1"]
    assert_same_rows(rows, npz_rows)
    assert rows[0]["dataset"] == "TestMSD"


def test_dicom_series_with_seg_matches_npz(tmp_path, recist, npz_rows, vocab):
    datasets = write_ct_series(tmp_path / "dcm" / "patient" / "series", uint8_to_hu(recist["imgs"]),
                               recist["spacing"], shuffle_seed=3)
    write_seg(tmp_path / "dcm" / "patient" / "seg" / "seg.dcm", datasets, {"lesion": recist["gts"]})
    config = cfg(empty_fraction=1.0)
    refs, rejected = discover(tmp_path / "dcm", config, vocab)
    assert len(refs) == 1 and rejected == []
    assert refs[0].case_id.startswith("dcm-") and datasets[0].SeriesInstanceUID not in refs[0].case_id
    case = read_case(refs[0], config)
    assert case.image.dtype == np.float32 and case.image.min() == -160.0  # rescale applied: HU
    assert_same_rows(list(case_rows(case, config, plans_for(config))), npz_rows)


def assert_same_rows(rows, reference):
    got, want = by_slice(rows), by_slice(reference)
    assert got.keys() == want.keys()
    for key, row in got.items():
        assert np.array_equal(row["mask"], want[key]["mask"]), key
        assert np.abs(row["image"].astype(int) - want[key]["image"]).max() <= 1, key
        assert np.allclose(row["spacing"], want[key]["spacing"], rtol=1e-4)
        assert np.array_equal(row["box"], want[key]["box"])


def test_dicom_overlapping_segments_both_kept(tmp_path, recist, vocab):
    gts = recist["gts"].astype(bool)
    bigger = np.zeros_like(gts)
    bigger[:, 100:400, 100:400] = True  # overlaps the lesion
    datasets = write_ct_series(tmp_path / "d", uint8_to_hu(recist["imgs"]), recist["spacing"], nested=False)
    write_seg(tmp_path / "d" / "seg.dcm", datasets, {"lesion": gts, "liver": bigger})
    config = cfg(empty_fraction=0)
    (ref,), _ = discover(tmp_path / "d", config, vocab)
    case = read_case(ref, config)
    assert len(case.layers) == 2
    rows = list(case_rows(case, config, plans_for(config)))
    liver = [r for r in rows if r["label"] == "liver"]
    lesion = [r for r in rows if r["label"] == "lesion"]
    assert len(liver) == len(gts) and len(lesion) == int(gts.any(axis=(1, 2)).sum())
    assert all(r["area"] == (300 * SIZE // 512) ** 2 for r in liver)


def test_sam_med2d_layout_masks_align_with_images(vocab):
    config = cfg(modality="CT", empty_fraction=0)
    rows = rows_of(SAMMED2D, config, vocab)
    assert set(rows) == {"amos_0004_75", "amos_0006_90", "s0114_111", "s0619_32"}
    liver = next(r for r in rows["amos_0006_90"] if r["label"] == "liver")
    source = np.asarray(Image.open(SAMMED2D / "masks" / "amos_0006_90_liver_000.png")) > 0
    assert np.array_equal(liver["mask"], resize_pad(source.view(np.uint8), SIZE, nearest=True))
    image = np.asarray(Image.open(SAMMED2D / "images" / "amos_0006_90.png").convert("RGB"))
    assert np.array_equal(liver["image"], resize_pad(image, SIZE))
    assert liver["slice_index"] == -1 and liver["num_slices"] == 1 and liver["orig_size"].tolist() == [512, 512]
    # the liver is brighter than the air around the body: the mask sits on tissue, not background
    assert liver["image"][liver["mask"] > 0].mean() > 3 * liver["image"][: SIZE // 8, : SIZE // 8].mean() + 10
    # two instances of one target are merged into one mask
    hips = [r for r in rows["s0619_32"] if r["label"] == "hip_left"]
    a, b = (np.asarray(Image.open(SAMMED2D / "masks" / f"s0619_32_hip_left_00{i}.png")) > 0 for i in (0, 1))
    assert len(hips) == 1
    assert hips[0]["area"] == resize_pad((a | b).view(np.uint8), SIZE, nearest=True).sum()
    assert sum(len(v) for v in rows.values()) == 30 - 2  # 30 mask files; hip_left and hip_right have two each


def test_medical_sam3_npz_with_text_prompts(tmp_path, recist, vocab):
    gts = recist["gts"].astype(np.uint8)
    gts[:, 10:40, 10:40] = 2
    folder = tmp_path / "msam3"
    folder.mkdir()
    np.savez(folder / "json.npz", imgs=recist["imgs"], gts=gts, spacing=recist["spacing"],
             text_prompts=np.array(json.dumps({"1": "adrenal nodule", "2": "marker"})))
    np.savez(folder / "pickled.npz", imgs=recist["imgs"], gts=gts, spacing=recist["spacing"],
             text_prompts=np.array({1: "adrenal nodule", 2: "marker"}, dtype=object))
    config = cfg(empty_fraction=0)
    refs, _ = discover(folder, config, vocab)
    json_ref = next(r for r in refs if r.case_id == "json")
    rows = list(case_rows(read_case(json_ref, config), config, plans_for(config)))
    assert {r["prompt"] for r in rows} == {"adrenal nodule", "marker"}
    assert sum(r["prompt"] == "marker" for r in rows) == len(gts)
    pickled_ref = next(r for r in refs if r.case_id == "pickled")
    with pytest.raises(CaseError, match="allow_pickle"):
        read_case(pickled_ref, config)
    trusted = cfg(empty_fraction=0, allow_pickle="true")
    assert len(list(case_rows(read_case(pickled_ref, trusted), trusted, plans_for(trusted)))) == len(rows)


def test_pydicom_bundled_files(tmp_path, vocab):
    """Real DICOM files from pydicom: a one-slice CT with a SEG drawn on it, an MR series with no
    SEG (rejected, named by hashed id), and a DICOMDIR and a text file (ignored)."""
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    root = tmp_path / "pydicom"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "a" / "b" / "IM0001")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "a" / "mr.dcm")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    (root / "notes.txt").write_text("not dicom")
    ct = pydicom.dcmread(root / "a" / "b" / "IM0001")
    hu = apply_modality_lut(ct.pixel_array, ct)
    mask = hu > 100  # the bright structures of the slice
    write_seg(root / "seg" / "seg.dcm", [ct], {"bone": mask[None]})
    config = cfg(empty_fraction=0, image_size=128)
    refs, rejected = discover(root, config, vocab)
    assert len(refs) == 1 and len(rejected) == 1
    assert rejected[0]["case"].startswith("dcm-") and "no DICOM-SEG" in rejected[0]["reason"]
    case = read_case(refs[0], config)
    assert case.image.shape[2] == 1 and case.modality == "CT"
    assert np.array_equal(np.sort(case.image.ravel()), np.sort(hu.ravel().astype(np.float32)))  # rescaled
    (row,) = list(case_rows(case, config, plans_for(config)))
    assert row["prompt"] == "bone" and row["modality"] == "CT"
    assert row["spacing"][:2] == pytest.approx([float(ct.PixelSpacing[0]), float(ct.PixelSpacing[1])], rel=1e-4)
    assert row["area"] == mask.sum()  # 128 → 128: the mask is stored unchanged
    assert np.array_equal(row["mask"], mask.astype(np.uint8))  # and in the same orientation


def test_nnunet_v2_layout_and_slice_axes(tmp_path, vocab):
    from medsam3.phantom import ORGANS, make_case

    hu, labels = make_case((40, 36, 24), seed=4)
    folder = tmp_path / "Dataset001_Phantom"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([2.0, 2.5, 3.0, 1.0])
    import nibabel as nib

    nib.save(nib.Nifti1Image(hu, affine), folder / "imagesTr" / "ph_001_0000.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / "ph_001.nii.gz")
    names = {"background": 0, **{n: v for v, (n, *_) in ORGANS.items()}, "vertebra": 7}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": names,
                                                     "file_ending": ".nii.gz", "numTraining": 1}))
    for axis, depth, (row_mm, col_mm) in ((2, 24, (2.5, 2.0)), (1, 36, (3.0, 2.0)), (0, 40, (3.0, 2.5))):
        config = cfg(empty_fraction=0, slice_axis=axis, image_size=64)
        (ref,) = discover(folder, config, vocab)[0]
        assert ref.case_id == "ph_001" and ref.modality == "CT"
        rows = list(case_rows(read_case(ref, config), config, plans_for(config)))
        assert {r["num_slices"] for r in rows} == {depth}
        liver = max((r for r in rows if r["label"] == "liver"), key=lambda r: r["area"])
        h, w = liver["orig_size"]
        new_h, new_w = resized_shape(h, w, 64)
        assert liver["spacing"] == pytest.approx([row_mm * h / new_h, col_mm * w / new_w, [2.0, 2.5, 3.0][axis]])
        # liver voxels in the source volume == liver pixels over all its slices (before resizing)
        if axis == 2:
            total = sum(int((labels[:, :, r["slice_index"]] == 1).sum()) for r in rows if r["label"] == "liver")
            assert total == int((labels == 1).sum())
        if axis in (1, 2):  # patient's right (liver) on the viewer's left
            cols = np.flatnonzero(liver["mask"].any(axis=0))
            assert cols.mean() < new_w / 2
        if axis == 1:  # coronal: lungs above the liver
            lung = max((r for r in rows if r["label"] == "lung_right"), key=lambda r: r["area"])
            assert np.flatnonzero(lung["mask"].any(axis=1)).mean() < np.flatnonzero(liver["mask"].any(axis=1)).mean()
