"""`medsam3 import` against Meta's own code: the imported modules compute what Meta's modules compute.

``tests/data/meta_sam3_modules.pt`` was made by ``tools/dump_meta_sam3_modules.py`` in an isolated
venv with Meta's ``sam3`` package: for a few submodules of Meta's SAM3 video model (a windowed and
a global ViT block and the patch/position embedding, a CLIP text layer and the text projection, a
geometry-encoder, DETR-encoder and DETR-decoder layer, a tracker memory-attention layer, the
tracker's SAM mask decoder) it holds seeded inputs and Meta's float32 outputs. Their weights are
not stored: each tensor is made from its ``sam3.pt`` name by :func:`fake_weight` (the same rule in
the tool, its checksums in the file). Here the same Meta-named tensors go through
:func:`medsam3.meta_import.convert_state` into the matching transformers module (full-size
``Sam3Config`` / ``Sam3VideoConfig``), loaded strictly, fed Meta's inputs in transformers' layout;
the outputs must match Meta's. This catches what the name-and-shape tests cannot: q/k/v split in
the wrong order, a missing transpose of a square matrix, swapped norms of equal width.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medsam3.meta_import import convert_state, meta_config

DATA = torch.load(Path(__file__).parent / "data" / "meta_sam3_modules.pt", weights_only=True)
UNITS: dict[str, dict[str, Any]] = DATA["units"]
TOLERANCE = 1e-5  # allowed max |diff|, a fraction of the largest |output| (float32 summation order)


def fake_weight(name: str, shape: Sequence[int]) -> torch.Tensor:
    """As in tools/dump_meta_sam3_modules.py: N(0, 1) seeded by crc32(name); matrices and kernels
    scaled by 1/sqrt(fan-in); 1-D weights (norms) 1 + 0.1 N; 1-D biases 0.1 N."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(tuple(shape), generator=generator)
    if len(shape) == 1:
        return 1 + 0.1 * values if name.endswith("weight") else 0.1 * values
    return values / math.sqrt(math.prod(shape[1:]))


def fake_input(name: str, shape: Sequence[int]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(("input:" + name).encode()))
    return torch.randn(tuple(shape), generator=generator)


def same_checksum(tensor: torch.Tensor, expected: Sequence[float]) -> bool:
    t = tensor.double()
    return all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-6)
               for a, b in zip([float(t.sum()), float((t * t).sum())], expected, strict=True))


