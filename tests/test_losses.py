"""Matching and loss terms on hand-built cases, then on a real mask through the tiny SAM3."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from medsam3.losses import (
    Target,
    TargetRule,
    generalized_box_iou,
    hungarian_match,
    instances_from_mask,
    joint_logits,
    set_loss,
    union_target,
)
from tests.builders import SAMMED2D, loss_weights


@pytest.fixture(scope="module")
def weights():
    return loss_weights("detr")


@pytest.fixture(scope="module")
def released():
    return loss_weights("released")


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


def two_blobs() -> np.ndarray:
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 3:9] = 1
    mask[10:14, 10:15] = 1
    return mask


def test_perfect_prediction_gives_near_zero_loss(weights):
    targets = [instances_from_mask(two_blobs()), instances_from_mask(np.zeros((16, 16)))]  # one empty (absent) row
    perfect = set_loss(outputs_for(targets), targets, weights)
    assert perfect["loss"] < 1e-3, {k: float(v) for k, v in perfect.items()}
    wrong = set_loss(outputs_for(targets, perfect=False), targets, weights)
    assert wrong["loss"] > 100 * perfect["loss"] + 1
    assert all(wrong[k] > 0.01 for k in ("class", "presence", "box_l1", "giou", "mask_dice", "semantic_dice"))


def test_released_perfect_prediction_reaches_the_floor_of_the_clamped_score(released):
    targets = [union_target(two_blobs()), union_target(np.zeros((16, 16)))]  # one empty (absent) row
    perfect = set_loss(outputs_for(targets), targets, released)
    # the joint score is clamped to p = 0.999: a perfect match still has BCE(6.9, 0.99975) ≈ 0.0027
    # × pos_weight 10 on its one matched query, averaged over 2 × 5 queries, × 20, × sqrt(2)
    floor = 20 * 10 * 0.0027 / 10 * 2**0.5
    assert perfect["loss"] < 1.5 * floor, {k: float(v) for k, v in perfect.items()}
    wrong = set_loss(outputs_for(targets, perfect=False), targets, released)
    assert wrong["loss"] > 100 * perfect["loss"]
    assert all(wrong[k] > 0.01 for k in ("class", "presence", "box_l1", "giou", "semantic_dice"))
    assert wrong["mask_dice"] == 0  # the released stage 1 has no instance mask terms


def test_targets_as_the_union_or_the_largest_components():
    mask = np.zeros((10, 20), np.uint8)
    mask[1:3, 2:5] = 1  # 6 pixels
    mask[6:9, 10:18] = 1  # 24 pixels
    union = TargetRule("union")(mask)
    assert union.num == 1 and union.masks.sum() == 30
    assert torch.allclose(union.boxes[0], torch.tensor([2 / 20, 1 / 10, 18 / 20, 9 / 10]))
    largest = TargetRule("components", max_instances=1)(mask)
    assert largest.num == 1 and largest.masks.sum() == 24
    assert TargetRule("union")(np.zeros((4, 4))).num == 0
    with pytest.raises(ValueError, match="loss.targets"):
        TargetRule("both")


def hand_outputs(logit: float, presence: float, box: list[float]):
    """One sample, two queries: query 0 at ``box`` with ``logit``, query 1 far away and unlikely."""
    return SimpleNamespace(pred_logits=torch.tensor([[logit, -4.0]]),
                           pred_boxes=torch.tensor([box, [0.8, 0.8, 0.9, 0.9]]).reshape(1, 2, 4),
                           pred_masks=torch.zeros(1, 2, 8, 8), presence_logits=torch.tensor([[presence]]),
                           semantic_seg=torch.zeros(1, 1, 8, 8))


def test_each_released_term_equals_its_definition(released):
    gt = np.zeros((8, 8), np.uint8)
    gt[0:4, 0:4] = 1  # box [0, 0, 0.5, 0.5]
    target = union_target(gt)
    out = hand_outputs(1.0, 2.0, [0.0, 0.0, 0.25, 0.5])  # IoU 0.5 with the target
    terms = set_loss(out, [target], released)
    # the presence-gated score: logit(σ(1) · σ(2)) = logit(0.7311 · 0.8808) = logit(0.6439)
    x = joint_logits(out.pred_logits, out.presence_logits)[0]
    assert torch.isclose(x[0], torch.tensor(0.59230), atol=1e-4)
    p = torch.sigmoid(x)
    t0 = (p[0] ** 0.25 * 0.5**0.75).clamp(min=0.01)  # IoU-aware target of the matched query
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected_class = 20 * (10 * bce(x[0], t0) + p[1] ** 2 * bce(x[1], torch.tensor(0.0))) / 2
    assert torch.isclose(terms["class"], expected_class, rtol=1e-5)
    # L1 on cxcywh: (0.125, 0.25, 0.25, 0.5) against (0.25, 0.25, 0.5, 0.5)
    assert torch.isclose(terms["box_l1"], torch.tensor(5 * (0.125 + 0.25)), rtol=1e-5)
    assert torch.isclose(terms["giou"], torch.tensor(2 * 0.5), rtol=1e-5)
    presence = bce(torch.tensor(2.0), torch.tensor(1.0))
    assert torch.isclose(terms["presence"], 20 * 0.5 * presence) and torch.isclose(terms["semantic_presence"], presence)
    assert torch.isclose(terms["loss"], sum(v for k, v in terms.items() if k != "loss"))  # batch of 1: × 1
    two = set_loss(SimpleNamespace(**{k: torch.cat([v, v]) for k, v in vars(out).items()}), [target, target], released)
    assert torch.isclose(two["loss"], terms["loss"] * 2**0.5, rtol=1e-5)  # the mean × sqrt(batch)


def test_an_absent_concept_trains_presence_alone_under_released(released, weights):
    """Presence gating: whatever the queries say on a prompt whose concept is absent, only the
    presence logit is trained; the DETR objective pushes every query's class logit to 0 instead."""
    absent = union_target(np.zeros((8, 8)))
    confident, unsure = (set_loss(hand_outputs(logit, -1.0, [0.0, 0.0, 0.5, 0.5]), [absent], released)
                         for logit in (5.0, -5.0))
    for terms in (confident, unsure):  # no query, box, mask or semantic loss
        assert all(float(terms[k]) == 0.0 for k in ("class", "box_l1", "giou", "mask_focal", "mask_dice",
                                                    "semantic_focal", "semantic_dice"))
        assert terms["presence"] > 0
    assert torch.isclose(confident["loss"], unsure["loss"])
    detr = set_loss(hand_outputs(5.0, -1.0, [0.0, 0.0, 0.5, 0.5]), [instances_from_mask(np.zeros((8, 8)))], weights)
    assert detr["class"] > 1


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


