"""The DVC pipeline: `dvc repro` runs phantom → prepare → train → export → evaluate with params.yaml,
reproducibly, and re-runs only what changed."""

from __future__ import annotations

import ast
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_import_graph import closure, imported_names, module_file, project_modules, runtime_nodes

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "medsam3" / "cli.py"  # the `medsam3` command (pyproject's project.scripts)


def stage_modules(cmd: str) -> set[str]:
    """The project modules a stage's ``medsam3 <subcommand> ...`` command runs: medsam3/cli.py, what
    it imports at module level and in its branch for the subcommand, and all that those import."""
    program, command = shlex.split(cmd)[:2]
    assert program == "medsam3", f"{cmd!r}: not a medsam3 command"
    tree = ast.parse(CLI.read_text())
    branches = [node for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and ast.unparse(node.test) == f"args.command == {command!r}"]
    assert len(branches) == 1, f"medsam3/cli.py has no branch for {command!r}"
    nodes = [*runtime_nodes(tree, functions=False), *(n for stmt in branches[0].body for n in runtime_nodes(stmt))]
    return {"medsam3.cli"} | closure(project_modules(imported_names(nodes, CLI)))


def stage_files(stage: dict) -> set[Path]:
    return {module_file(name).relative_to(REPO) for name in stage_modules(stage["cmd"])}


def unlisted_code(stage: dict) -> list[str]:
    """The files of the code a stage runs that none of its deps (a file or a folder) covers."""
    deps = [Path(dep) for dep in stage.get("deps", [])]
    return sorted(str(f) for f in stage_files(stage) if not any(f == dep or dep in f.parents for dep in deps))


def test_the_code_of_a_stage_is_found_through_lazy_imports():
    train = {module_file(m).relative_to(REPO).as_posix() for m in stage_modules("medsam3 train a b")}
    # pipelines/train.py imports these inside functions, and medsam3/cli.py imports it inside main()
    assert {"pipelines/train.py", "pipelines/clip_data.py", "medsam3/lora.py", "medsam3/__init__.py",
            "pipelines/__init__.py", "medsam3/cli.py", "medsam3/config.py"} <= train
    assert not any(f.startswith(("serve/", "preprocessing/")) for f in train)  # other subcommands' code
    assert unlisted_code({"cmd": "medsam3 phantom out", "deps": ["medsam3"]}) == []
    assert unlisted_code({"cmd": "medsam3 phantom out", "deps": ["medsam3/cli.py", "medsam3/config.py",
                                                                  "medsam3/errors.py", "medsam3/io"]}) == [
        "medsam3/__init__.py", "medsam3/phantom.py", "medsam3/transforms.py", "medsam3/vocab.py"]


def test_every_stage_lists_the_code_it_runs_as_deps():
    """`dvc repro` re-runs a stage when code it runs changes: each file of it is a dep (or in one)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    missing = {name: files for name, stage in stages.items() if (files := unlisted_code(stage))}
    assert not missing, "dvc.yaml: code a stage runs but does not list in its deps: " + "; ".join(
        f"{name}: {', '.join(files)}" for name, files in missing.items())
    # and no module it does not run (which would re-run it for nothing)
    extra = {name: files for name, stage in stages.items()
             if (files := sorted({d for d in stage.get("deps", []) if d.endswith(".py")}
                                 - {str(f) for f in stage_files(stage)}))}
    assert not extra, "dvc.yaml: deps on modules the stage does not run: " + "; ".join(
        f"{name}: {', '.join(files)}" for name, files in extra.items())


@pytest.mark.slow
def test_dvc_pipeline_runs_end_to_end_and_reruns_only_what_changed(ray_local, tmp_path):
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
    # every stage joins the session's Ray (RAY_ADDRESS), as stages join a cluster, instead of starting its own
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}

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
