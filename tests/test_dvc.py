"""The DVC pipeline: `dvc repro` runs phantom → prepare with params.yaml, reproducibly."""

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
def test_dvc_repro_prepare_stage_is_reproducible(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    for folder in ("configs", "medsam3", "preprocessing"):
        shutil.copytree(REPO / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["image_size"] = 128  # keep the test fast; the stage must pass it through
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
    assert manifest["config"]["image_size"] == 128 and manifest["num_cases"] == 3
    assert {c["label"] for c in manifest["counts"]} >= {"liver", "spleen", "lung_left", "vertebra"}
    lock = yaml.safe_load((work / "dvc.lock").read_text())
    first = lock["stages"]["prepare"]["outs"][0]["md5"]
    assert "up to date" in dvc("status")
    dvc("repro", "--force")  # same inputs → the same shard directory hash
    assert yaml.safe_load((work / "dvc.lock").read_text())["stages"]["prepare"]["outs"][0]["md5"] == first
