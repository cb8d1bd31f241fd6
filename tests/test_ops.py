"""roi_align (torchvision's semantics) and SAM3 box prompts through it."""

from __future__ import annotations

import pytest
import torch

from medsam3.model import build_model
from medsam3.ops import enable_box_prompts, roi_align


def test_roi_align_is_exact_on_a_linear_ramp():
    # Bilinear sampling reproduces a linear function, and the samples of a bin are symmetric
    # about its centre, so each output equals the ramp at the bin centre (aligned=False: no
    # half-pixel shift).
    height, width = 20, 30
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    feature = torch.stack([2 * xx + 3 * yy + 1, -xx])[None]  # (1, 2, H, W)
    box = torch.tensor([[3.0, 4.0, 17.0, 12.5]], dtype=torch.float64)
    out = roi_align(feature, [box], 7)
    assert out.shape == (1, 2, 7, 7)
    cx = 3.0 + (torch.arange(7, dtype=torch.float64) + 0.5) * (14.0 / 7)
    cy = 4.0 + (torch.arange(7, dtype=torch.float64) + 0.5) * (8.5 / 7)
    expected = 2 * cx[None, :] + 3 * cy[:, None] + 1
    assert torch.allclose(out[0, 0], expected, atol=1e-9)
    assert torch.allclose(out[0, 1], -cx[None, :].expand(7, 7), atol=1e-9)
    aligned = roi_align(feature, [box], 7, aligned=True)
    assert torch.allclose(aligned[0, 0], expected - 2 * 0.5 - 3 * 0.5, atol=1e-9)


def test_roi_align_boundaries_and_batches():
    feature = torch.ones(2, 1, 8, 8)
    feature[1] *= 5
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[2.0, 2.0, 4.0, 4.0], [-20.0, -20.0, -10.0, -10.0]])]
    out = roi_align(feature, boxes, (2, 3))
    assert out.shape == (3, 1, 2, 3)
    assert torch.allclose(out[0], torch.ones(1, 2, 3)) and torch.allclose(out[1], torch.full((1, 2, 3), 5.0))
    assert torch.all(out[2] == 0)  # entirely outside the image: zeros, as in torchvision
    grad_feature = feature.clone().requires_grad_()
    roi_align(grad_feature, boxes, 2).sum().backward()
    assert grad_feature.grad[1].sum() > 0


@pytest.mark.parametrize("with_box", [False, True])
def test_sam3_box_prompts(with_box):
    enable_box_prompts()
    torch.manual_seed(0)
    model = build_model("tiny")
    kwargs = {}
    if with_box:  # cxcywh, normalised
        kwargs = {"input_boxes": torch.tensor([[[0.5, 0.5, 0.3, 0.2]], [[0.3, 0.6, 0.2, 0.2]]]),
                  "input_boxes_labels": torch.ones(2, 1, dtype=torch.long)}
    out = model(pixel_values=torch.randn(2, 3, 224, 224), input_ids=torch.randint(0, 1000, (2, 32)),
                attention_mask=torch.ones(2, 32, dtype=torch.long), **kwargs)
    out.pred_logits.sum().backward()
    pool = model.geometry_encoder.boxes_pool_project  # fed only by roi_align
    used = any(p.grad is not None and p.grad.abs().sum() > 0 for p in pool.parameters())
    assert used == with_box