def test_clip_padding_enters_no_detector_loss(weights):
    """A clip of 3 real frames padded to 5 with copies of its last frame: the detector's loss on the
    padded batch's real frames equals its loss on the 3 frames alone (padding counted would weigh
    the last frame 3 times and change the instance normaliser)."""
    from medsam3.clip_model import valid_frames
    from medsam3.model import build_model

    image = np.array(Image.open(SAMMED2D / "images" / "amos_0006_90.png").convert("RGB").resize((224, 224)))
    mask = np.asarray(Image.open(SAMMED2D / "masks" / "amos_0006_90_liver_000.png").resize((224, 224))) > 0
    shifts = (0, 24, 48)  # three different frames: the slice rolled sideways; the last without the liver
    frames = [np.roll(image, s, axis=1) for s in shifts]
    masks = [np.roll(mask, 0, axis=1), np.roll(mask, 24, axis=1), np.zeros_like(mask)]
    torch.manual_seed(0)
    model = build_model("tiny").eval()

    def run(count: int):
        pixels = torch.from_numpy(np.stack(frames + [frames[-1]] * (count - 3))).permute(0, 3, 1, 2).float() / 127.5 - 1
        tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(1)).repeat(count, 1)
        with torch.no_grad():
            out = model(pixel_values=pixels, input_ids=tokens, attention_mask=torch.ones(count, 32))
        return out, [instances_from_mask(m) for m in masks + [masks[-1]] * (count - 3)]

    alone, alone_targets = run(3)
    padded, padded_targets = run(5)
    valid = torch.tensor([[True, True, True, False, False]])
    kept, kept_targets, index = valid_frames(padded, padded_targets, valid)
    assert index.tolist() == [0, 1, 2]
    expected = set_loss(alone, alone_targets, weights)
    got = set_loss(kept, kept_targets, weights)
    for key in expected:
        assert torch.isclose(got[key], expected[key], rtol=1e-4, atol=1e-5), key
    counted = set_loss(padded, padded_targets, weights)["loss"]
    assert not torch.isclose(counted, expected["loss"], rtol=0.05)  # 3 absent frames of 5, not 1 of 3
