"""AdamW parameter groups and the learning-rate schedule of Medical SAM3's released recipe
(numbers in ``configs/train.yaml``; docs/training.md compares them with the release)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")
VISION_TRUNK = "vision_encoder.backbone."
DETECTOR = "detector_model."  # a video model's detector: the same groups as the image model


def _vision_scale(name: str, depth: int, decay: float) -> float:
    """Layer-wise decay of the ViT trunk (Meta's recipe): the patch embedding decay^(L+1), block i
    decay^(L-i), the position embeddings and the rest of the model 1."""
    if ".position_embeddings" in name:
        return 1.0
    if ".embeddings." in name:
        return decay ** (depth + 1)
    match = _LAYER.search(name)
    return decay ** (depth - int(match.group(1))) if match else 1.0


def _no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Biases and LayerNorm parameters, as released (GroupNorm weights keep their decay)."""
    names = {name for name, _ in model.named_parameters() if "bias" in name}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.LayerNorm):
            names |= {f"{module_name}.{p}" for p, _ in module.named_parameters(recurse=False)}
    return names


def _tracker_rate(name: str, optim: Mapping[str, Any]) -> tuple[float, bool]:
    """The released tracker groups: its SAM mask decoder with the heads, its memory encoder with
    the vision backbone, its memory attention (Meta's ``tracker.transformer.encoder``) at the
    DETR encoder's constant rate; the rest (prompt encoder, object pointer projection, memory
    embeddings: in no released group) ``lr_tracker``."""
    if name.startswith("mask_decoder."):
        return optim["lr_heads"], False
    if name.startswith("memory_encoder."):
        return optim["lr_backbone"], False
    if name.startswith("memory_attention."):
        return optim["lr_detr_encoder"], True
    return optim["lr_tracker"], False


def param_groups(model: torch.nn.Module, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One group per (learning rate, weight decay, constant): heads 3e-4, geometry encoder 1e-4,
    vision trunk (layer-decayed) and neck, text encoder and projection 5e-5, the DETR encoder a
    constant rate that the schedule leaves alone (``constant: True``). In a video model the
    detector's parameters get the same groups and the tracker's those of ``_tracker_rate``."""
    config = getattr(model.config, "detector_config", model.config)  # a video model: its detector's
    depth = config.vision_config.backbone_config.num_hidden_layers
    exempt = _no_weight_decay(model)
    groups: dict[tuple[float, float, bool], list[torch.nn.Parameter]] = {}
    for full_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = full_name.removeprefix(DETECTOR)
        constant = name.startswith("detr_encoder.")
        if name.startswith("tracker_model."):
            lr, constant = _tracker_rate(name.removeprefix("tracker_model."), optim)
        elif name.startswith("tracker_neck."):  # the tracker's neck on the shared vision trunk
            lr = optim["lr_backbone"]
        elif name.startswith(VISION_TRUNK):
            lr = optim["lr_backbone"] * _vision_scale(name, depth, optim["layer_decay"])
        elif name.startswith(("vision_encoder.", "text_encoder.", "text_projection.")):
            lr = optim["lr_backbone"]
        elif name.startswith("geometry_encoder."):
            lr = optim["lr_prompt"]
        elif constant:
            lr = optim["lr_detr_encoder"]
        else:  # detr_decoder, mask_decoder (with the semantic head), dot_product_scoring
            lr = optim["lr_heads"]
        decay = 0.0 if full_name in exempt else optim["weight_decay"]
        groups.setdefault((lr, decay, constant), []).append(param)
    return [{"params": p, "lr": lr, "weight_decay": wd, "constant": constant}
            for (lr, wd, constant), p in sorted(groups.items())]


def lr_factor(step: int, warmup: int, timescale: int, cooldown: int, total: int) -> float:
    """The released inverse-square-root schedule at optimizer step ``step`` (0-based): linear
    warm-up from 0 over ``warmup`` steps, then sqrt(timescale / (step - warmup + timescale)), and
    a linear cooldown to 0 over the last ``cooldown`` of ``total`` steps."""
    factor = min(1.0, step / warmup) if warmup > 0 else 1.0
    if step > warmup:
        factor *= (timescale / (step - warmup + timescale)) ** 0.5
    if cooldown > 0:
        factor *= max(0.0, min(1.0, (total - step) / cooldown))
    return factor


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any],
                          total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` for every group but the constant ones (the DETR encoder), which keep their rate."""
    warmup, timescale = int(optim["warmup_steps"]), int(optim["lr_timescale"])
    cooldown = int(optim["cooldown_steps"])

    def scheduled(step: int) -> float:
        return lr_factor(step, warmup, timescale, cooldown, int(total_steps))

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [(lambda _: 1.0) if group.get("constant") else scheduled for group in optimizer.param_groups])
