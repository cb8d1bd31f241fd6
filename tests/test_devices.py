"""The device and dtype half of the GPU path, on a CPU.

Every tensor the loss, the matcher and the box-prompt pooling create must live on the device of
their inputs. On a CPU-only machine a tensor created without ``device=`` lands on the CPU like
the inputs, so the bug would not show; here the default device is ``meta`` while the inputs stay
on the CPU, and every tensor produced inside is recorded: one made without ``device=`` appears as
``meta``. Outputs in bf16 (the GPU training dtype) must give float32 loss terms that backpropagate.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from medsam3.losses import hungarian_match, instances_from_mask, set_loss
from medsam3.ops import roi_align
from tests.builders import loss_weights
from tests.test_losses import outputs_for


class DevicesMade(TorchFunctionMode):
    """Records the device of every tensor any torch function produces (factories such as
    ``torch.tensor`` included, which the dispatcher-level modes do not see)."""

    def __init__(self):
        super().__init__()
        self.devices: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices |= {t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        return out


def made_on(fn, *args, **kwargs):
    """Run ``fn`` with ``meta`` as the default device; returns (result, devices of what it made)."""
    recorder = DevicesMade()
    with torch.device("meta"), recorder:
        result = fn(*args, **kwargs)
    return result, recorder.devices


@pytest.fixture(scope="module", params=["detr", "released"])
def weights(request):
    return loss_weights(request.param)


def targets():
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 3:9] = 1
    mask[10:14, 10:15] = 1
    return [instances_from_mask(mask), instances_from_mask(np.zeros((16, 16)))]


def test_the_recorder_sees_a_tensor_made_without_a_device():
    index, devices = made_on(lambda x: x[torch.as_tensor([0, 2])], torch.arange(3.0))  # a forgotten device=
    assert "meta" in devices and index.device.type == "cpu"  # the result alone would not show it


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_makes_everything_on_the_inputs_device_in_float32(weights, dtype):
    outputs = outputs_for(targets(), perfect=False)
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg"):
        setattr(outputs, name, getattr(outputs, name).to(dtype).requires_grad_())
    terms, devices = made_on(set_loss, outputs, targets(), weights)
    assert devices == {"cpu"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t) for t in terms.values())
    terms["loss"].backward()
    for name in ("pred_boxes", "semantic_seg"):  # trained under both objectives (the logits here saturate)
        grad = getattr(outputs, name).grad
        assert grad.dtype == dtype and grad.abs().sum() > 0, name
    reference = set_loss(outputs_for(targets(), perfect=False), targets(), weights)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # bf16 inputs carry 3 significant digits
    assert abs(float(terms["loss"]) - float(reference["loss"])) <= tolerance * float(reference["loss"])


def test_the_matcher_returns_indices_on_the_inputs_device(weights):
    target = targets()[0]
    outputs = outputs_for([target])
    (queries, instances), devices = made_on(hungarian_match, outputs.pred_logits[0].bfloat16(),
                                            outputs.pred_boxes[0].bfloat16(), target, weights)
    assert devices == {"cpu"} and queries.device.type == "cpu"
    assert sorted(instances.tolist()) == [0, 1] and sorted(queries.tolist()) == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roi_align_makes_everything_on_the_features_device(dtype):
    torch.manual_seed(0)
    features = torch.randn(2, 4, 16, 16).to(dtype)
    boxes = [torch.tensor([[1.0, 2.0, 9.5, 12.0]]), torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.3, 4.7, 7.1, 9.9]])]
    pooled, devices = made_on(roi_align, features, boxes, 7, spatial_scale=1.0)
    assert devices == {"cpu"} and pooled.dtype == dtype and pooled.shape == (3, 4, 7, 7)
    exact = roi_align(features.double(), [b.double() for b in boxes], 7)
    # positions are computed in float32 for bf16 features: only the features' rounding remains
    assert torch.allclose(pooled.double(), exact, atol=0.05 if dtype == torch.bfloat16 else 1e-5)
