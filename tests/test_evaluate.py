"""`medsam3 evaluate`: volume reassembly of the metrics, and the Ray Data pipeline end to end on
real shards (2D CT slices and 3D lesion volumes). Trained vs vanilla is in test_train."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from medsam3.cli import main
from medsam3.config import load_config
from medsam3.inference import inference_config
from medsam3.metrics import all_metrics
from medsam3.schema import shard_files
from medsam3.transforms import resize_pad, resized_shape
from pipelines.evaluate import EvaluateError, case_metrics, run_evaluate
from preprocessing.prepare import run_prepare
from tests.builders import RECIST, SAMMED2D


def test_case_metrics_scores_a_3d_case_as_a_volume():
    """Slices arrive unordered, with a gap, padded into squares; the metrics must be those of the
    volume at the original aspect ratio with (through-plane, row, column) spacing."""
    side, (height, width) = 128, (90, 120)
    new_h, new_w = resized_shape(height, width, side)
    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:6, :new_h, :new_w]
    gt = (zz - 2.5) ** 2 * 40 + (yy - 40) ** 2 + (xx - 50) ** 2 < 30**2
    pred = (zz - 2.0) ** 2 * 40 + (yy - 44) ** 2 + (xx - 55) ** 2 < 28**2
    gt[4] = pred[4] = False  # slice 4 is absent from the shards: empty in both
    spacing = np.array([0.9, 0.8, 3.0], np.float32)  # row, column, through-plane (mm)
    rows = [k for k in range(6) if k != 4]
    order = rng.permutation(len(rows))

    def packed(plane):
        return np.packbits(resize_pad(plane.astype(np.uint8), side, nearest=True) > 0).tobytes()

    group = {
        "mode": np.array(["text"] * 5), "dataset": np.array(["d"] * 5), "modality": np.array(["CT"] * 5),
        "label": np.array(["lesion"] * 5), "prompt": np.array(["lesion"] * 5), "case_id": np.array(["c"] * 5),
        "slice_index": np.array([rows[i] + 10 for i in order]),
        "pred": np.array([packed(pred[rows[i]]) for i in order], dtype=object),
        "gt": np.array([packed(gt[rows[i]]) for i in order], dtype=object),
        "spacing": np.array([spacing] * 5, dtype=object), "orig_size": np.array([[height, width]] * 5, dtype=object),
        "score": rng.uniform(size=5),
    }
    got = case_metrics(group, side, tolerance_mm=2.0)
    want = all_metrics(pred, gt, (3.0, 0.9, 0.8), 2.0)
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert got["slices"] == 5 and got["gt_pixels"] == gt.sum() and got["pred_pixels"] == pred.sum()
    assert 0.3 < got["dice"] < 0.95 and got["hd95"] > 2.0


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Real data: two 3D CT lesion volumes and three 2D CT slices with five organs."""
    root = tmp_path_factory.mktemp("evaluate")
    (root / "in" / "lesions").mkdir(parents=True)
    for f in sorted(RECIST.glob("*.npz"))[:2]:
        shutil.copy(f, root / "in" / "lesions")
    organs = root / "in" / "organs"
    (organs / "images").mkdir(parents=True)
    (organs / "masks").mkdir()
    for image in ("amos_0004_75", "amos_0006_90", "s0619_32"):
        shutil.copy(SAMMED2D / "images" / f"{image}.png", organs / "images")
        for mask in SAMMED2D.glob(f"masks/{image}_*.png"):
            shutil.copy(mask, organs / "masks")
    run_prepare(root / "in", root / "shards", load_config("prepare", ["image_size=256", "modality=CT",
                                                                     "empty_fraction=0.1"]))
    return root / "shards"


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_evaluate_end_to_end_on_real_shards(shards, tiny_checkpoint, tmp_path):
    out = tmp_path / "report"
    cfg = inference_config(["threshold=0.2535", "num_actors=2", "batch_size=4", "gallery=1"], stage="evaluate")
    run_evaluate(shards, [f"vanilla={tiny_checkpoint}", f"copy={tiny_checkpoint}"], out, cfg)
    table = pd.read_csv(out / "metrics.csv")
    stored = pads.dataset(shard_files(shards), format="parquet").to_table(
        columns=["dataset", "case_id", "label", "area"]).to_pandas()
    truth = stored.groupby(["dataset", "case_id", "label"])["area"].sum()
    # one row per (checkpoint, mode, case, label), every slice of a case in its volume
    assert len(table) == 2 * 2 * len(truth)
    for _, row in table.iterrows():
        assert row.gt_pixels == truth[(row.dataset, row.case_id, row.label)]
    assert set(table.dataset) == {"lesions", "organs"} and set(table["mode"]) == {"text", "text+box"}
    lesions = table[table.dataset == "lesions"]
    assert (lesions.slices > 1).all()  # 3D cases scored as volumes
    # the same weights under two names give the same numbers (and a zero difference)
    a, b = (table[table.checkpoint == n].drop(columns="checkpoint").reset_index(drop=True) for n in ("vanilla", "copy"))
    pd.testing.assert_frame_equal(a, b)
    report = (out / "report.md").read_text()
    assert "## lesions" in report and "## organs" in report and "## Side by side (Dice)" in report
    assert "| text+box | organs | liver |" in report and "+0.000" in report
    assert sorted(p.name for p in (out / "gallery").iterdir()) == [
        "lesions_best.png", "lesions_worst.png", "organs_best.png", "organs_worst.png"]


