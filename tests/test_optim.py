"""Learning rates as released: per-module rates, layer decay on the vision trunk only, a constant
DETR-encoder rate, warm-up from 0 over 100 steps, inverse square root with timescale 10, a
cooldown to 0, and no weight decay on biases and LayerNorm parameters."""

from __future__ import annotations

import pytest
import torch

from medsam3.config import load_config
from medsam3.model import build_model
from medsam3.optim import inverse_sqrt_schedule, lr_factor, param_groups


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = build_model("tiny")
    optim = load_config("train").optim
    return model, optim, param_groups(model, optim)


def rate_of(groups, model, name: str) -> tuple[float, float, bool]:
    param = dict(model.named_parameters())[name]
    (group,) = [g for g in groups if any(p is param for p in g["params"])]
    return group["lr"], group["weight_decay"], group["constant"]


def test_per_module_rates_and_decay(setup):
    model, optim, groups = setup
    depth = model.config.vision_config.backbone_config.num_hidden_layers  # 2 in the tiny preset
    names = [n for n, _ in model.named_parameters()]
    first_block = next(n for n in names if n.startswith("vision_encoder.backbone.") and ".layers.0." in n
                       and n.endswith("weight") and "norm" not in n)
    assert rate_of(groups, model, first_block)[0] == pytest.approx(5e-5 * 0.85**depth)
    patch = "vision_encoder.backbone.embeddings.patch_embeddings.projection.weight"
    assert rate_of(groups, model, patch)[0] == pytest.approx(5e-5 * 0.85 ** (depth + 1))
    assert rate_of(groups, model, "vision_encoder.backbone.embeddings.position_embeddings")[0] == 5e-5
    text = next(n for n in names if n.startswith("text_encoder.") and ".layers.0." in n and n.endswith("weight"))
    assert rate_of(groups, model, text)[0] == 5e-5  # the text encoder is not layer-decayed
    detr = next(n for n in names if n.startswith("detr_encoder.") and n.endswith("weight"))
    assert rate_of(groups, model, detr)[0] == 1e-5 and rate_of(groups, model, detr)[2] is True
    geometry = next(n for n in names if n.startswith("geometry_encoder.") and n.endswith("weight"))
    assert rate_of(groups, model, geometry)[0] == 1e-4
    head = next(n for n in names if n.startswith("detr_decoder.") and n.endswith("weight"))
    assert rate_of(groups, model, head)[:2] == (3e-4, 0.05)
    layer_norm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    group_norm = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm))
    assert rate_of(groups, model, f"{layer_norm}.weight")[1] == 0.0
    assert rate_of(groups, model, f"{group_norm}.weight")[1] == 0.05  # only LayerNorm and biases are exempt
    assert rate_of(groups, model, f"{group_norm}.bias")[1] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(names)


def test_the_released_schedule():
    factor = [lr_factor(s, warmup=100, timescale=10, cooldown=50, total=1000) for s in range(1000)]
    assert factor[0] == 0 and factor[50] == pytest.approx(0.5) and factor[100] == pytest.approx(1.0)
    assert factor[190] == pytest.approx((10 / 100) ** 0.5)  # sqrt(10 / (190 - 90))
    assert factor[975] == pytest.approx((10 / 885) ** 0.5 * 0.5)  # half way through the cooldown
    assert max(factor) == pytest.approx(1.0) and factor[-1] < factor[950] / 40


def test_the_detr_encoder_keeps_its_rate_through_the_schedule(setup):
    model, optim, groups = setup
    optimizer = torch.optim.AdamW(groups)
    scheduler = inverse_sqrt_schedule(optimizer, optim, total_steps=300)
    seen = []
    for _ in range(260):
        seen.append({(g["constant"], g["lr"]) for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    constant = {lr for step in seen for c, lr in step if c}
    assert constant == {1e-5}
    heads = [max(lr for c, lr in step if not c) for step in seen]
    assert heads[0] == 0 and heads[100] == pytest.approx(3e-4) and heads[-1] < heads[200]


def train_settings(*overrides: str, params: str | None = None):
    from pipelines.settings import TrainSettings

    return TrainSettings.from_config(load_config("train", list(overrides), params_file=params))


def test_a_schedule_longer_than_the_run_is_named_before_training():
    """The released 100 warm-up and 50 cooldown steps in a 40-step run: the rate peaks at 8% of its
    value (step 20: 20/100 × 20/50)."""
    message = train_settings("train.max_steps=40").schedule_warning()
    assert "optim.warmup_steps=100" in message and "optim.cooldown_steps=50" in message
    assert "train.max_steps=40" in message and "8% of its peak" in message
    assert "optim.warmup_steps=4 optim.cooldown_steps=8" in message
    assert train_settings("train.max_steps=1000").schedule_warning() is None
    assert train_settings(params="params.yaml").schedule_warning() is None  # the demo's schedule


def test_the_objective_follows_the_weights_a_run_starts_from(tmp_path):
    """auto: detr for a preset's random weights; for trained weights the objective their export
    records, detr for an export without the record, released for weights with no export record
    (SAM3's own, an import)."""
    import json

    from pipelines.settings import TrainError

    for name, record in {"ours-released": {"loss": {"objective": "released"}}, "ours-old": {}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "medsam3_export.json").write_text(json.dumps(record))
    assert train_settings(f"model.path={tmp_path / 'ours-released'}").objective == "released"
    assert train_settings(f"model.path={tmp_path / 'ours-old'}").objective == "detr"
    preset, trained = train_settings(), train_settings(f"model.path={tmp_path / 'sam3'}")
    assert (preset.objective, preset.targets.kind, preset.loss["objective"]) == ("detr", "components", "detr")
    assert (trained.objective, trained.targets.kind) == ("released", "union")
    assert trained.loss["class_pos_weight"] == 10.0 and "class_pos_weight" not in preset.loss
    chosen = train_settings("model.path=/ckpt", "loss.objective=detr", "loss.targets=union")
    assert (chosen.objective, chosen.targets.kind) == ("detr", "union")
    demo = train_settings(params="params.yaml")
    assert demo.objective == "detr" and demo.loss["class_alpha"] == 0.5
    with pytest.raises(TrainError, match="loss.objective='dice'"):
        train_settings("loss.objective=dice")
    with pytest.raises(TrainError, match="loss.targets='instances'"):
        train_settings("loss.targets=instances")


def test_the_tracker_gets_the_released_groups():
    from medsam3.clip_model import Sam3VideoForClipTraining
    from medsam3.video import preset_video_config

    torch.manual_seed(0)
    model = Sam3VideoForClipTraining(preset_video_config("tiny_video"))
    optim = load_config("train").optim
    groups = param_groups(model, optim)
    names = [n for n, _ in model.named_parameters()]

    def first(prefix: str) -> str:
        return next(n for n in names if n.startswith(prefix) and n.endswith("weight"))

    assert rate_of(groups, model, first("tracker_model.mask_decoder."))[::2] == (optim.lr_heads, False)
    assert rate_of(groups, model, first("tracker_model.memory_encoder."))[::2] == (optim.lr_backbone, False)
    assert rate_of(groups, model, first("tracker_model.memory_attention."))[::2] == (optim.lr_detr_encoder, True)
    assert rate_of(groups, model, first("tracker_model.prompt_encoder."))[::2] == (optim.lr_tracker, False)
