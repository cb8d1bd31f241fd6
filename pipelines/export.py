"""``medsam3 export``: a run's latest ZeRO-3 checkpoint → a Hugging Face folder every stage loads.

The folder holds config.json, model.safetensors, the tokenizer, ``medsam3_export.json`` (the
run, step and trained prompts, and the cases the run held out for validation) and the run's
preprocessing plans, so inference preprocesses exactly as training did.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from medsam3.io import storage
from pipelines.run_folder import SPLIT_FILE, TRAINER_STATE, RunFolder, is_run_file
from pipelines.settings import TrainError

EXPORT_FILE = "medsam3_export.json"


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tracker: str | None = "auto",
               allow_random_tracker: bool = False) -> str:
    """Consolidate the latest ZeRO-3 checkpoint of ``run_dir`` into ``out_dir`` (either may be
    an ``s3://`` URI); the folder appears whole or not at all. ``tracker`` (see
    configs/export.yaml) makes it a video model (detector + tracker) for 3D propagation."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer

    from medsam3.model import build_model
    from medsam3.plans import PLANS_FILE
    from medsam3.video import build_video_model

    run = RunFolder(run_dir)
    checkpoint = run.latest_checkpoint()
    with tempfile.TemporaryDirectory(prefix="medsam3-export-") as tmp:
        # a remote run: fetch the newest checkpoint and the run's own files
        local_run = Path(tmp, "run") if run.remote else Path(run.uri)
        local_checkpoint = local_run / storage.name(checkpoint)
        if run.remote:
            wanted = [f for f in storage.listing(run.uri)
                      if f.startswith(f"{storage.name(checkpoint)}/") or is_run_file(f)]
            storage.download(run.uri, local_run, wanted)
        cfg = OmegaConf.load(local_run / "train_config.yaml")
        if cfg.train.get("mode", "images") == "clips":  # the detector and its trained tracker
            model = build_video_model(cfg.model.preset, cfg.model.path)
        else:
            model = build_model(cfg.model.preset, cfg.model.path)
        state = get_fp32_state_dict_from_zero_checkpoint(str(local_checkpoint), tag="checkpoint")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
            raise TrainError(f"{checkpoint}: weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        model = with_tracker(model, cfg, tracker, allow_random_tracker)
        prompts, split = local_run / "prompts.json", local_run / SPLIT_FILE
        with storage.staged_output(out_dir, last=["model.safetensors"]) as staging:
            model.save_pretrained(staging)
            AutoTokenizer.from_pretrained(local_run / "tokenizer").save_pretrained(staging)
            if (local_run / PLANS_FILE).is_file():
                (staging / PLANS_FILE).write_bytes((local_run / PLANS_FILE).read_bytes())
            (staging / EXPORT_FILE).write_text(json.dumps(
                {"run": run.name, "checkpoint": storage.name(checkpoint),
                 "step": json.loads((local_checkpoint / TRAINER_STATE).read_text())["step"],
                 "prompts": json.loads(prompts.read_text()) if prompts.is_file() else None,
                 "split": json.loads(split.read_text()) if split.is_file() else None}, indent=1))
    return os.fspath(out_dir)


def with_tracker(model, train_cfg, tracker: str | None, allow_random_tracker: bool):
    """The exported model: the detector alone, or assembled with a tracker (see configs/export.yaml)."""
    from medsam3.model import CheckpointError
    from medsam3.video import assemble_video_model, checkpoint_type

    if model.config.model_type == "sam3_video":  # a clip-trained run: its own tracker
        return model
    source = None if tracker in (None, "none", "null") else str(tracker)
    if source == "auto":
        start = train_cfg.model.path
        source = start if start is not None and checkpoint_type(start) == "sam3_video" else None
    if source is None and not allow_random_tracker:
        return model
    try:
        return assemble_video_model(model, source, train_cfg.model.preset, allow_random_tracker)
    except CheckpointError as exc:
        raise TrainError(f"export.tracker: {exc}") from exc