def meta_state(unit: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The unit's tensors under their sam3.pt names, as the tool made them."""
    state = {}
    for key, spec in unit["weights"].items():
        state[key] = fake_weight(key, spec["shape"])
        assert same_checksum(state[key], spec["checksum"]), f"{key}: not the tensor the tool made"
    for key in unit["kept"]:  # Meta's own buffers (RoPE tables): the import drops them
        state[key] = torch.empty(0)
    return state


def meta_inputs(unit: dict[str, Any]) -> dict[str, torch.Tensor]:
    inputs = dict(unit["inputs"])
    for name, spec in unit["generated_inputs"].items():
        inputs[name] = fake_input(unit["meta_prefix"] + name, spec["shape"])
        assert same_checksum(inputs[name], spec["checksum"]), f"{name}: not the input the tool made"
    return inputs


def imported(module: nn.Module, unit: dict[str, Any], prefix: str) -> nn.Module:
    """``module`` (the transformers submodule at ``prefix`` of Sam3VideoModel) with the unit's
    Meta tensors converted by the import; every tensor of the module made exactly once."""
    expected = {prefix + k: v.shape for k, v in module.state_dict().items()}
    made, report = convert_state(meta_state(unit), expected, video=True)
    assert report["problems"] == [] and report["unknown_source_tensors"] == []
    if prefix.startswith("detector_model."):  # an image model's import: the same tensors, unprefixed
        image = {k.removeprefix("detector_model."): v for k, v in expected.items()}
        made_image, report_image = convert_state(meta_state(unit), image, video=False)
        assert report_image["problems"] == []
        assert all(torch.equal(made_image[k.removeprefix("detector_model.")], v) for k, v in made.items())
    module.load_state_dict({k.removeprefix(prefix): v for k, v in made.items()}, strict=True)
    return module.eval()


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    diff = float((ours - theirs).abs().max())
    assert diff <= TOLERANCE * float(theirs.abs().max()), f"max |diff| {diff:.3g} (scale {theirs.abs().max():.3g})"
    return diff


def with_sdpa(config: Any) -> Any:
    config._attn_implementation = "sdpa"
    return config


def additive_padding_mask(padding: torch.Tensor) -> torch.Tensor:
    """Meta's key padding mask (batch, keys), True = padding → transformers' additive (batch, 1, 1, keys)."""
    return torch.zeros(padding.shape, dtype=torch.float32).masked_fill(padding, torch.finfo(torch.float32).min)[
        :, None, None]


def vit_config() -> Any:
    """The ViT config an import writes (Meta's LayerNorm epsilon, 1e-5, not transformers' 1e-6)."""
    return with_sdpa(meta_config(video=False).vision_config.backbone_config)


def test_vit_patch_and_position_embedding():
    from transformers.models.sam3.modeling_sam3 import Sam3ViTModel

    unit = UNITS["vit_embed"]
    config = vit_config()
    config.num_hidden_layers = 0  # the embeddings and the pre-norm only (the blocks are tested below)
    model = imported(Sam3ViTModel(config), unit, "detector_model.vision_encoder.backbone.")
    inputs = meta_inputs(unit)
    with torch.no_grad():
        ours = model(inputs["pixel_values"]).last_hidden_state  # (B, H*W, C)
    theirs = unit["outputs"]["hidden_states"]  # (B, H, W, C)
    assert_matches(ours, theirs.flatten(1, 2))


@pytest.mark.parametrize(("name", "layer"), [("vit_window_block", 0), ("vit_global_block", 7)])
def test_vit_block(name, layer):
    from transformers.models.sam3.modeling_sam3 import Sam3ViTLayer

    unit = UNITS[name]
    config = vit_config()
    window = 0 if layer in config.global_attn_indexes else config.window_size
    assert window == unit["window_size"]
    block = imported(Sam3ViTLayer(config, window_size=window), unit,
                     f"detector_model.vision_encoder.backbone.layers.{layer}.")
    x = meta_inputs(unit)["hidden_states"]  # (B, H, W, C) in both
    with torch.no_grad():
        ours = block(x).flatten(1, 2)[:, unit["output_index"]["hidden_states"]]
    assert_matches(ours, unit["outputs"]["hidden_states"])


def test_text_encoder_layer_and_projection():
    from transformers import Sam3Config
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    text_config = with_sdpa(Sam3Config().text_config)
    unit = UNITS["text_layer"]
    layer = imported(CLIPEncoderLayer(text_config), unit, "detector_model.text_encoder.text_model.encoder.layers.3.")
    inputs = meta_inputs(unit)
    with torch.no_grad():  # Meta's causal (L, L) additive mask → (B, 1, L, L)
        ours = layer(inputs["hidden_states"], attention_mask=inputs["attn_mask"][None, None])
    assert_matches(ours, unit["outputs"]["hidden_states"])

    unit = UNITS["text_projection"]  # CLIPTextModelWithProjection.text_projection
    projection = imported(nn.Linear(text_config.hidden_size, text_config.projection_dim, bias=False), unit,
                          "detector_model.text_encoder.text_projection.")
    with torch.no_grad():
        assert_matches(projection(meta_inputs(unit)["pooled"]), unit["outputs"]["projected"])


def test_geometry_encoder_layer():
    from transformers import Sam3Config
    from transformers.models.sam3.modeling_sam3 import Sam3GeometryEncoderLayer

    unit = UNITS["geometry_layer"]
    layer = imported(Sam3GeometryEncoderLayer(with_sdpa(Sam3Config().geometry_encoder_config)), unit,
                     "detector_model.geometry_encoder.layers.1.")
    x = meta_inputs(unit)  # Meta: sequence-first
    with torch.no_grad():
        ours = layer(x["tgt"].transpose(0, 1), x["memory"].transpose(0, 1), x["pos"].transpose(0, 1),
                     prompt_mask=additive_padding_mask(x["tgt_key_padding_mask"]))
    assert_matches(ours.transpose(0, 1), unit["outputs"]["tgt"])


def test_detr_encoder_layer():
    from transformers import Sam3Config
    from transformers.models.sam3.modeling_sam3 import Sam3DetrEncoderLayer

    unit = UNITS["detr_encoder_layer"]
    layer = imported(Sam3DetrEncoderLayer(with_sdpa(Sam3Config().detr_encoder_config)), unit,
                     "detector_model.detr_encoder.layers.2.")
    x = meta_inputs(unit)  # Meta: batch-first here
    with torch.no_grad():
        ours = layer(x["tgt"], x["memory"], x["query_pos"],
                     prompt_cross_attn_mask=additive_padding_mask(x["memory_key_padding_mask"]))
    assert_matches(ours, unit["outputs"]["tgt"])


def test_detr_decoder_layer():
    from transformers import Sam3Config
    from transformers.models.sam3.modeling_sam3 import Sam3DetrDecoderLayer

    unit = UNITS["detr_decoder_layer"]
    config = with_sdpa(Sam3Config().detr_decoder_config)
    layer = imported(Sam3DetrDecoderLayer(config), unit, "detector_model.detr_decoder.layers.1.")
    x = {k: v.transpose(0, 1) if v.dim() == 3 else v for k, v in meta_inputs(unit).items()}  # → batch-first
    rpb = unit["inputs"]["cross_attn_mask"]  # (B * heads, queries, HW)
    rpb = rpb.view(-1, config.num_attention_heads, *rpb.shape[1:])
    with torch.no_grad():
        ours = layer(
            torch.cat([x["presence_token"], x["tgt"]], dim=1),  # the presence token first, as Meta prepends it
            query_pos=x["tgt_query_pos"], text_features=x["memory_text"], vision_features=x["memory"],
            vision_pos_encoding=x["memory_pos"], text_cross_attn_mask=additive_padding_mask(x["text_attention_mask"]),
            vision_cross_attn_mask=F.pad(rpb, (0, 0, 1, 0)))  # a zero bias row for the presence token
    assert_matches(ours[:, 1:].transpose(0, 1), unit["outputs"]["tgt"])
    assert_matches(ours[:, :1].transpose(0, 1), unit["outputs"]["presence_token_out"])


def tracker_config() -> Any:
    from transformers import Sam3VideoConfig

    return with_sdpa(Sam3VideoConfig().tracker_config)


def test_tracker_memory_attention_layer():
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
        Sam3TrackerVideoMemoryAttention,
        Sam3TrackerVideoMemoryAttentionLayer,
        Sam3TrackerVideoVisionRotaryEmbedding,
    )

    unit = UNITS["memory_attention_layer"]
    config = tracker_config()
    layer = imported(Sam3TrackerVideoMemoryAttentionLayer(config), unit, "tracker_model.memory_attention.layers.1.")
    x = meta_inputs(unit)  # batch-first: (B, tokens, C)
    side = math.isqrt(x["tgt"].shape[1])
    grid = copy.deepcopy(config)  # Meta's RoPE follows the (square) query grid; transformers' is precomputed
    grid.memory_attention_rope_feat_sizes = [side, side]
    positions = Sam3TrackerVideoMemoryAttention.precompute_positions(grid)
    rope = Sam3TrackerVideoVisionRotaryEmbedding(config)(x["tgt"], positions)
    with torch.no_grad():
        ours = layer(x["tgt"][:, None], x["memory"][:, None], x["pos"][:, None], rope,
                     num_k_exclude_rope=unit["num_k_exclude_rope"])  # (B, 1, tokens, C)
    assert_matches(ours[:, 0], unit["outputs"]["tgt"])


