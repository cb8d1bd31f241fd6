"""SAM3's training objectives on transformers' SAM3 outputs (``loss.objective``).

Per sample (one image and one text prompt) the decoder's queries are matched one-to-one to the
ground-truth targets (Hungarian matching on class, box L1 and GIoU costs). Two objectives:

``released`` — Medical SAM3's stage 1, Meta's SAM3 losses (docs/training.md cites each rule):
- scores: the presence-gated ``logit(σ(class) · σ(presence))``, clamped to ±10, is what the
  matcher and the classification loss see;
- classification: IoU-aware BCE (a matched query's target ``p^α · IoU^(1-α)``, at least 0.01,
  with a positive weight; an unmatched query's BCE against 0 scaled by ``p^γ``), the mean over
  all queries, and none at all for a prompt whose concept is absent (presence gating);
- presence: 0.5 · BCE on the presence logit, plus the semantic presence BCE on the same logit;
- boxes: L1 on cxcywh and 1 − GIoU; masks: focal + Dice on matched pairs (Meta's segmentation
  weights); semantic head over the samples whose target is not empty; the sum × √(batch).

``detr`` — plain DETR terms, which learn from random weights (the presets, the demo, the tests):
focal classification on every query (matched → 1), presence BCE, box L1 (xyxy) + GIoU, mask
focal + Dice, semantic focal + Dice over every sample.

Targets (``loss.targets``): ``union`` (a prompt's instances as one mask and box, as Medical SAM3
trains) or ``components`` (connected components, the largest ``max_instances``). Every weight is a
config number (``configs/train.yaml``, ``loss.released`` / ``loss.detr``). The terms are computed
in float32 on the model's device whatever the model's dtype (bf16 on GPUs).
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


OBJECTIVES = ("released", "detr")
TARGET_KINDS = ("union", "components")


def _normalised_box(found: tuple[slice, slice], height: int, width: int) -> list[float]:
    """xyxy in [0, 1] of an object's bounding slices (``ndimage.find_objects``)."""
    rows, cols = found
    return [cols.start / width, rows.start / height, cols.stop / width, rows.stop / height]


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
    boxes = [_normalised_box(found[i - 1], height, width) for i in order]
    masks = np.stack([labels == index for index in order])
    return Target(torch.tensor(boxes, dtype=torch.float32), torch.from_numpy(masks).float())


def union_target(mask: np.ndarray) -> Target:
    """All of a prompt's instances as one target: the union mask and its box."""
    mask = np.asarray(mask) > 0
    if not mask.any():
        return Target(torch.zeros(0, 4), torch.zeros(0, *mask.shape))
    box = _normalised_box(ndimage.find_objects(mask.astype(np.int8))[0], *mask.shape)
    return Target(torch.tensor([box], dtype=torch.float32), torch.from_numpy(mask[None]).float())


@dataclass(frozen=True)
class TargetRule:
    """How a sample's mask becomes targets: ``loss.targets`` (union | components) and, for
    components, ``loss.max_instances`` (the largest first; None keeps all)."""

    kind: str = "components"
    max_instances: int | None = 16

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ValueError(f"loss.targets={self.kind!r}: expected one of {', '.join(TARGET_KINDS)} (or auto)")

    def __call__(self, mask: np.ndarray) -> Target:
        if self.kind == "union":
            return union_target(mask)
        return instances_from_mask(mask, max_instances=self.max_instances)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def joint_logits(pred_logits: torch.Tensor, presence_logits: torch.Tensor | None) -> torch.Tensor:
    """``logit(σ(class) · σ(presence))`` (probability clamped to [1e-3, 1 − 1e-3]) clamped to ±10:
    the presence-gated score the released matcher and classification loss see."""
    if presence_logits is None:
        return pred_logits.clamp(-10, 10)
    prob = pred_logits.sigmoid() * presence_logits.reshape(len(pred_logits), -1)[:, :1].sigmoid()
    prob = prob.clamp(1e-3, 1 - 1e-3)
    return (prob.log() - (1 - prob).log()).clamp(-10, 10)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def paired_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes pair by pair: (N, 4), (N, 4) → (N,)."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return inter / (box_area(a) + box_area(b) - inter).clamp(min=1e-9)


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
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, target: Target, weights: Mapping[str, float],
                    cxcywh: bool = False):
    """Indices (queries, instances) of the optimal one-to-one assignment for one sample, on the
    predictions' device (the assignment itself is solved by scipy on the CPU). The box L1 cost is
    on xyxy, or on cxcywh (``cxcywh``, as released); the GIoU cost on xyxy."""
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
    l1_boxes, l1_targets = (xyxy_to_cxcywh(boxes), xyxy_to_cxcywh(target_boxes)) if cxcywh else (boxes, target_boxes)
    cost = (
        weights["cost_class"] * (positive - negative)
        + weights["cost_box"] * torch.cdist(l1_boxes, l1_targets, p=1)
        - weights["cost_giou"] * generalized_box_iou(boxes, target_boxes)
    )
    queries, instances = linear_sum_assignment(cost.cpu().numpy())
    return (torch.as_tensor(queries, dtype=torch.long, device=device),
            torch.as_tensor(instances, dtype=torch.long, device=device))


