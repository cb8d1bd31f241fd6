"""LoRA fine-tuning (train.method=lora via peft) and the ZeRO stage as a setting.

The slow test trains adapters on a real CT lesion under Ray Train with DeepSpeed ZeRO-1, resumes
it, then checks that the loss fell, that no base weight moved, that the exported adapter applied
to the base gives the merged export's outputs, and that the Segmenter serves it on its base.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from medsam3.config import load_config
from medsam3.lora import DEFAULT_TARGETS
from pipelines.settings import TrainError, TrainSettings
from tests.conftest import LESION_CASE, OVERFIT

# Adapters on the default linears and on the heads too: the base here has random weights (a
# stand-in for a model trained elsewhere), so its frozen heads would score and mask nothing.
HEADS = (r"|.*mask_decoder\.(mask_embedder\.layers\.\d|instance_projection|semantic_projection)"
         r"|.*(dot_product_scoring\.(text_mlp\.layer\d|text_proj|query_proj)|detr_decoder\.(presence|box)_head\.layer\d)")
# The random base is no trained model: the DETR objective, which learns from random weights.
LORA = ["train.method=lora", "train.batch_size=2", "train.val_every=0", "train.val_fraction=0", "loss.objective=detr",
        "train.lora.r=8", "train.lora.alpha=16", "train.lora.dropout=0", "optim.lr_lora=4e-3"]


def settings(*overrides: str) -> TrainSettings:
    return TrainSettings.from_config(load_config("train", list(overrides)))


def test_zero_stage_follows_the_method_and_reaches_deepspeed():
    assert settings().zero_stage == 3
    assert settings("train.method=lora", "model.path=/ckpt").zero_stage == 0
    for stage in (0, 1, 2, 3):
        config = settings(f"train.zero_stage={stage}").deepspeed_config()["zero_optimization"]
        assert config["stage"] == stage
        assert ("stage3_gather_16bit_weights_on_model_save" in config) == (stage == 3)
    with pytest.raises(TrainError, match="set the stage with train.zero_stage"):
        settings("train.zero_optimization={stage: 1}")
    with pytest.raises(TrainError, match="zero_stage=4"):
        settings("train.zero_stage=4")
    with pytest.raises(TrainError, match="train.method='adapter'"):
        settings("train.method=adapter")
    with pytest.raises(TrainError, match="model.path"):  # adapters on random weights
        settings("train.method=lora")
    with pytest.raises(TrainError, match="train.mode=clips"):
        settings("train.method=lora", "model.path=/ckpt", "train.mode=clips", "model.preset=tiny_video")


def test_default_targets_are_the_attention_and_mlp_linears(tiny_checkpoint):
    from medsam3.lora import apply_lora, count_parameters
    from medsam3.model import build_model

    base = build_model(path=tiny_checkpoint)
    wrapped = apply_lora(base, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None})
    adapted = {name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for name, _ in wrapped.named_parameters() if ".lora_A." in name}
    stacks = {name.split(".layers.")[0] for name in adapted}
    assert stacks == {"vision_encoder.backbone", "text_encoder.text_model.encoder", "detr_encoder", "detr_decoder"}
    assert "detr_decoder.layers.0.text_cross_attn.q_proj" in adapted
    assert "vision_encoder.backbone.layers.1.mlp.fc2" in adapted
    assert not any(n.startswith(("mask_decoder", "geometry_encoder")) for n in adapted)
    trainable, total = count_parameters(wrapped)
    assert 0 < trainable < total / 10
    assert all(("lora_" in n) == p.requires_grad for n, p in wrapped.named_parameters())


def exports(run_dir: Path, out: Path, base: Path) -> tuple[Path, Path]:
    """A LoRA run's adapter and merged exports; checks that the adapter applied to the base with
    peft gives the merged model's outputs, and that it changes the base's."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from medsam3.model import build_model
    from pipelines.export import export_run
    from pipelines.recipe import probe_inputs

    adapter, merged = out / "adapter", out / "merged"
    export_run(run_dir, adapter)
    export_run(run_dir, merged, merge=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert not (adapter / "model.safetensors").exists()
    assert (adapter / "adapter_model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size / 4
    inputs = probe_inputs(AutoTokenizer.from_pretrained(adapter), 224)
    with torch.no_grad():
        applied = PeftModel.from_pretrained(build_model(path=base), adapter).eval()(**inputs)
        whole = build_model(path=merged).eval()(**inputs)
        plain = build_model(path=base).eval()(**inputs)
    torch.testing.assert_close(applied.pred_logits, whole.pred_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(applied.pred_masks, whole.pred_masks, atol=1e-3, rtol=1e-4)
    assert (applied.pred_masks - plain.pred_masks).abs().max() > 1e-2  # the adapter does change the model
    return adapter, merged


@pytest.mark.slow
def test_lora_run_overfits_keeps_the_base_and_exports_adapter_and_merged_model(
        ray_local, lesion_shards, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from pipelines.export import consolidated_state
    from pipelines.run_folder import RunFolder
    from pipelines.train import run_train

    run_dir = tmp_path / "lora-run"
    # ZeRO-1 (not LoRA's default 0): its checkpoints keep no frozen weights, so the export must take
    # the base from model.path; the second run resumes the first from its checkpoint at step 40
    for steps in (40, 80):
        cfg = load_config("train", [*OVERFIT, *LORA, f"model.path={tiny_checkpoint}", f"train.max_steps={steps}",
                                    "train.checkpoint_every=40", "train.zero_stage=1"])
        cfg.train.lora.target_modules = DEFAULT_TARGETS + HEADS
        assert run_train(lesion_shards / "shards", run_dir, cfg).error is None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))
    first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first / 2, (first, last)
    assert rows[40]["loss"] < first / 2  # resumed with the trained adapters, not fresh ones

    # the engine's own weights in its last checkpoint: every base weight as it started, bit for bit
    base_state = load_file(tiny_checkpoint / "model.safetensors")
    checkpoint = Path(RunFolder(run_dir).latest_checkpoint())
    module = torch.load(checkpoint / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
              for k, v in module.items() if "lora_" not in k}
    assert set(frozen) == set(base_state)
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)
    lora_b = [v for k, v in consolidated_state(checkpoint).items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # every adapter trained (B starts at 0)

    adapter, merged = exports(run_dir, tmp_path / "export", tiny_checkpoint)
    assert json.loads((adapter / "medsam3_export.json").read_text())["base"] == str(tiny_checkpoint)

    # served as an adapter on its base, the exported adapter answers as the merged model does
    from medsam3.inference import Segmenter, inference_config
    from medsam3.io.scan import read_scan

    case = read_scan(lesion_shards / "scans" / LESION_CASE).case
    on_base = Segmenter(tiny_checkpoint, inference_config(), adapters={"site": adapter})
    with_adapter = on_base.segment(case, ["lesion"], adapter="site")[0].mask
    assert with_adapter.any()
    merged_mask = Segmenter(merged, inference_config()).segment(case, ["lesion"])[0].mask
    assert np.mean(with_adapter != merged_mask) < 1e-3  # W x + B A x against (W + B A) x: rounding only
    assert OmegaConf.load(run_dir / "train_config.yaml").train.method == "lora"
