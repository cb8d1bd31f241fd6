"""Matching and loss terms on hand-built cases, then on a real mask through the tiny SAM3."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medsam3.config import load_config
from medsam3.losses import (
    Target,
    generalized_box_iou,
    hungarian_match,
    instances_from_mask,
    set_loss,
)
from tests.builders import SAMMED2D


@pytest.fixture(scope="module")
def weights():
    return dict(load_config("train").loss)


def test_giou_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 6.0, 2.0]])
    giou = generalized_box_iou(a, b)[0]
    # identical → 1; overlap 1 of union 7 in a hull of 9 → 1/7 − 2/9; disjoint → 0 − (12 − 8)/12
    assert torch.allclose(giou, torch.tensor([1.0, 1 / 7 - 2 / 9, -1 / 3]), atol=1e-6)


def test_instances_from_mask_splits_components():
    mask = np.zeros((10, 20), np.uint8)
    mask[1:3, 2:5] = 1
    mask[6:9, 10:18] = 1
    target = instances_from_mask(mask)
    assert target.num == 2
    assert target.masks.sum((1, 2)).tolist() == [6.0, 24.0]
    assert torch.allclose(target.boxes[1], torch.tensor([10 / 20, 6 / 10, 18 / 20, 9 / 10]))
    assert instances_from_mask(np.zeros((4, 4))).num == 0


def test_hundreds_of_components_at_full_size_stay_bounded():
    """Nuclei-like: 500 separate blobs on a 1008² slice; instances are capped largest first."""
    mask = np.zeros((1008, 1008), np.uint8)
    for k in range(500):
        row, col = divmod(k, 25)
        size = 3 + k % 7
        mask[row * 48 + 4: row * 48 + 4 + size, col * 40 + 4: col * 40 + 4 + size] = 1
    capped = instances_from_mask(mask, max_instances=16)
    assert capped.num == 16 and capped.masks.shape == (16, 1008, 1008)
    assert capped.masks.sum((1, 2)).min() == 81  # only the 9×9 blobs, the largest
    assert instances_from_mask(mask).num == 500


def test_matching_finds_the_permutation(weights):
    gt = Target(torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.5, 0.9, 0.8]]), torch.zeros(2, 4, 4))
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.6, 0.5, 0.9, 0.8], [0.5, 0.5, 0.6, 0.6], [0.1, 0.1, 0.3, 0.31]])
    logits = torch.tensor([3.0, 1.0, 2.0, 1.0])  # the confident query 0 fits no instance well
    queries, instances = hungarian_match(logits, boxes, gt, weights)
    assert dict(zip(instances.tolist(), queries.tolist(), strict=True)) == {0: 3, 1: 1}
    none = hungarian_match(logits, boxes, Target(torch.zeros(0, 4), torch.zeros(0, 4, 4)), weights)
    assert none[0].numel() == 0


def outputs_for(targets, queries=5, size=16, perfect=True, seed=0):
    """SAM3-shaped outputs; perfect=True predicts each target exactly with queries 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    batch = len(targets)
    logits = torch.full((batch, queries), -30.0)
    corner = torch.rand(batch, queries, 2, generator=g) * 0.9  # random 0.1-wide boxes
    boxes = torch.cat([corner, corner + 0.1], -1)
    masks = torch.full((batch, queries, size, size), -30.0)
    presence = torch.full((batch, 1), -30.0)
    semantic = torch.full((batch, 1, size, size), -30.0)
    for i, t in enumerate(targets):
        if not perfect:
            continue
        logits[i, : t.num] = 30.0
        boxes[i, : t.num] = t.boxes
        masks[i, : t.num] = t.masks * 60 - 30
        presence[i] = 30.0 if t.num else -30.0
        if t.num:
            semantic[i, 0] = t.masks.amax(0) * 60 - 30
    return SimpleNamespace(pred_logits=logits, pred_boxes=boxes, pred_masks=masks, presence_logits=presence,
                           semantic_seg=semantic)


def test_perfect_prediction_gives_near_zero_loss(weights):
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 3:9] = 1
    mask[10:14, 10:15] = 1
    targets = [instances_from_mask(mask), instances_from_mask(np.zeros((16, 16)))]  # one empty (absent) row
    perfect = set_loss(outputs_for(targets), targets, weights)
    assert perfect["loss"] < 1e-3, {k: float(v) for k, v in perfect.items()}
    wrong = set_loss(outputs_for(targets, perfect=False), targets, weights)
    assert wrong["loss"] > 100 * perfect["loss"] + 1
    assert all(wrong[k] > 0.01 for k in ("class", "presence", "box_l1", "giou", "mask_dice", "semantic_dice"))


def test_losses_backpropagate_through_tiny_sam3_on_a_real_mask(weights):
    from medsam3.model import build_model

    mask = np.asarray(Image.open(SAMMED2D / "masks" / "amos_0006_90_liver_000.png").resize((224, 224))) > 0
    image = np.array(Image.open(SAMMED2D / "images" / "amos_0006_90.png").convert("RGB").resize((224, 224)))
    torch.manual_seed(0)
    model = build_model("tiny")
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    targets = [instances_from_mask(mask)]
    out = model(pixel_values=pixels, input_ids=torch.randint(0, 1000, (1, 32)), attention_mask=torch.ones(1, 32))
    terms = set_loss(out, targets, weights)
    assert torch.isfinite(terms["loss"]) and terms["loss"] > 1
    terms["loss"].backward()
    assert model.mask_decoder.mask_embedder.layers[0].weight.grad.abs().sum() > 0
