"""End to end on a real local Ray: mixed layouts, determinism, bad input, atomic output, privacy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medsam3.config import load_config
from medsam3.phantom import make_case
from medsam3.schema import COLUMNS, decode_row, validate_shards
from preprocessing.prepare import PrepareError, run_prepare
from tests.builders import (
    PHI,
    RECIST,
    SAMMED2D,
    load_recist,
    uint8_to_hu,
    write_ct_series,
    write_msd_dataset,
    write_seg,
)

pytestmark = pytest.mark.usefixtures("ray_local")
SIZE = 128


def cfg(*overrides):
    return load_config("prepare", [f"image_size={SIZE}", "modality=CT", *overrides])


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory):
    """A folder of four datasets, one per layout; DICOM carries a patient identity."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "sammed2d").symlink_to(SAMMED2D)
    (root / "recist").symlink_to(RECIST)
    recist = load_recist()
    datasets = write_ct_series(root / "dicom" / "Doe^Jane" / "ct", uint8_to_hu(recist["imgs"]), recist["spacing"])
    write_seg(root / "dicom" / "Doe^Jane" / "seg" / "lesion_seg.dcm", datasets, {"lesion": recist["gts"]})
    write_ct_series(root / "dicom" / "Doe^Jane" / "scout", uint8_to_hu(recist["imgs"][:2]), recist["spacing"])  # no SEG
    hu, labels = make_case((48, 40, 12), seed=1)
    write_msd_dataset(root / "msd", {"phantom_a": (hu, labels, np.diag([2.0, 2.0, 4.0, 1.0]))},
                      {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lung_left",
                       6: "lung_right", 7: "vertebra"}, name="Phantom")
    return root


@pytest.fixture(scope="module")
def prepared(mixed_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "shards"
    result = run_prepare(mixed_root, out, cfg())
    return out, result


def read_rows(folder: Path) -> list[dict]:
    import ray

    return [decode_row(r) for r in ray.data.read_parquet(str(folder)).take_all()]


def test_mixed_layouts_rows_and_manifest(prepared, mixed_root):
    out, result = prepared
    manifest = validate_shards(out)
    rows = read_rows(out)
    assert manifest["num_rows"] == len(rows) == result.num_rows
    datasets = {r["dataset"] for r in rows}
    assert datasets == {"sammed2d", "recist", "dicom", "Phantom"}
    assert manifest["num_cases"] == 4 + 4 + 1 + 1
    rejected = {r["case"]: r for r in result.rejected}
    assert len(rejected) == 2 and "no mask files" in rejected["images/amos_0507_31.png"]["reason"]
    scout = next(r for c, r in rejected.items() if c.startswith("dcm-"))  # a series without SEG
    assert "no DICOM-SEG" in scout["reason"] and scout["where"].startswith("Doe^Jane/scout/")
    for row in rows:
        assert set(row) == set(COLUMNS)
        assert row["image"].shape == (SIZE, SIZE, 3) and row["image"].dtype == np.uint8
        assert row["mask"].shape == (SIZE, SIZE) and set(np.unique(row["mask"])) <= {0, 1}
        assert row["area"] == row["mask"].sum()
        if row["area"]:
            x0, y0, x1, y1 = row["box"].astype(int)
            assert row["mask"][y0:y1, x0:x1].sum() == row["area"]
            assert row["mask"][y0, x0:x1].any() and row["mask"][y1 - 1, x0:x1].any()
    # DICOM and NPZ hold the same lesion: the masks must agree slice by slice
    npz = {r["slice_index"]: r for r in rows if r["dataset"] == "recist" and r["case_id"] == load_recist()["name"]}
    dcm = {r["slice_index"]: r for r in rows if r["dataset"] == "dicom"}
    common = [k for k in dcm if k in npz and dcm[k]["area"]]
    assert common and all(np.array_equal(dcm[k]["mask"], npz[k]["mask"]) for k in common)
    # counts in the manifest agree with the rows
    total = {(c["dataset"], c["label"]): c["rows"] for c in manifest["counts"]}
    assert sum(total.values()) == len(rows)
    assert total[("Phantom", "vertebra")] == sum(r["label"] == "vertebra" for r in rows)
    # every input file is hashed; DICOM files without their paths
    inputs = manifest["inputs"]
    assert sum(1 for i in inputs if i["dataset"] == "dicom") == 16 + 1
    assert all("path" not in i for i in inputs if i["dataset"] == "dicom")
    sample = next(i for i in inputs if i["dataset"] == "recist")
    assert sample["sha256"] == hashlib.sha256((RECIST / Path(sample["path"]).name).read_bytes()).hexdigest()


def test_phantom_windows_per_label(prepared):
    out, _ = prepared
    rows = [r for r in read_rows(out) if r["dataset"] == "Phantom" and r["area"] > 0]
    lung = next(r for r in rows if r["label"] == "lung_left")
    bone = next(r for r in rows if r["label"] == "vertebra")
    liver = next(r for r in rows if r["label"] == "liver")
    # lung window (-1350..150 HU) shows lung (-850 HU) as mid-dark grey; soft tissue shows it black
    assert 30 < lung["image"][lung["mask"] > 0].mean() < 110
    assert liver["image"][liver["mask"] > 0].mean() > 120  # 60 HU in W400/L40 ≈ 140
    assert bone["image"][bone["mask"] > 0].mean() > 150  # 700 HU in W1800/L400 ≈ 170
    assert lung["prompt"] == "left lung" and bone["prompt"] == "vertebra"


def test_deterministic_outputs(prepared, mixed_root, tmp_path):
    out, _ = prepared
    again = tmp_path / "again"
    run_prepare(mixed_root, again, cfg())
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}
    second = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(again.iterdir())}
    assert first == second


