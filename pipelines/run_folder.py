"""A training run's folder, local or ``s3://``, as one object.

Ray Train writes the checkpoints (``checkpoint_*/``) straight to the run folder. The driver keeps
the run's own files (config, prompts, split, logs, curves, tokenizer) in a local working copy,
which for a remote run is fetched when it resumes and uploaded at each checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from medsam3.io import storage
from pipelines.settings import TrainError

TRAINER_STATE = "trainer_state.json"
SPLIT_FILE = "split.json"
# Files the driver keeps beside the checkpoints (a remote run's local working copy holds these).
RUN_FILES = ("train_config.yaml", "prompts.json", SPLIT_FILE, "plans.json", "metrics.jsonl", "curves.csv",
             "curves.png")


class RunFolder:
    def __init__(self, uri: str | os.PathLike):
        self.uri = os.fspath(uri) if storage.is_remote(uri) else os.fspath(Path(uri).absolute())
        self.remote = storage.is_remote(self.uri)
        self.local = storage.cache_folder("runs", self.uri) if self.remote else Path(self.uri)

    @property
    def name(self) -> str:
        return storage.name(self.uri)

    def open(self) -> RunFolder:
        """Make the local working copy current (fetching a remote run's files to resume it)."""
        if self.remote:
            files = [f for f in storage.listing(self.uri) if is_run_file(f)]
            if self.local.exists():
                shutil.rmtree(self.local)
            self.local.mkdir(parents=True)
            if files:
                storage.download(self.uri, self.local, files)
        self.local.mkdir(parents=True, exist_ok=True)
        return self

    def sync(self) -> None:
        """Upload the working copy's run files to a remote run (nothing to do for a local one)."""
        if not self.remote:
            return
        fs, inner = storage.filesystem(self.uri)
        for file in [*(self.local / f for f in RUN_FILES), *sorted((self.local / "tokenizer").glob("*"))]:
            if file.is_file():
                fs.put_file(os.fspath(file), f"{inner}/{file.relative_to(self.local).as_posix()}")

    def log_metrics(self, metrics: dict[str, Any]) -> None:
        """One step's metrics: a JSON line in ``metrics.jsonl`` and a readable line on the console."""
        with open(self.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        print(progress_line(metrics), flush=True)

    def latest_checkpoint(self) -> str:
        """The newest complete checkpoint folder (by its step)."""
        found = []
        for file in storage.listing(self.uri):
            parts = file.split("/")
            if len(parts) == 2 and parts[0].startswith("checkpoint_") and parts[1] == TRAINER_STATE:
                step = json.loads(storage.read_text(storage.join(self.uri, file)))["step"]
                found.append((step, storage.join(self.uri, parts[0])))
        if not found:
            raise TrainError(f"{self.uri}: no checkpoint with {TRAINER_STATE}; not a medsam3 training run")
        return max(found)[1]

    def plot_curves(self) -> Path | None:
        return plot_curves(self.local)


def is_run_file(relative: str) -> bool:
    return relative in RUN_FILES or relative.startswith("tokenizer/")


def progress_line(m: dict[str, Any]) -> str:
    """``step 12/80 (15%)  loss 3.41  dice 0.52  val 0.48  lr 1.0e-03  2.1 samples/s  ETA 4m05s``."""
    if "loss" not in m:  # step 0: validation of the weights a run starts from
        return f"step 0/{m['max_steps']}  val {m['val_dice']:.3f} ({m['val_samples']} samples): the starting weights"
    line = f"step {m['step']}/{m['max_steps']} ({100 * m['step'] // m['max_steps']}%)  loss {m['loss']:.4g}"
    line += f"  dice {m['train_dice']:.3f}"
    if "tracker_dice" in m:  # clip mode: the tracker's masks through the clip
        line += f"  tracker {m['tracker_dice']:.3f}"
    if "val_dice" in m:
        line += f"  val {m['val_dice']:.3f} ({m['val_samples']} samples)"
    eta = m.get("eta_s")
    line += f"  lr {m['lr']:.2g}  {m['samples_per_s']:.3g} samples/s"
    if eta is not None and math.isfinite(eta):
        line += f"  ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
    return line


def plot_curves(folder: Path) -> Path | None:
    """metrics.jsonl → curves.csv (for ``dvc plots``) and curves.png (loss terms, lr, validation Dice)."""
    log = Path(folder) / "metrics.jsonl"
    if not log.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r for r in records}  # the last record of a redone step
    columns = ["step", "loss", "train_dice", "val_dice", "lr", "samples_per_s"]
    lines = [",".join(columns)] + [",".join(str(by_step[k].get(c, "")) for c in columns) for k in sorted(by_step)]
    (Path(folder) / "curves.csv").write_text("\n".join(lines) + "\n")
    steps = [r["step"] for r in records]
    not_terms = {"step", "max_steps", "epoch", "lr", "samples_per_s", "frames_per_s", "val_dice", "val_samples",
                 "train_dice", "tracker_dice", "step_s", "data_wait_s", "eta_s", "memory_mb", "peak_memory_mb"}
    terms = [k for k, v in records[-1].items()
             if k not in not_terms and isinstance(v, int | float) and not isinstance(v, bool)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in terms:
        axes[0].plot(steps, [r.get(key, math.nan) for r in records], label=key)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss terms")
    axes[1].plot(steps, [r["lr"] for r in records])
    axes[1].set_title("learning rate (heads)")
    val = [(r["step"], r["val_dice"]) for r in records if "val_dice" in r]
    if val:
        axes[2].plot(*zip(*val, strict=True), marker="o")
    axes[2].set_title("validation Dice")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(folder) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
