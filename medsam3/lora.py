"""LoRA fine-tuning of SAM3 with peft: the adapter configuration, wrapping, and its optimizer group.

``train.method=lora`` wraps the model in a ``peft.PeftModel`` whose low-rank adapters sit on the
attention and MLP linears named by ``train.lora.target_modules`` (a regular expression over
module names, peft's ``fullmatch``); every base weight is frozen. ``medsam3 export`` writes the
adapter alone (peft's ``adapter_config.json`` + ``adapter_model.safetensors``) or, with
``merge=true``, the base with the adapter merged in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

# The attention (q/k/v/o) and MLP linears of the vision trunk, the CLIP text encoder and the DETR
# encoder and decoder; a video model's detector matches too (its names start `detector_model.`).
DEFAULT_TARGETS = (r".*(vision_encoder\.backbone|text_encoder\.text_model\.encoder|detr_encoder|detr_decoder)"
                   r"\.layers\.\d+\.(attention|self_attn|cross_attn|text_cross_attn|vision_cross_attn|mlp)"
                   r"\.(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2)")


def lora_config(lora: Mapping[str, Any]):
    """peft's ``LoraConfig`` from the ``train.lora`` section (r, alpha, dropout, target_modules)."""
    from peft import LoraConfig

    targets = lora.get("target_modules") or DEFAULT_TARGETS
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=targets if isinstance(targets, str) else list(targets), bias="none")


def apply_lora(model: torch.nn.Module, lora: Mapping[str, Any]):
    """``model`` wrapped for LoRA training: adapters injected (in place), every base weight frozen.
    A pattern that matches no module is refused by peft, naming it."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def lora_param_groups(model: torch.nn.Module, optim: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One AdamW group: the adapters' parameters at ``optim.lr_lora``, no weight decay (the
    low-rank update starts at zero; decay would pull it back towards the base)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": params, "lr": float(optim["lr_lora"]), "weight_decay": 0.0, "constant": False}]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
