"""Box prompts for transformers' SAM3 without torchvision.

SAM3's geometry encoder pools image features inside each prompt box with
``torchvision.ops.roi_align``. This project does not depend on torchvision (its PyPI build does
not load beside the pinned CPU torch), so :func:`enable_box_prompts` gives the SAM3 module a
``torchvision.ops.roi_align`` with torchvision's semantics written in plain torch. The network
itself is untouched.
"""

from __future__ import annotations

import math
import types
from collections.abc import Sequence

import torch


def roi_align(
    features: torch.Tensor,
    boxes: Sequence[torch.Tensor] | torch.Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> torch.Tensor:
    """torchvision's ``roi_align``: average of bilinear samples in each output bin.

    ``features`` (N, C, H, W); ``boxes`` a list of (K_i, 4) xyxy tensors, one per image (or a
    (K, 5) tensor whose first column is the image index). Returns (sum K_i, C, ph, pw).
    """
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    if isinstance(boxes, torch.Tensor):
        index, coords = boxes[:, 0].long(), boxes[:, 1:]
    else:
        index = torch.cat([torch.full((len(b),), i, dtype=torch.long, device=features.device)
                           for i, b in enumerate(boxes)])
        coords = torch.cat(list(boxes)) if len(boxes) else features.new_zeros((0, 4))
    pooled = [
        _pool_one(features[i], box, ph, pw, spatial_scale, sampling_ratio, aligned)
        for i, box in zip(index.tolist(), coords, strict=True)
    ]
    if not pooled:
        return features.new_zeros((0, features.shape[1], ph, pw))
    return torch.stack(pooled)


def _pool_one(feature, box, ph, pw, scale, sampling_ratio, aligned):
    channels, height, width = feature.shape
    offset = 0.5 if aligned else 0.0
    # sample positions and weights in float32 whatever the features' dtype (bf16 would round a
    # coordinate of 250.3 to 250), the result in the features' dtype, as torchvision does
    coord = torch.promote_types(feature.dtype, torch.float32)
    x1, y1, x2, y2 = (box.to(feature.device, coord) * scale - offset).unbind()
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision forces malformed boxes to 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    grid_h = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(float(roi_h) / ph))
    grid_w = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(float(roi_w) / pw))
    grid = {"dtype": coord, "device": feature.device}
    steps_h = (torch.arange(grid_h, **grid) + 0.5) / grid_h
    steps_w = (torch.arange(grid_w, **grid) + 0.5) / grid_w
    ys = y1 + (torch.arange(ph, **grid)[:, None] + steps_h[None, :]) * bin_h  # (ph, gh)
    xs = x1 + (torch.arange(pw, **grid)[:, None] + steps_w[None, :]) * bin_w  # (pw, gw)
    y, x = ys.reshape(-1)[:, None], xs.reshape(-1)[None, :]  # every sample point of the box
    y, x = y.expand(-1, x.shape[1]), x.expand(y.shape[0], -1)
    outside = (y < -1.0) | (y > height) | (x < -1.0) | (x > width)
    y, x = y.clamp(min=0), x.clamp(min=0)
    y_low, x_low = y.floor().long().clamp(max=height - 1), x.floor().long().clamp(max=width - 1)
    y_high, x_high = (y_low + 1).clamp(max=height - 1), (x_low + 1).clamp(max=width - 1)
    y = torch.where(y_low >= height - 1, y_low.to(y.dtype), y)
    x = torch.where(x_low >= width - 1, x_low.to(x.dtype), x)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    flat = feature.reshape(channels, -1)

    def at(yy, xx):
        return flat[:, (yy * width + xx).reshape(-1)].reshape(channels, *yy.shape)

    value = (hy * hx * at(y_low, x_low) + hy * lx * at(y_low, x_high)
             + ly * hx * at(y_high, x_low) + ly * lx * at(y_high, x_high))
    value = value.masked_fill(outside, 0.0)
    value = value.reshape(channels, ph, grid_h, pw, grid_w)
    return value.mean(dim=(2, 4)).to(feature.dtype)


def enable_box_prompts() -> None:
    """Let transformers' SAM3 take box prompts when torchvision is not installed."""
    from transformers.models.sam3 import modeling_sam3

    if not hasattr(modeling_sam3, "torchvision"):
        modeling_sam3.torchvision = types.SimpleNamespace(ops=types.SimpleNamespace(roi_align=roi_align))