def test_tracker_mask_decoder():
    from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoMaskDecoder

    unit = UNITS["mask_decoder"]
    decoder = imported(Sam3TrackerVideoMaskDecoder(with_sdpa(tracker_config().mask_decoder_config)), unit,
                       "tracker_model.mask_decoder.")
    decoder.dynamic_multimask_via_stability = False  # as in the dump: single = token 0's mask
    x = meta_inputs(unit)
    theirs = unit["outputs"]
    with torch.no_grad():
        for label, multimask in (("multi", True), ("single", False)):
            masks, iou, tokens, object_score = decoder(
                image_embeddings=x["image_embeddings"], image_positional_embeddings=x["image_pe"],
                sparse_prompt_embeddings=x["sparse_prompt_embeddings"][:, None],  # (B, point batch, N, C)
                dense_prompt_embeddings=x["dense_prompt_embeddings"], multimask_output=multimask,
                high_resolution_features=[x["high_res_feat_s0"], x["high_res_feat_s1"]])
            assert_matches(masks[:, 0], theirs[f"masks_{label}"])
            assert_matches(iou[:, 0], theirs[f"iou_{label}"])
            assert_matches(tokens[:, 0], theirs[f"tokens_{label}"])
            assert_matches(object_score[:, 0], theirs[f"object_score_{label}"])
        assert_matches(decoder.conv_s0(x["conv_s0_input"]), theirs["conv_s0"])
        assert_matches(decoder.conv_s1(x["conv_s1_input"]), theirs["conv_s1"])