def test_shard_sink_keeps_the_rows_order_and_splits_files(tmp_path):
    # pyarrow's threaded dataset writer (behind Ray's write_parquet) may reorder a task's blocks;
    # the sink writes them in the order they come.
    import pyarrow.fs as pafs
    from ray.data._internal.execution.interfaces import TaskContext

    from medsam3.schema import parquet_options
    from preprocessing.shard_sink import ShardSink

    blocks = [pa.table({"dataset": [f"d{i}"] * 4, "area": np.arange(4 * i, 4 * i + 4),
                        "image": [np.random.default_rng(i).bytes(50_000)] * 4}) for i in range(40)]
    digests = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        sink = ShardSink(str(folder), pafs.LocalFileSystem(), 64, {"compression": "zstd"})
        sink.on_write_start()
        names = sink.write(iter(blocks), TaskContext(task_idx=3, op_name="Write"))
        assert names == ["part-00003-0.parquet", "part-00003-1.parquet", "part-00003-2.parquet"]
        files = [pq.ParquetFile(folder / n) for n in names]
        assert [f.metadata.num_rows for f in files] == [64, 64, 32]
        assert all(f.metadata.num_row_groups == 1 for f in files)
        areas = np.concatenate([f.read(columns=["area"]).column(0).to_numpy() for f in files])
        assert np.array_equal(areas, np.arange(160))
        digests.append([hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in names])
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match="max_rows_per_file"):
        ShardSink(str(tmp_path), pafs.LocalFileSystem(), 0, parquet_options())


def test_no_patient_identity_or_absolute_path_in_output(prepared, mixed_root):
    out, _ = prepared
    secrets = [*PHI.values(), "Doe^Jane", str(mixed_root), str(mixed_root.resolve()), str(SAMMED2D)]
    texts = [(out / "manifest.json").read_text(), (out / "rejected.json").read_text()]
    for shard in out.glob("*.parquet"):
        table = pq.read_table(shard)
        texts.append(str(table.schema.metadata))
        for name in table.column_names:
            if table.schema.field(name).type == pa.string():
                texts.extend(table.column(name).to_pylist())
        raw = shard.read_bytes()
        assert not any(s.encode() in raw for s in secrets)
    blob = "\n".join(texts)
    leaked = [s for s in secrets if s in blob]
    assert leaked == []


def _bad_inputs(root: Path) -> Path:
    hu, labels = make_case((32, 32, 8), seed=2)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    names = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lung_left", 6: "lung_right",
             7: "vertebra"}
    nan = hu.astype(np.float32)
    nan[3, 3, 3] = np.nan
    write_msd_dataset(root / "msd", {
        "good": (hu, labels, aff),
        "truncated": (hu, labels, aff),
        "mismatch": (hu, labels[:, :, :6], aff),
        "nan": (nan, labels, aff),
        "fourd": (np.stack([hu, hu], axis=-1), labels, aff),
    }, names)
    truncated = root / "msd" / "imagesTr" / "truncated.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (root / "twod" / "images").mkdir(parents=True)
    (root / "twod" / "masks").mkdir()
    image = np.asarray(Image.open(SAMMED2D / "images" / "amos_0006_90.png"))
    liver = np.asarray(Image.open(SAMMED2D / "masks" / "amos_0006_90_liver_000.png"))
    for name, mask in (("ok", liver), ("bad", (liver > 0).astype(np.uint8) * np.uint8(1) + (liver[::-1] > 0))):
        Image.fromarray(image).save(root / "twod" / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "twod" / "masks" / f"{name}_liver_000.png")
    return root


