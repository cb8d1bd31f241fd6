"""The DVC pipeline: `dvc repro` runs phantom → prepare → train → export → evaluate with params.yaml,
reproducibly, and re-runs only what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_pipeline_runs_end_to_end_and_reruns_only_what_changed(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    for folder in ("configs", "medsam3", "preprocessing", "pipelines"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["image_size"] = 128  # keep the test fast; the stage must pass it through
    params["train"]["train"] |= {"max_steps": 4, "checkpoint_every": 2, "val_every": 0, "batch_size": 1}
    params["evaluate"]["gallery"] = 0
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def dvc(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=work, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    dvc("init", "-q")
    dvc("repro")
    manifest = json.loads((work / "data" / "shards" / "manifest.json").read_text())
    assert manifest["config"]["image_size"] == 128 and manifest["num_cases"] == 4
    assert {c["label"] for c in manifest["counts"]} >= {"liver", "spleen", "lung_left", "vertebra"}
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    first = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert "up to date" in dvc("status")
    # the whole chain ran: a trained, exported, evaluated model, with metrics and plots for DVC
    assert json.loads((work / "runs" / "demo" / "train_config.yaml").parent.joinpath("prompts.json").read_text())
    assert (work / "models" / "demo" / "model.safetensors").is_file()
    metrics = json.loads((work / "reports" / "demo" / "metrics.json").read_text())
    assert set(metrics["demo"]) == {"text", "text+box"} and 0 <= metrics["demo"]["text"]["dice"] <= 1
    assert "dice" in dvc("metrics", "show")
    dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    assert (work / "runs" / "demo" / "curves.csv").read_text().startswith("step,loss")

    dvc("repro", "prepare", "--force", "--single-item")  # same inputs → the same shard directory hash
    assert yaml.safe_load((work / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"] == first
    assert "up to date" in dvc("status")

    # a training parameter changes: train and what follows are stale, prepare is not
    params["train"]["train"]["max_steps"] = 5
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    stale = dvc("status")
    assert "train:" in stale and "prepare:" not in stale and "phantom:" not in stale
    # an input scan changes: prepare is stale too
    scan = sorted((work / "data" / "phantom").rglob("*.nii.gz"))[0]
    scan.write_bytes(scan.read_bytes() + b"\0")
    assert "prepare:" in dvc("status")
