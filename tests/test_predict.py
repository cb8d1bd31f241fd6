"""The inference core and `medsam3 predict` on real 2D and 3D data with a tiny SAM3 checkpoint.

Random weights say nothing about accuracy (test_evaluate compares a trained model with its
starting point); these tests pin the geometry: masks land on the input's own pixels, volumes
keep the input's affine and orientation, DICOM-SEG maps back onto its series, and inference
builds exactly the pixels `prepare` stores.
"""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from medsam3.cli import main
from medsam3.inference import Preprocessor, Segmenter, inference_config, masks_to_grid
from medsam3.io.dicom import read_series, scan_series
from medsam3.io.scan import read_scan
from medsam3.metrics import dice
from medsam3.samples import Intensity
from medsam3.schema import decode_batch, shard_files
from medsam3.transforms import display_slice, model_pixels, resize_pad, resized_shape
from pipelines.predict import PredictError, run_predict
from tests.builders import RECIST, SAMMED2D, load_recist, reorient, uint8_to_hu, write_ct_series

PNG = SAMMED2D / "images" / "amos_0004_75.png"
# Random tiny SAM3: every query scores ≈ 0.25; this keeps a few per slice, so masks are partial
# (neither empty nor the whole image) and a misplaced mask would show.
PARTIAL = "threshold=0.2535"


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (512, 512)])
def test_masks_to_grid_inverts_the_padding_and_resizing(shape):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    mask = ((yy - shape[0] * 0.3) ** 2 + (xx - shape[1] * 0.6) ** 2 < (min(shape) * 0.2) ** 2).astype(np.uint8)
    square = resize_pad(mask, 256, nearest=True)
    new_h, new_w = resized_shape(*shape, 256)
    logits = torch.from_numpy(np.where(square > 0, 5.0, -5.0).astype(np.float32))[None, None]
    low_res = torch.nn.functional.interpolate(logits, size=(64, 64), mode="bilinear")  # like SAM3's mask head
    for source in (logits, low_res):
        back = masks_to_grid(source, shape, (new_h / 256, new_w / 256))[0, 0].numpy() > 0
        assert back.shape == shape
        assert dice(back, mask) > (0.99 if source is logits else 0.95)


def test_predict_2d_png(tiny_checkpoint, tmp_path):
    cfg = inference_config([PARTIAL])
    summary = run_predict(PNG, ["liver", "zebra stripes"], tiny_checkpoint, tmp_path / "out", cfg,
                          boxes=["100,120,300,330"], progress=False)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["1_liver.png", "2_zebra_stripes.png", "labels.json",
                                                      "overlay.png", "summary.json"]
    image = np.asarray(Image.open(PNG))
    liver, zebra = summary["prompts"]
    for entry, file in ((liver, "1_liver.png"), (zebra, "2_zebra_stripes.png")):
        mask = np.asarray(Image.open(out / file)) > 0
        assert mask.shape == image.shape[:2]
        assert mask.sum() == entry["pixels"] and 0 < entry["pixels"] < mask.size
    assert liver["box"] == [100, 120, 300, 330] and zebra["box"] is None
    assert liver["in_vocabulary"] and not zebra["in_vocabulary"] and "warning" in zebra
    # the same call through the core gives the same masks; the box changes the answer
    segmenter = Segmenter(tiny_checkpoint, cfg)
    case = read_scan(PNG).case
    with_box, without = segmenter.segment(case, ["liver", "liver"], [[100, 120, 300, 330], None])
    assert np.array_equal(with_box.mask, np.asarray(Image.open(out / "1_liver.png")) > 0)
    assert not np.array_equal(with_box.mask, without.mask)
    assert json.loads((out / "summary.json").read_text()) == summary | {"files": summary["files"]}


def test_inference_builds_the_pixels_prepare_stores(tiny_checkpoint, tmp_path):
    """Train and inference see identical pixels: the squares predict feeds the model are the
    bytes `prepare` stored for the same slices."""
    from medsam3.config import load_config
    from preprocessing.prepare import run_prepare

    name = sorted(p.name for p in RECIST.glob("*.npz"))[0]
    (tmp_path / "in").mkdir()
    shutil.copy(RECIST / name, tmp_path / "in")
    run_prepare(tmp_path / "in", tmp_path / "shards", load_config("prepare", ["image_size=256", "empty_fraction=0"]))
    import pyarrow.dataset as pads

    rows = decode_batch(pads.dataset(shard_files(tmp_path / "shards"), format="parquet").to_table().to_pydict())
    segmenter = Segmenter(tiny_checkpoint, inference_config(["prepare.image_size=256"]))
    case = read_scan(RECIST / name).case
    intensity = Intensity(case, segmenter.plans)
    planes = [display_slice(case.image, 2, int(k)) for k in rows["slice_index"]]
    squares = segmenter.plane_squares(planes, intensity, segmenter.window("lesion", case.modality))
    assert len(squares) >= 3 and np.array_equal(squares, rows["image"])
    # the items the model runs on (grayscale bands, or already at the model's size) give the
    # model exactly the pixels of the stored squares
    for size in (None, segmenter.size):
        prep = Preprocessor(segmenter.plans, size)
        items = prep.items(case, ["lesion"], [None], [int(k) for k in rows["slice_index"]], intensity)
        for item, stored in zip(items, rows["image"], strict=True):
            assert np.array_equal(model_pixels(item.square, segmenter.size), model_pixels(stored, segmenter.size))