def test_bad_cases_are_rejected_with_reasons(tmp_path):
    root = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    result = run_prepare(root, out, cfg())
    reasons = {r["case"]: r["reason"] for r in json.loads((out / "rejected.json").read_text())}
    assert set(reasons) == {"imagesTr/truncated.nii.gz", "imagesTr/mismatch.nii.gz", "imagesTr/nan.nii.gz",
                            "imagesTr/fourd.nii.gz", "images/bad.png"}
    truncated = reasons["imagesTr/truncated.nii.gz"]
    assert "truncated.nii.gz" in truncated and "cannot read" in truncated
    assert "mismatch.nii.gz" in reasons["imagesTr/mismatch.nii.gz"] and "shape" in reasons["imagesTr/mismatch.nii.gz"]
    assert "NaN" in reasons["imagesTr/nan.nii.gz"]
    assert "4D" in reasons["imagesTr/fourd.nii.gz"] and "channel" in reasons["imagesTr/fourd.nii.gz"]
    assert "bad_liver_000.png" in reasons["images/bad.png"] and "not binary" in reasons["images/bad.png"]
    cases = {(r["dataset"], r["case_id"]) for r in read_rows(out)}
    assert cases == {("TestMSD", "good"), ("twod", "ok")}
    assert result.num_cases == 2
    # the 4D case is fine once a channel is chosen
    fixed = run_prepare(root / "msd", tmp_path / "out4d", cfg("channel=1"))
    assert "imagesTr/fourd.nii.gz" not in {r["case"] for r in fixed.rejected}


def test_strict_or_all_rejected_fails_and_keeps_previous_output(tmp_path):
    root = _bad_inputs(tmp_path / "in")
    out = tmp_path / "out"
    run_prepare(root / "twod", out, cfg())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(PrepareError, match="mask is not binary"):
        run_prepare(root, out, cfg("strict=true"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    only_bad = tmp_path / "only_bad"
    (only_bad / "imagesTr").mkdir(parents=True)
    (only_bad / "labelsTr").mkdir()
    for sub in ("imagesTr", "labelsTr"):
        (only_bad / sub / "truncated.nii.gz").write_bytes((root / "msd" / sub / "truncated.nii.gz").read_bytes())
    spec = json.loads((root / "msd" / "dataset.json").read_text())
    spec["training"] = [e for e in spec["training"] if "truncated" in e["image"]]
    (only_bad / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(PrepareError, match="every case was rejected"):
        run_prepare(only_bad, tmp_path / "never", cfg())
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_unknown_labels_fail_before_work(tmp_path):
    hu, labels = make_case((16, 16, 4))
    names = {1: "liver", 2: "spleen", 3: "zzz_gland", 4: "kidney_right", 5: "blorbus", 6: "lung_right",
             7: "vertebra"}
    write_msd_dataset(tmp_path / "d", {"c": (hu, labels, np.eye(4))}, names)
    with pytest.raises(ValueError, match="'blorbus', 'zzz_gland'"):
        run_prepare(tmp_path / "d", tmp_path / "o", cfg())
    result = run_prepare(tmp_path / "d", tmp_path / "o", cfg("extra_labels.blorbus.prompt=blorbus",
                                                             "extra_labels.zzz_gland.prompt=gland"))
    assert {"liver", "blorbus", "zzz_gland"} <= {c["label"] for c in result.counts}


def test_cli_help_and_run(tmp_path, mixed_root):
    help_text = subprocess.run([sys.executable, "-m", "medsam3.cli", "prepare", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for key in load_config("prepare"):
        assert f"\n{key}:" in help_text, key
    bad = subprocess.run([sys.executable, "-m", "medsam3.cli", "prepare", str(mixed_root), str(tmp_path / "o"),
                          "imag_size=3"], capture_output=True, text=True)
    assert bad.returncode == 1 and "imag_size" in bad.stderr
    ok = subprocess.run([sys.executable, "-m", "medsam3.cli", "prepare", str(mixed_root / "msd"),
                         str(tmp_path / "o"), "image_size=64", "empty_fraction=0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Phantom  liver" in ok.stdout and "1 case(s) prepared, 0 rejected" in ok.stdout
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == 64 and "salt" not in manifest["config"]




def test_shard_schema_checks(prepared, tmp_path):
    import ray

    from medsam3.schema import ShardSchemaError, decode_batch

    out, _ = prepared
    batch = decode_batch(ray.data.read_parquet(str(out)).take_batch(4, batch_format="numpy"))
    assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["mask"].shape == (4, SIZE, SIZE)
    assert [int(m.sum()) for m in batch["mask"]] == list(batch["area"])
    with pytest.raises(ShardSchemaError, match="no manifest.json"):
        validate_shards(tmp_path)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text((out / "manifest.json").read_text())
    pq.write_table(pa.table({"image": [b"x"], "prompt": [1]}), fake / "part-0.parquet")
    with pytest.raises(ShardSchemaError, match="missing column 'mask'.*column 'prompt' is int64"):
        validate_shards(fake)
