"""AdamW parameter groups with per-module learning rates and layer-wise decay, and the
inverse-square-root schedule (Medical SAM3's recipe; numbers in ``configs/train.yaml``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _backbone_scale(name: str, depth: int, decay: float) -> float:
    """BEiT-style layer-wise decay: embeddings get decay^(L+1), layer i decay^(L-i), the rest 1."""
    if ".embeddings." in name:
        return decay ** (depth + 1)
    match = _LAYER.search(name)
    if match:
        return decay ** (depth - int(match.group(1)))
    return 1.0


def param_groups(model: torch.nn.Module, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One group per (learning rate, weight decay); biases and norms get no weight decay."""
    vision_depth = model.config.vision_config.backbone_config.num_hidden_layers
    text_depth = model.config.text_config.num_hidden_layers
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("vision_encoder.backbone."):
            lr = optim["lr_backbone"] * _backbone_scale(name, vision_depth, optim["layer_decay"])
        elif name.startswith("text_encoder."):
            lr = optim["lr_backbone"] * _backbone_scale(name, text_depth, optim["layer_decay"])
        elif name.startswith(("vision_encoder.", "text_projection.")):
            lr = optim["lr_backbone"]
        elif name.startswith("geometry_encoder."):
            lr = optim["lr_prompt"]
        elif name.startswith("detr_encoder."):
            lr = optim["lr_detr_encoder"]
        else:  # detr_decoder, mask_decoder, dot_product_scoring
            lr = optim["lr_heads"]
        decay = 0.0 if param.ndim <= 1 else optim["weight_decay"]
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in sorted(groups.items())]


def inverse_sqrt_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to each group's lr, then lr × sqrt(warmup / step)."""
    warmup = max(1, int(warmup_steps))

    def factor(step: int) -> float:
        step += 1
        return step / warmup if step < warmup else (warmup / step) ** 0.5

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
