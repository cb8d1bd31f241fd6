"""Medical SAM3's training objective on transformers' SAM3 outputs.

Per sample (one image and one text prompt): the decoder's queries are matched one-to-one to the
ground-truth instances (Hungarian matching on class, box L1 and GIoU costs), then
- classification: sigmoid focal loss on every query (matched → 1, the rest → 0);
- presence: BCE on the image-level "is the prompted concept here" logit;
- boxes: L1 + GIoU on matched pairs (normalised xyxy);
- masks: focal + Dice on matched pairs, predictions upsampled to the target grid;
- semantic head: focal + Dice against the union of the instances.
Every weight is a config number (``configs/train.yaml``, ``loss:``). The terms are computed in
float32 on the model's device whatever the model's dtype (bf16 on GPUs): targets are moved there,
and every tensor made here is made there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.optimize import linear_sum_assignment


@dataclass
class Target:
    """Ground truth of one sample: instance boxes (n, 4) normalised xyxy and masks (n, H, W)."""

    boxes: torch.Tensor
    masks: torch.Tensor

    @property
    def num(self) -> int:
        return int(self.boxes.shape[0])

    def to(self, device: torch.device) -> Target:
        return Target(self.boxes.to(device, torch.float32), self.masks.to(device, torch.float32))


def instances_from_mask(mask: np.ndarray, min_pixels: int = 1, max_instances: int | None = None) -> Target:
    """Split a binary mask into connected instances (8-connectivity) with normalised boxes; with
    ``max_instances`` only the largest are kept (a slice of nuclei or vessels has hundreds of
    components, and each would be a full-size mask)."""
    labels, count = ndimage.label(mask > 0, structure=np.ones((3, 3), int))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    order = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_pixels]
    order = sorted(order[:max_instances] if max_instances else order)
    height, width = mask.shape
    if not order:
        return Target(torch.zeros(0, 4), torch.zeros(0, height, width))
    found = ndimage.find_objects(labels)
    boxes = [[found[i - 1][1].start / width, found[i - 1][0].start / height,
              found[i - 1][1].stop / width, found[i - 1][0].stop / height] for i in order]
    masks = np.stack([labels == index for index in order])
    return Target(torch.tensor(boxes, dtype=torch.float32), torch.from_numpy(masks).float())


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise GIoU of xyxy boxes: (N, 4) × (M, 4) → (N, M)."""
    area_a, area_b = box_area(a)[:, None], box_area(b)[None, :]
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.maximum(a[:, None, 2:], b[None, :, 2:]) - torch.minimum(a[:, None, :2], b[None, :, :2])).clamp(min=0)
    hull_area = hull.prod(-1)
    return iou - (hull_area - union) / hull_area.clamp(min=1e-9)


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Element-wise sigmoid focal loss (RetinaNet); ``alpha`` < 0 disables the class balance."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 − soft Dice per mask: (N, H, W) → (N,)."""
    prob = logits.sigmoid().flatten(1)
    targets = targets.flatten(1)
    numerator = 2 * (prob * targets).sum(1)
    denominator = prob.sum(1) + targets.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, target: Target, weights: Mapping[str, float]):
    """Indices (queries, instances) of the optimal one-to-one assignment for one sample, on the
    predictions' device (the assignment itself is solved by scipy on the CPU)."""
    device = logits.device
    if target.num == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    logits, boxes = logits.float(), boxes.float()
    target_boxes = target.boxes.to(device, torch.float32)
    prob = logits.sigmoid()[:, None]
    alpha, gamma = weights["class_alpha"], weights["class_gamma"]
    positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
    cost = (
        weights["cost_class"] * (positive - negative)
        + weights["cost_box"] * torch.cdist(boxes, target_boxes, p=1)
        - weights["cost_giou"] * generalized_box_iou(boxes, target_boxes)
    )
    queries, instances = linear_sum_assignment(cost.cpu().numpy())
    return (torch.as_tensor(queries, dtype=torch.long, device=device),
            torch.as_tensor(instances, dtype=torch.long, device=device))


def set_loss(outputs, targets: Sequence[Target], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """All loss terms (weighted) and their sum under ``"loss"`` for a batch of SAM3 outputs."""
    logits, boxes, masks = outputs.pred_logits.float(), outputs.pred_boxes.float(), outputs.pred_masks.float()
    device = logits.device
    targets = [t.to(device) for t in targets]
    batch = logits.shape[0]
    num_instances = max(1.0, float(sum(t.num for t in targets)))
    class_targets = torch.zeros_like(logits)
    matched_boxes, target_boxes, matched_masks, target_masks = [], [], [], []
    for i, target in enumerate(targets):
        queries, instances = hungarian_match(logits[i], boxes[i], target, weights)
        class_targets[i, queries] = 1.0
        matched_boxes.append(boxes[i, queries])
        target_boxes.append(target.boxes[instances])
        if len(queries):
            size = target.masks.shape[-2:]
            matched_masks.append(F.interpolate(masks[i, queries][None], size=size, mode="bilinear",
                                               align_corners=False)[0])
            target_masks.append(target.masks[instances])
    terms = {
        "class": weights["class"] * sigmoid_focal_loss(logits, class_targets, weights["class_alpha"],
                                                      weights["class_gamma"]).sum() / num_instances,
    }
    present = torch.tensor([float(t.num > 0) for t in targets], device=device)
    if outputs.presence_logits is not None:
        terms["presence"] = weights["presence"] * F.binary_cross_entropy_with_logits(
            outputs.presence_logits.float().reshape(batch), present)
    pred_b, gt_b = torch.cat(matched_boxes), torch.cat(target_boxes)
    if len(pred_b):
        terms["box_l1"] = weights["box_l1"] * F.l1_loss(pred_b, gt_b, reduction="sum") / num_instances
        terms["giou"] = weights["giou"] * (1 - torch.diag(generalized_box_iou(pred_b, gt_b))).sum() / num_instances
    else:
        terms["box_l1"] = terms["giou"] = boxes.sum() * 0.0
    if matched_masks:
        pred_m, gt_m = torch.cat(matched_masks), torch.cat(target_masks)
        terms["mask_focal"] = weights["mask_focal"] * sigmoid_focal_loss(
            pred_m, gt_m, weights["mask_alpha"], weights["class_gamma"]).flatten(1).mean(1).sum() / num_instances
        terms["mask_dice"] = weights["mask_dice"] * dice_loss(pred_m, gt_m).sum() / num_instances
    else:
        terms["mask_focal"] = terms["mask_dice"] = masks.sum() * 0.0
    if outputs.semantic_seg is not None:
        union = torch.stack([
            (t.masks.amax(0) if t.num else torch.zeros(t.masks.shape[-2:], device=device)) for t in targets
        ])
        semantic = F.interpolate(outputs.semantic_seg.float(), size=union.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]
        terms["semantic_focal"] = weights["semantic_focal"] * sigmoid_focal_loss(
            semantic, union, weights["mask_alpha"], weights["class_gamma"]).flatten(1).mean(1).mean()
        terms["semantic_dice"] = weights["semantic_dice"] * dice_loss(semantic, union).mean()
    terms["loss"] = sum(terms.values())
    return terms