def set_loss(outputs, targets: Sequence[Target], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """All loss terms (weighted) and their sum under ``"loss"`` for a batch of SAM3 outputs, under
    ``weights["objective"]`` (released | detr) with that objective's weights."""
    objective = weights.get("objective", "detr")
    if objective == "released":
        return released_loss(outputs, targets, weights)
    if objective == "detr":
        return detr_loss(outputs, targets, weights)
    raise ValueError(f"loss.objective={objective!r}: expected one of {', '.join(OBJECTIVES)} (or auto)")


def _matched(logits, boxes, masks, targets, weights, cxcywh: bool):
    """Per sample: matched query and target indices, and the matched masks upsampled to the
    targets' grid with their targets (none when the mask terms weigh 0, as in the released stage
    1: upsampling every matched mask to the full slice would be spent on a zero)."""
    with_masks = bool(weights["mask_focal"] or weights["mask_dice"])
    matches, pred_m, gt_m = [], [], []
    for i, target in enumerate(targets):
        queries, instances = hungarian_match(logits[i], boxes[i], target, weights, cxcywh)
        matches.append((queries, instances))
        if with_masks and len(queries):
            size = target.masks.shape[-2:]
            pred_m.append(F.interpolate(masks[i, queries][None], size=size, mode="bilinear", align_corners=False)[0])
            gt_m.append(target.masks[instances])
    return matches, pred_m, gt_m


def _union(targets: Sequence[Target], device: torch.device) -> torch.Tensor:
    return torch.stack([(t.masks.amax(0) if t.num else torch.zeros(t.masks.shape[-2:], device=device))
                        for t in targets])


def _box_and_mask_terms(matches, targets, boxes, masks, pred_m, gt_m, weights, count: float,
                        cxcywh: bool) -> dict[str, torch.Tensor]:
    """Box L1 (on xyxy, or cxcywh) and 1 − GIoU, and mask focal + Dice, of the matched pairs, each
    summed and divided by ``count``; zero (keeping the graph) where nothing matched."""
    terms = {}
    pred_b = torch.cat([boxes[i, q] for i, (q, _) in enumerate(matches)])
    gt_b = torch.cat([t.boxes[n] for t, (_, n) in zip(targets, matches, strict=True)])
    if len(pred_b):
        l1_pred, l1_gt = (xyxy_to_cxcywh(pred_b), xyxy_to_cxcywh(gt_b)) if cxcywh else (pred_b, gt_b)
        terms["box_l1"] = weights["box_l1"] * F.l1_loss(l1_pred, l1_gt, reduction="sum") / count
        terms["giou"] = weights["giou"] * (1 - torch.diag(generalized_box_iou(pred_b, gt_b))).sum() / count
    else:
        terms["box_l1"] = terms["giou"] = boxes.sum() * 0.0
    if pred_m:
        pred_m, gt_m = torch.cat(pred_m), torch.cat(gt_m)
        terms["mask_focal"] = weights["mask_focal"] * sigmoid_focal_loss(
            pred_m, gt_m, weights["mask_alpha"], weights["mask_gamma"]).flatten(1).mean(1).sum() / count
        terms["mask_dice"] = weights["mask_dice"] * dice_loss(pred_m, gt_m).sum() / count
    else:
        terms["mask_focal"] = terms["mask_dice"] = masks.sum() * 0.0
    return terms


def detr_loss(outputs, targets: Sequence[Target], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    logits, boxes, masks = outputs.pred_logits.float(), outputs.pred_boxes.float(), outputs.pred_masks.float()
    device = logits.device
    targets = [t.to(device) for t in targets]
    batch = logits.shape[0]
    num_instances = max(1.0, float(sum(t.num for t in targets)))
    matches, pred_m, gt_m = _matched(logits, boxes, masks, targets, weights, cxcywh=False)
    class_targets = torch.zeros_like(logits)
    for i, (queries, _) in enumerate(matches):
        class_targets[i, queries] = 1.0
    terms = {
        "class": weights["class"] * sigmoid_focal_loss(logits, class_targets, weights["class_alpha"],
                                                      weights["class_gamma"]).sum() / num_instances,
    }
    present = torch.tensor([float(t.num > 0) for t in targets], device=device)
    if outputs.presence_logits is not None:
        terms["presence"] = weights["presence"] * F.binary_cross_entropy_with_logits(
            outputs.presence_logits.float().reshape(batch), present)
    terms |= _box_and_mask_terms(matches, targets, boxes, masks, pred_m, gt_m, weights, num_instances, cxcywh=False)
    if outputs.semantic_seg is not None:
        union = _union(targets, device)
        semantic = F.interpolate(outputs.semantic_seg.float(), size=union.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]
        terms["semantic_focal"] = weights["semantic_focal"] * sigmoid_focal_loss(
            semantic, union, weights["semantic_alpha"], weights["semantic_gamma"]).flatten(1).mean(1).mean()
        terms["semantic_dice"] = weights["semantic_dice"] * dice_loss(semantic, union).mean()
    terms["loss"] = sum(terms.values())
    return terms


def released_loss(outputs, targets: Sequence[Target], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    boxes, masks = outputs.pred_boxes.float(), outputs.pred_masks.float()
    presence = outputs.presence_logits.float() if outputs.presence_logits is not None else None
    logits = joint_logits(outputs.pred_logits.float(), presence)
    device = logits.device
    targets = [t.to(device) for t in targets]
    batch, queries_per_sample = logits.shape
    num_targets = max(1.0, float(sum(t.num for t in targets)))
    present = torch.tensor([float(t.num > 0) for t in targets], device=device)
    matches, pred_m, gt_m = _matched(logits, boxes, masks, targets, weights, cxcywh=True)

    matched = torch.zeros_like(logits, dtype=torch.bool)
    iou_target = torch.zeros_like(logits)
    for i, (queries, instances) in enumerate(matches):
        matched[i, queries] = True
        with torch.no_grad():  # the IoU-aware target is not differentiated
            iou = paired_box_iou(boxes[i, queries], targets[i].boxes[instances])
            iou_target[i, queries] = (logits[i, queries].sigmoid() ** weights["class_iou_alpha"]
                                      * iou ** (1 - weights["class_iou_alpha"])).clamp(min=0.01)
    # classification: IoU-aware BCE, mean over every query, only where the concept is present
    bce = F.binary_cross_entropy_with_logits(logits, iou_target, reduction="none")
    scale = torch.where(matched, torch.full_like(logits, weights["class_pos_weight"]),
                        logits.sigmoid() ** weights["class_neg_gamma"])
    terms = {"class": weights["class"] * (bce * scale * present[:, None]).sum() / (batch * queries_per_sample)}
    if presence is not None:
        presence_bce = F.binary_cross_entropy_with_logits(presence.reshape(batch, -1)[:, 0], present)
        terms["presence"] = weights["presence"] * 0.5 * presence_bce  # focal with α 0.5, γ 0
        terms["semantic_presence"] = weights["semantic_presence"] * presence_bce
    terms |= _box_and_mask_terms(matches, targets, boxes, masks, pred_m, gt_m, weights, num_targets, cxcywh=True)
    if outputs.semantic_seg is not None:
        union = _union(targets, device)
        semantic = F.interpolate(outputs.semantic_seg.float(), size=union.shape[-2:], mode="bilinear",
                                 align_corners=False)[:, 0]
        valid = present.sum() + 1e-6  # only samples whose target is not empty
        focal = sigmoid_focal_loss(semantic, union, weights["semantic_alpha"], weights["semantic_gamma"])
        terms["semantic_focal"] = weights["semantic_focal"] * (focal.flatten(1).mean(1) * present).sum() / valid
        terms["semantic_dice"] = weights["semantic_dice"] * (dice_loss(semantic, union) * present).sum() / valid
    terms["loss"] = sum(terms.values()) * batch ** 0.5
    return terms