def test_evaluate_refuses_bad_input(shards, tiny_checkpoint, tmp_path, capsys):
    cfg = inference_config(stage="evaluate")
    with pytest.raises(EvaluateError, match="not a Hugging Face model directory"):
        run_evaluate(shards, [str(tmp_path)], tmp_path / "out", cfg)
    with pytest.raises(EvaluateError, match="two checkpoints named"):
        run_evaluate(shards, [str(tiny_checkpoint), str(tiny_checkpoint)], tmp_path / "out", cfg)
    with pytest.raises(EvaluateError, match="modes"):
        bad_modes = inference_config(["modes=[box]"], stage="evaluate")
        run_evaluate(shards, [str(tiny_checkpoint)], tmp_path / "out", bad_modes)
    assert main(["evaluate", str(tmp_path), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 1
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


def _group(pred: np.ndarray, gt: np.ndarray, slices: list[int]) -> dict[str, np.ndarray]:
    """A (case, label, mode) group of rows for the given slices of two (depth, side, side) volumes."""
    side, n = pred.shape[1], len(slices)
    return {"mode": np.array(["text"] * n), "dataset": np.array(["d"] * n), "modality": np.array(["CT"] * n),
            "label": np.array(["liver"] * n), "prompt": np.array(["liver"] * n), "case_id": np.array(["c"] * n),
            "slice_index": np.array(slices),
            "pred": np.array([np.packbits(pred[k]).tobytes() for k in slices], dtype=object),
            "gt": np.array([np.packbits(gt[k]).tobytes() for k in slices], dtype=object),
            "spacing": np.array([np.array([1.0, 1.0, 2.0], np.float32)] * n, dtype=object),
            "orig_size": np.array([[side, side]] * n, dtype=object), "score": np.ones(n)}


def test_a_false_positive_on_a_slice_the_shards_sampled_out_counts_in_the_volume():
    """The organ spans slices 10-19 of 40; the model also paints a blob on slices 33-36,
    slices that `prepare` did not keep. Scored on the shards' slices the blob is invisible; scored
    on the whole volume (evaluate's `scans`) Dice drops and HD95 grows."""
    side = 64
    yy, xx = np.mgrid[:side, :side]
    gt = np.zeros((40, side, side), bool)
    gt[10:20] = (yy - 32) ** 2 + (xx - 32) ** 2 < 15**2
    pred = gt.copy()
    pred[33:37] = (yy - 14) ** 2 + (xx - 48) ** 2 < 12**2
    in_shards = list(range(10, 20)) + [3, 27]  # the organ's slices and two sampled empty ones
    shards_only = case_metrics(_group(pred, gt, in_shards), side, tolerance_mm=2.0)
    whole = case_metrics(_group(pred, gt, list(range(40))), side, tolerance_mm=2.0)
    assert shards_only["dice"] == pytest.approx(1.0) and shards_only["hd95"] == pytest.approx(0.0)
    assert whole["dice"] < 0.92 and whole["hd95"] > 20.0 and whole["slices"] == 40
    want = all_metrics(pred, gt, (2.0, 1.0, 1.0), 2.0)
    assert {k: whole[k] for k in want} == pytest.approx(want)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_groups_formed_in_the_driver_equal_ray_datas_groupby():
    """Rows of several cases shuffled together, grouped both ways: evaluate's slice scoring gives
    the metrics of scoring each group alone, and an actor class gets each group whole in one call."""
    import ray

    from medsam3.ray_local import map_groups
    from pipelines.evaluate import score_slices

    class Slices:  # a Ray Data actor like evaluate's VolumePredictor: constructor arguments
        def __init__(self, tag: str):
            self.tag = tag

        def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"case_id": group["case_id"][:1], "label": group["label"][:1], "tag": np.array([self.tag]),
                    "slices": np.array([" ".join(map(str, sorted(group["slice_index"])))])}

    side, rng = 32, np.random.default_rng(1)
    groups, rows = {}, []
    for case in ("a", "b", "c"):
        for label in ("liver", "spleen"):
            depth = int(rng.integers(2, 6))
            gt = rng.random((depth, side, side)) < 0.3
            pred = gt ^ (rng.random((depth, side, side)) < 0.1)
            group = _group(pred, gt, list(range(depth)))
            group["case_id"], group["label"] = np.array([case] * depth), np.array([label] * depth)
            groups[(case, label)] = case_metrics(group, side, tolerance_mm=2.0)
            rows += [{k: v[i].item() if isinstance(v[i], np.generic) else v[i] for k, v in group.items()}
                     for i in range(depth)]
    data = ray.data.from_items([rows[i] for i in rng.permutation(len(rows))], override_num_blocks=3)
    for in_driver in (True, False):
        table = score_slices(data, side, 2.0, in_driver)
        assert len(table) == len(groups)
        for _, row in table.iterrows():
            want = groups[(row.case_id, row.label)]
            assert {k: row[k] for k in want} == pytest.approx(want), (in_driver, row.case_id, row.label)
        whole = map_groups(data, ["case_id", "label"], Slices, in_driver, fn_constructor_kwargs={"tag": "t"},
                           compute=ray.data.ActorPoolStrategy(size=1)).to_pandas()
        assert sorted(zip(whole.case_id, whole.label, whole.slices, whole.tag, strict=True)) == [
            (case, label, " ".join(map(str, range(g["slices"]))), "t") for (case, label), g in sorted(groups.items())]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_evaluate_scores_held_out_cases_and_whole_volumes(shards, tiny_checkpoint, tmp_path):
    """A checkpoint that records its run's training cases is scored on the others by default;
    with `scans`, every slice of a 3D case is scored (the shards hold only some empty ones)."""
    import json

    stored = pads.dataset(shard_files(shards), format="parquet").to_table(
        columns=["dataset", "case_id", "slice_index", "num_slices"]).to_pandas()
    cases = sorted({f"{d}/{c}" for d, c in zip(stored.dataset, stored.case_id, strict=True)})
    volume = next(c for c in cases if c.startswith("lesions/"))
    trained = [c for c in cases if c != volume and not c.startswith("lesions/")][:2]
    run_model = tmp_path / "run-model"
    shutil.copytree(tiny_checkpoint, run_model)
    (run_model / "medsam3_export.json").write_text(json.dumps(
        {"step": 1, "prompts": None, "split": {"train": trained, "val": []}}))
    cfg = inference_config(["gallery=0", "modes=[text]", "batch_size=8"], stage="evaluate")
    run_evaluate(shards, [str(run_model)], tmp_path / "held-out", cfg)
    held_out = pd.read_csv(tmp_path / "held-out" / "metrics.csv")
    scored = {f"{d}/{c}" for d, c in zip(held_out.dataset, held_out.case_id, strict=True)}
    assert scored == set(cases) - set(trained)
    assert "Cases: " in (tmp_path / "held-out" / "report.md").read_text()
    with pytest.raises(EvaluateError, match="no checkpoint records"):
        run_evaluate(shards, [str(tiny_checkpoint)], tmp_path / "x", inference_config(["split=val"], stage="evaluate"))

    whole = inference_config(["gallery=0", "modes=[text]", "batch_size=8", "split=all",
                              f"scans={shards.parent / 'in'}"], stage="evaluate")
    run_evaluate(shards, [str(tiny_checkpoint)], tmp_path / "whole", whole)
    table = pd.read_csv(tmp_path / "whole" / "metrics.csv").set_index(["dataset", "case_id"])
    lesions = stored[stored.dataset == "lesions"]
    for case_id, part in lesions.groupby("case_id"):
        depth = int(part.num_slices.iloc[0])
        assert part.slice_index.nunique() < depth  # the shards hold only some of the slices
        assert table.loc[("lesions", case_id), "slices"] == depth  # the volume is scored whole
    assert set(table.loc["organs"].index) == set(stored[stored.dataset == "organs"].case_id)  # 2D from shards
