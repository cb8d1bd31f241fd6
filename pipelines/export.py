"""``medsam3 export``: a run's latest DeepSpeed checkpoint → a Hugging Face folder every stage loads.

The folder holds config.json, model.safetensors, the tokenizer, ``medsam3_export.json`` (the
run, step and trained prompts, and the cases the run held out for validation) and the run's
preprocessing plans, so inference preprocesses exactly as training did. A LoRA run
(``train.method=lora``) exports its adapter alone (peft's ``adapter_config.json`` +
``adapter_model.safetensors``, applied to the run's base by ``--adapter``), or with ``merge=true``
a model with the adapter merged into the base.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from medsam3.io import storage
from medsam3.plans import EXPORT_FILE
from pipelines.run_folder import SPLIT_FILE, TRAINER_STATE, RunFolder, is_run_file
from pipelines.settings import TrainError


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, tracker: str | None = "auto",
               allow_random_tracker: bool = False, merge: bool = False) -> str:
    """Consolidate the latest checkpoint of ``run_dir`` into ``out_dir`` (either may be an
    ``s3://`` URI); the folder appears whole or not at all. ``tracker`` (see configs/export.yaml)
    makes it a video model (detector + tracker) for 3D propagation; ``merge`` makes a LoRA run's
    export a whole model instead of its adapter."""
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
        lora = cfg.train.get("method", "full") == "lora"
        if lora:
            from medsam3.lora import apply_lora

            model = apply_lora(model, OmegaConf.to_container(cfg.train.lora, resolve=True))
        state = consolidated_state(local_checkpoint)
        if lora:  # the adapters from the run; the frozen base from model.path, in fp32 (ZeRO-1 does not save it)
            state = {k: v for k, v in state.items() if ".lora_" in k}
            wanted = [k for k in model.state_dict() if ".lora_" in k]
            missing = [k for k in wanted if k not in state]
            if missing or not wanted:
                raise TrainError(f"{checkpoint}: {len(missing)} of {len(wanted)} adapter tensors are not in the "
                                 f"checkpoint (e.g. {missing[:3]})")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if lora:
            missing = [m for m in missing if ".lora_" in m]
        if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
            raise TrainError(f"{checkpoint}: weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        adapter_only = lora and not merge
        if lora and merge:
            model = model.merge_and_unload()
        if not adapter_only:
            model = with_tracker(model, cfg, tracker, allow_random_tracker)
        prompts, split = local_run / "prompts.json", local_run / SPLIT_FILE
        weights = "adapter_model.safetensors" if adapter_only else "model.safetensors"
        with storage.staged_output(out_dir, last=[weights]) as staging:
            model.save_pretrained(staging)  # a PeftModel writes its adapter alone
            AutoTokenizer.from_pretrained(local_run / "tokenizer").save_pretrained(staging)
            if (local_run / PLANS_FILE).is_file():
                (staging / PLANS_FILE).write_bytes((local_run / PLANS_FILE).read_bytes())
            (staging / EXPORT_FILE).write_text(json.dumps(
                {"run": run.name, "checkpoint": storage.name(checkpoint),
                 "method": "lora" if lora else "full", "merged": lora and merge,
                 "base": cfg.model.path if lora else None,
                 "loss": {"objective": cfg.loss.get("objective"), "targets": cfg.loss.get("targets")},
                 "step": json.loads((local_checkpoint / TRAINER_STATE).read_text())["step"],
                 "prompts": json.loads(prompts.read_text()) if prompts.is_file() else None,
                 "split": json.loads(split.read_text()) if split.is_file() else None}, indent=1))
    return os.fspath(out_dir)


def consolidated_state(checkpoint: Path) -> dict:
    """The fp32 weights of a DeepSpeed checkpoint folder: gathered from the ranks' shards under
    ZeRO 1-3, the module's own state under stage 0 (every rank holds it whole)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any((checkpoint / "checkpoint").glob("*zero_pp_rank_*_optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="checkpoint")
    module = torch.load(checkpoint / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    return {name: tensor.float() for name, tensor in module.items()}


def with_tracker(model, train_cfg, tracker: str | None, allow_random_tracker: bool):
    """The exported model: the detector alone, or assembled with a tracker (see configs/export.yaml)."""
    from medsam3.model import CheckpointError, checkpoint_type
    from medsam3.video import assemble_video_model

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