def test_nifti_output_keeps_the_input_affine_in_any_orientation(tiny_checkpoint, tmp_path):
    recist = load_recist()
    hu = uint8_to_hu(recist["imgs"], width=2000, level=0)  # (z, y, x) → a CT in HU, air at -1000
    canonical = hu.transpose(2, 1, 0)[::-1, ::-1, :]
    affine = np.diag([*recist["spacing"][:3], 1.0])
    cfg = inference_config([PARTIAL, "batch_size=4"])
    answers = {}
    for codes in ("RAS", "LPS", "PIR"):
        data, file_affine = reorient(np.ascontiguousarray(canonical), affine, codes)
        path = tmp_path / f"ct_{codes}.nii.gz"
        nib.save(nib.Nifti1Image(data, file_affine), path)
        summary = run_predict(path, ["lesion"], tiny_checkpoint, tmp_path / codes, cfg, progress=False)
        assert summary["input"]["modality"] == "CT"  # recognised from the HU values
        labels = nib.load(tmp_path / codes / "labels.nii.gz")
        assert np.allclose(labels.affine, file_affine) and labels.shape == data.shape
        assert nib.aff2axcodes(labels.affine) == tuple(codes)
        answers[codes] = np.asanyarray(nib.as_closest_canonical(labels).dataobj)
        voxels = summary["prompts"][0]["voxels"]
        assert voxels == int((answers[codes] == 1).sum()) and 0 < voxels < canonical.size
        ml = voxels * float(np.prod(recist["spacing"][:3])) / 1000
        assert summary["prompts"][0]["volume_ml"] == pytest.approx(ml, abs=1e-3)
    # one scan, three storage orders: the same mask in patient space
    assert np.array_equal(answers["RAS"], answers["LPS"]) and np.array_equal(answers["RAS"], answers["PIR"])


def test_dicom_input_gives_a_seg_that_maps_back_onto_its_series(tiny_checkpoint, tmp_path):
    recist = load_recist()
    series = tmp_path / "series"
    write_ct_series(series, uint8_to_hu(recist["imgs"][:8]), recist["spacing"])
    summary = run_predict(series, ["lesion", "liver"], tiny_checkpoint, tmp_path / "out", inference_config([PARTIAL]),
                          progress=False)
    out = tmp_path / "out"
    assert {"segmentation.dcm", "labels.nii.gz", "overlay.png"} <= {p.name for p in out.iterdir()}
    assert summary["input"]["modality"] == "CT" and summary["input"]["shape"] == [512, 512, 8]
    # read the SEG back the way prepare reads DICOM-SEG: it must land on the predicted voxels
    shutil.copy(out / "segmentation.dcm", series / "seg.dcm")
    groups, _ = scan_series(series)
    group = next(iter(groups.values()))
    assert group.segs == ["seg.dcm"] and group.segment_labels == ["lesion", "liver"]
    _, layers, names, _, _ = read_series(series, group.files, group.segs)
    predicted = np.asanyarray(nib.as_closest_canonical(nib.load(out / "labels.nii.gz")).dataobj)
    for value, prompt in names.items():
        from_seg = np.any([layer == value for layer in layers], axis=0)
        expected = summary["prompts"][["lesion", "liver"].index(prompt)]
        assert from_seg.sum() == expected["voxels"] > 0
        if prompt == "liver":  # the later prompt wins the label map where they overlap
            assert np.array_equal(from_seg, predicted == 2)


def test_predict_cli_and_bad_inputs(tiny_checkpoint, tmp_path, capsys):
    assert main(["predict", str(PNG), "--prompt", "liver", "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path / "cli"), PARTIAL]) == 0
    assert (tmp_path / "cli" / "1_liver.png").is_file()
    capsys.readouterr()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file at all")
    cases = [
        ([str(broken), "--prompt", "liver"], "broken.nii.gz"),
        ([str(tmp_path / "scan.xyz"), "--prompt", "liver"], "no such file"),
        ([str(PNG)], "--prompt"),
        ([str(PNG), "--prompt", "liver", "--box", "5,5,1,1"], "x1 > x0"),
        ([str(PNG), "--prompt", "liver", "--checkpoint", str(tmp_path)], "not a Hugging Face model directory"),
    ]
    for args, message in cases:
        if "--checkpoint" not in args:
            args += ["--checkpoint", str(tiny_checkpoint)]
        assert main(["predict", *args, "--out", str(tmp_path / "bad")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()
    with pytest.raises(PredictError, match="box"):
        run_predict(PNG, ["a"], tiny_checkpoint, tmp_path / "x", inference_config(), boxes=["1,2,3"])


def test_summary_counts_the_slices_that_hold_mask_voxels():
    """summary.json's slices_with_mask: slices with mask voxels along the plans' slice axis; a
    slice where a query scored but no voxel survived is not one."""
    from medsam3.config import load_config
    from medsam3.io.case import Case
    from medsam3.io.scan import Scan
    from medsam3.plans import Plans
    from pipelines.predict import summarize

    plans = Plans.from_prepare_config(load_config("prepare"))
    case = Case("c1", "phantom", "CT", np.zeros((6, 5, 4), np.int16), [], {}, (1.0, 1.0, 2.0), np.eye(4))
    [result] = Preprocessor(plans).results(case, ["liver"], [None], None)
    result.slice_scores[:] = [0.9, 0.8, 0.7, 0.0]  # three slices scored ...
    assert plans.slice_axis == 2
    result.mask[2:4, 1:3, 1] = True  # two rows and two columns of slice 1
    [entry] = summarize(Scan(case, "nifti", "c1.nii.gz"), [result], "models/demo", 0.5)["prompts"]
    assert entry["voxels"] == 4 and entry["slices_with_mask"] == 1  # ... one holds voxels
