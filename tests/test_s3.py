"""Every stage on S3: a real S3-compatible server (moto's server mode) on loopback.

prepare reads scans from and writes shards to S3 (the same shards as on disk), a failed run
leaves the S3 output as it was, training keeps its checkpoints on S3 and resumes from them,
export/evaluate/predict read and write s3:// URIs, and DVC pushes and pulls shards through an
S3 remote with a custom endpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from medsam3.config import load_config
from medsam3.io import storage
from preprocessing.prepare import PrepareError, run_prepare
from tests.builders import RECIST, SAMMED2D

BUCKET = "s3://medsam3-test"


def _digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """Two real datasets: three CT slices with organ masks (SAM-Med2D) and one CT lesion volume (NPZ)."""
    root = tmp_path_factory.mktemp("scans")
    ct2d = root / "ct2d"
    (ct2d / "images").mkdir(parents=True)
    (ct2d / "masks").mkdir()
    for image, masks in {"amos_0004_75": ["liver_000"], "amos_0006_90": ["liver_000", "spleen_000"],
                         "s0619_32": ["hip_left_000"]}.items():
        shutil.copy(SAMMED2D / "images" / f"{image}.png", ct2d / "images")
        for mask in masks:
            shutil.copy(SAMMED2D / "masks" / f"{image}_{mask}.png", ct2d / "masks")
    (root / "lesions").mkdir()
    shutil.copy(sorted(RECIST.glob("*.npz"))[0], root / "lesions")
    return root


def prepare_cfg(endpoint: str, *extra: str):
    return load_config("prepare", ["image_size=256", "modality=CT", "empty_fraction=0",
                                   f"storage.endpoint_url={endpoint}", *extra])


@pytest.fixture(scope="module")
def s3_shards(scans, s3_endpoint, tmp_path_factory, ray_local) -> tuple[str, Path]:
    """The scans uploaded to S3 and prepared S3 → S3; also prepared on disk, for comparison."""
    storage.upload(scans, f"{BUCKET}/raw")
    result = run_prepare(f"{BUCKET}/raw", f"{BUCKET}/shards", prepare_cfg(s3_endpoint))
    assert result.num_cases == 4 and not result.rejected
    local = tmp_path_factory.mktemp("local") / "shards"
    run_prepare(scans, local, prepare_cfg(s3_endpoint))
    return f"{BUCKET}/shards", local


@pytest.mark.slow
def test_prepare_from_s3_to_s3_gives_the_same_shards_as_on_disk(s3_shards, tmp_path):
    uri, local = s3_shards
    remote = storage.download(uri, tmp_path / "copy")
    assert sorted(_digests(remote)) == sorted(_digests(local))
    ours, theirs = (json.loads((f / "manifest.json").read_text()) for f in (remote, local))
    assert ours == theirs  # inputs' digests, row counts, config: nothing depends on where files live
    for name in ours["files"]:
        a, b = pq.read_table(remote / name), pq.read_table(local / name)
        assert a.equals(b), name
    assert ours["num_rows"] > 4 and {c["dataset"] for c in ours["counts"]} == {"ct2d", "lesions"}
    # nothing was left beside the output: no staging folder, no ledger
    assert not [f for f in storage.listing(BUCKET) if f.split("/")[0].startswith(".")]


@pytest.mark.slow
def test_a_failed_prepare_leaves_the_s3_output_as_it_was(s3_shards, scans, s3_endpoint, tmp_path):
    uri, _ = s3_shards
    before = storage.listing(uri)
    bad = tmp_path / "bad"
    shutil.copytree(scans / "ct2d", bad / "ct2d")
    (bad / "ct2d" / "images" / "broken_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    shutil.copy(SAMMED2D / "masks" / "amos_0004_75_liver_000.png", bad / "ct2d" / "masks" / "broken_1_liver_000.png")
    storage.upload(bad, f"{BUCKET}/raw-bad")
    with pytest.raises(PrepareError, match="broken_1"):
        run_prepare(f"{BUCKET}/raw-bad", uri, prepare_cfg(s3_endpoint, "strict=true"))
    assert storage.listing(uri) == before  # same files, same ETags
    assert not [f for f in storage.listing(BUCKET) if f.split("/")[0].startswith(".")]
    with pytest.raises(PrepareError, match="not a medsam3 shard folder"):
        run_prepare(f"{BUCKET}/raw", f"{BUCKET}/raw-bad", prepare_cfg(s3_endpoint))


@pytest.mark.slow
def test_training_checkpoints_live_on_s3_and_resume_from_there(s3_shards, s3_endpoint, tmp_path):
    from pipelines.export import export_run
    from pipelines.run_folder import RunFolder
    from pipelines.train import run_train

    shards, _ = s3_shards
    run = f"{BUCKET}/runs/tiny"
    base = ["train.val_every=0", "train.val_fraction=0", "train.checkpoint_every=2", "train.num_to_keep=2",
            f"storage.endpoint_url={s3_endpoint}"]
    first = run_train(shards, run, load_config("train", [*base, "train.max_steps=4"]))
    assert first.error is None and first.metrics["step"] == 4
    files = storage.listing(run)
    run_files = {"train_config.yaml", "prompts.json", "metrics.jsonl", "curves.csv", "tokenizer/tokenizer.json"}
    assert run_files <= set(files)
    latest = storage.name(RunFolder(run).latest_checkpoint())
    assert latest.startswith("checkpoint_")
    # every rank's ZeRO-3 shard is in the checkpoint on S3
    shard_files = [f for f in files if f.startswith(latest) and "optim_states" in f]
    assert len(shard_files) == 2, shard_files

    # the same run again, longer: it starts from step 4 of the checkpoint on S3
    second = run_train(shards, run, load_config("train", [*base, "train.max_steps=6"]))
    assert second.metrics["step"] == 6
    log = [json.loads(line) for line in storage.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [m["step"] for m in log] == [1, 2, 3, 4, 5, 6]
    assert json.loads(storage.read_text(f"{RunFolder(run).latest_checkpoint()}/trainer_state.json"))["step"] == 6
    checkpoints = {f.split("/")[0] for f in storage.listing(run) if f.startswith("checkpoint_") and "/" in f}
    assert len(checkpoints) == 2  # num_to_keep, applied on S3

    # export S3 → S3, and the exported model loads from S3 for evaluation
    model = export_run(run, f"{BUCKET}/models/tiny")
    assert {"config.json", "model.safetensors", "tokenizer_config.json", "medsam3_export.json"} <= set(
        storage.listing(model))
    assert json.loads(storage.read_text(f"{model}/medsam3_export.json"))["step"] == 6
    from medsam3.inference import inference_config
    from pipelines.evaluate import run_evaluate

    cfg = inference_config(["num_actors=1", "gallery=1", "split=all", f"storage.endpoint_url={s3_endpoint}"],
                           stage="evaluate")  # the training cases: the shards hold no other
    summary = run_evaluate(shards, [f"tuned={model}"], f"{BUCKET}/reports/tiny", cfg)
    assert summary["checkpoints"] == {"tuned": "tiny"}
    written = storage.listing(f"{BUCKET}/reports/tiny")
    assert {"metrics.csv", "report.md", "summary.json", "metrics.json"} <= set(written)
    rows = storage.read_text(f"{BUCKET}/reports/tiny/metrics.csv").splitlines()
    assert len(rows) - 1 == 2 * 5  # 4 cases: 5 (case, label) pairs × 2 prompt modes


@pytest.mark.slow
def test_predict_reads_a_scan_and_checkpoint_from_s3_and_writes_there(tiny_checkpoint, s3_endpoint, tmp_path):
    storage.upload(tiny_checkpoint, f"{BUCKET}/models/vanilla")
    scan = f"{BUCKET}/scans/{sorted(RECIST.glob('*.npz'))[0].name}"
    fs, inner = storage.filesystem(scan)
    fs.put_file(os.fspath(sorted(RECIST.glob("*.npz"))[0]), inner)
    out = f"{BUCKET}/predictions/lesion"
    result = subprocess.run(
        [sys.executable, "-m", "medsam3.cli", "predict", scan, "--prompt", "lesion", "--checkpoint",
         f"{BUCKET}/models/vanilla", "--out", out, "threshold=0.0", f"storage.endpoint_url={s3_endpoint}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    files = storage.listing(out)
    assert {"summary.json", "overlay.png"} <= set(files) and any(f.endswith(".nii.gz") for f in files)
    summary = json.loads(storage.read_text(f"{out}/summary.json"))
    assert summary["checkpoint"] == "vanilla" and summary["prompts"][0]["prompt"] == "lesion"
    # a missing checkpoint on S3 is a clear error naming it
    missing = subprocess.run(
        [sys.executable, "-m", "medsam3.cli", "predict", scan, "--prompt", "lesion", "--checkpoint",
         f"{BUCKET}/models/nothing-here", "--out", f"{out}-2", f"storage.endpoint_url={s3_endpoint}"],
        capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "models/nothing-here" in missing.stderr
    assert not storage.listing(f"{out}-2")


@pytest.mark.slow
def test_dvc_pushes_and_pulls_shards_through_an_s3_remote(s3_shards, s3_endpoint, tmp_path):
    _, local = s3_shards
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    repo = tmp_path / "repo"
    repo.mkdir()

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "remote", "add", "-d", "store", f"{BUCKET}/dvc")
    run(*dvc, "remote", "modify", "--local", "store", "endpointurl", s3_endpoint)  # not committed
    shutil.copytree(local, repo / "shards")
    want = _digests(repo / "shards")
    run(*dvc, "add", "shards")
    run(*dvc, "push")
    pushed = [f for f in storage.listing(f"{BUCKET}/dvc") if f.startswith("files/md5/")]
    assert len(pushed) >= len(want)  # every file, plus the directory's listing
    shutil.rmtree(repo / "shards")
    shutil.rmtree(repo / ".dvc" / "cache")
    run(*dvc, "pull")
    assert _digests(repo / "shards") == want
    assert "endpointurl" not in (repo / ".dvc" / "config").read_text()


def test_storage_publishes_whole_folders_or_nothing(s3_endpoint, tmp_path):
    out = f"{BUCKET}/unit/folder"
    with storage.staged_output(out, last=["manifest.json"]) as staging:
        (staging / "a.txt").write_text("old")
        (staging / "stale.txt").write_text("x")
        (staging / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError), storage.staged_output(out) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert storage.read_text(f"{out}/a.txt") == "old"
    with storage.staged_output(out, last=["manifest.json"]) as staging:
        (staging / "a.txt").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(np.arange(10, dtype=np.uint8).tobytes())
        (staging / "manifest.json").write_text('{"v": 2}')
    assert sorted(storage.listing(out)) == ["a.txt", "manifest.json", "sub/b.bin"]
    assert not [f for f in storage.listing(f"{BUCKET}/unit") if f.startswith(".")]
    # a local copy is refreshed when the remote changes, and reused when it does not
    copy = storage.local_copy(out)
    assert (copy / "a.txt").read_text() == "new"
    (copy / "marker").write_text("kept while the remote is unchanged")
    assert (storage.local_copy(out) / "marker").is_file()
    with storage.staged_output(out) as staging:
        (staging / "a.txt").write_text("newer")
    copy = storage.local_copy(out)
    assert (copy / "a.txt").read_text() == "newer" and not (copy / "marker").exists()
    with pytest.raises(storage.StorageError, match="nothing"):
        storage.local_copy(f"{BUCKET}/unit/nothing")


def _fetch_in_another_process(uri: str, endpoint: str, cache_dir: str) -> str:
    storage.configure({"endpoint_url": endpoint, "cache_dir": cache_dir})
    return (storage.local_copy(uri) / "weights.bin").read_bytes().hex()


def test_processes_on_one_node_share_one_local_copy(s3_endpoint, tmp_path):
    """Evaluate actors and Serve replicas on one node fetch the same checkpoint at once."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    data = np.random.default_rng(0).integers(0, 255, 2_000_000, dtype=np.uint8).tobytes()
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(data)
    storage.upload(source, f"{BUCKET}/unit/model")
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(_fetch_in_another_process, [f"{BUCKET}/unit/model"] * 4, [s3_endpoint] * 4,
                            [str(tmp_path / "cache")] * 4))
    assert got == [data.hex()] * 4
    assert len(list((tmp_path / "cache" / "remote").iterdir())) == 2  # one copy (and its lock file)
