"""``medsam3 import``: a SAM3 checkpoint in Meta's format → a Hugging Face folder every stage loads.

Meta releases SAM3 as ``sam3.pt`` (``detector.*`` and ``tracker.*`` tensors, read by its ``sam3``
package); Medical SAM3's checkpoints use the same names, some without the ``detector.`` prefix,
some wrapped in ``{"model": ...}``. transformers' ``Sam3Model`` / ``Sam3VideoModel`` name and
shape a few tensors differently. :func:`map_key` says, for one Meta name, which transformers
tensor(s) it becomes and how (renamed; fused q/k/v split in three; the class-token position
dropped; the CLIP text projection transposed; the tracker's point embeddings stacked); the rules
follow transformers' own conversion scripts for SAM3 and SAM3 video, written anew.

The import is loud: every source tensor is converted or listed as unused, every target tensor
must be produced exactly once with its exact shape, and ``import_report.json`` counts all of it
by module. Anything missing, duplicated or misshapen stops the import before a file is written.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medsam3.errors import StageError

REPORT_FILE = "import_report.json"
KINDS = ("auto", "image", "video")
# Meta tensors that transformers' SAM3 has no place for, and why (reported as unused, allowed).
UNUSED = {
    r".*\.attn\.freqs_cis": "ViT rotary tables: transformers computes them from the config",
    r"geometry_encoder\.points_\w+\.\w+": "point prompts to the detector: transformers' Sam3Model takes boxes only",
}
# Bare detector names (Medical SAM3's image checkpoints drop the `detector.` prefix).
DETECTOR_ROOTS = ("backbone.", "transformer.", "geometry_encoder.", "segmentation_head.", "dot_prod_scoring.")


class CheckpointImportError(StageError):
    """The file is not a SAM3 checkpoint in Meta's format, or converting it would leave the model
    partly uninitialised."""


@dataclass(frozen=True)
class Target:
    """One transformers tensor made from a Meta tensor: ``op`` is ``copy``, ``clone`` (the same
    values in a tensor of its own), ``chunk`` (part ``index`` of 3 along dim 0: fused q/k/v),
    ``drop_first`` (position table without the class token), ``transpose``, or ``row`` (row
    ``index`` of a stacked table)."""

    key: str
    op: str = "copy"
    index: int = 0


Rule = tuple[str, str | Callable[[re.Match], str]]
_QKV = ("q_proj", "k_proj", "v_proj")


def _mlp3(prefix: str) -> Callable[[re.Match], str]:
    """SAM's 3-layer MLPs: ``layers.0/1/2`` → ``proj_in``, ``layers.0``, ``proj_out``."""
    def rename(m: re.Match) -> str:
        return f"{m.expand(prefix)}.{('proj_in', 'layers.0', 'proj_out')[int(m['i'])]}.{m['p']}"
    return rename


def _numbered(prefix: str, names: Mapping[int, str]) -> Callable[[re.Match], str]:
    return lambda m: f"{m.expand(prefix)}.{names[int(m['i'])]}.{m['p']}"


def _downsampler(m: re.Match) -> str:
    """SAM2's mask downsampler: conv, norm, activation per stage, then the final 1×1 conv (index 12)."""
    i = int(m["i"])
    part = "final_conv" if i == 12 else f"layers.{i // 3}.{('conv', 'layer_norm')[i % 3]}"
    return f"memory_encoder.mask_downsampler.{part}.{m['p']}"


_VIT = r"backbone\.vision_backbone\.trunk\."
_TEXT = r"backbone\.language_backbone\.encoder\."
_ATTN_LAYER = r"(?P<a>self_attn|cross_attn_image|cross_attn|ca_text)"
_DETR_ATTN = {"self_attn": "self_attn", "ca_text": "text_cross_attn", "cross_attn": "vision_cross_attn"}
_DETR_NORMS = {"norm1": "vision_cross_attn_layer_norm", "catext_norm": "text_cross_attn_layer_norm",
               "norm2": "self_attn_layer_norm", "norm3": "mlp_layer_norm"}

# (Meta name after `detector.`, transformers name). `{neck}` is the image model's neck or, for
# `sam2_convs`, the video model's tracker neck. Fused q/k/v are handled in `_fused`.
DETECTOR_RULES: list[Rule] = [
    (_VIT + r"patch_embed\.proj\.(?P<p>\w+)", r"vision_encoder.backbone.embeddings.patch_embeddings.projection.\g<p>"),
    (_VIT + r"ln_pre\.(?P<p>\w+)", r"vision_encoder.backbone.layer_norm.\g<p>"),
    (_VIT + r"blocks\.(?P<n>\d+)\.norm(?P<k>[12])\.(?P<p>\w+)",
     r"vision_encoder.backbone.layers.\g<n>.layer_norm\g<k>.\g<p>"),
    (_VIT + r"blocks\.(?P<n>\d+)\.attn\.proj\.(?P<p>\w+)",
     r"vision_encoder.backbone.layers.\g<n>.attention.o_proj.\g<p>"),
    (_VIT + r"blocks\.(?P<n>\d+)\.mlp\.(?P<f>fc[12])\.(?P<p>\w+)",
     r"vision_encoder.backbone.layers.\g<n>.mlp.\g<f>.\g<p>"),
    (r"backbone\.vision_backbone\.convs\.(?P<n>\d+)\.(?P<c>\w+)\.(?P<p>\w+)",
     lambda m: f"vision_encoder.neck.fpn_layers.{m['n']}.{_NECK[m['c']]}.{m['p']}"),
    (r"backbone\.vision_backbone\.sam2_convs\.(?P<n>\d+)\.(?P<c>\w+)\.(?P<p>\w+)",
     lambda m: f"@tracker_neck.fpn_layers.{m['n']}.{_NECK[m['c']]}.{m['p']}"),
    (_TEXT + r"token_embedding\.weight", "text_encoder.text_model.embeddings.token_embedding.weight"),
    (_TEXT + r"positional_embedding", "text_encoder.text_model.embeddings.position_embedding.weight"),
    (_TEXT + r"ln_final\.(?P<p>\w+)", r"text_encoder.text_model.final_layer_norm.\g<p>"),
    (_TEXT + r"transformer\.resblocks\.(?P<n>\d+)\.attn\.out_proj\.(?P<p>\w+)",
     r"text_encoder.text_model.encoder.layers.\g<n>.self_attn.out_proj.\g<p>"),
    (_TEXT + r"transformer\.resblocks\.(?P<n>\d+)\.ln_(?P<k>[12])\.(?P<p>\w+)",
     r"text_encoder.text_model.encoder.layers.\g<n>.layer_norm\g<k>.\g<p>"),
    (_TEXT + r"transformer\.resblocks\.(?P<n>\d+)\.mlp\.c_(?P<f>fc|proj)\.(?P<p>\w+)",
     lambda m: f"text_encoder.text_model.encoder.layers.{m['n']}.mlp.{'fc1' if m['f'] == 'fc' else 'fc2'}.{m['p']}"),
    (r"backbone\.language_backbone\.resizer\.(?P<p>\w+)", r"text_projection.\g<p>"),
    # geometry (box prompt) encoder and DETR encoder: the same layer layout
    (r"(?P<s>geometry_encoder)\.encode\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_image)\.out_proj\.(?P<p>\w+)",
     lambda m: f"geometry_encoder.layers.{m['n']}.{m['a'].removesuffix('_image')}.o_proj.{m['p']}"),
    (r"transformer\.encoder\.layers\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_image)\.out_proj\.(?P<p>\w+)",
     lambda m: f"detr_encoder.layers.{m['n']}.{m['a'].removesuffix('_image')}.o_proj.{m['p']}"),
    (r"(?P<s>geometry_encoder\.encode|transformer\.encoder\.layers)\.(?P<n>\d+)\.(?P<x>linear[12]|norm[123])\.(?P<p>\w+)",
     lambda m: f"{_STACK[m['s']]}.layers.{m['n']}."
               f"{'mlp.fc' + m['x'][-1] if m['x'].startswith('linear') else 'layer_norm' + m['x'][-1]}.{m['p']}"),
    (r"geometry_encoder\.(?P<x>img_pre_norm|norm|encode_norm)\.(?P<p>\w+)",
     lambda m: f"geometry_encoder.{_GEOMETRY_NORMS[m['x']]}.{m['p']}"),
    (r"geometry_encoder\.(?P<x>label_embed|cls_embed|boxes_direct_project|boxes_pool_project|boxes_pos_enc_project"
     r"|final_proj)\.(?P<p>\w+)", r"geometry_encoder.\g<x>.\g<p>"),
    # DETR decoder
    (r"transformer\.decoder\.layers\.(?P<n>\d+)\.(?P<a>self_attn|ca_text|cross_attn)\.out_proj\.(?P<p>\w+)",
     lambda m: f"detr_decoder.layers.{m['n']}.{_DETR_ATTN[m['a']]}.o_proj.{m['p']}"),
    (r"transformer\.decoder\.layers\.(?P<n>\d+)\.(?P<x>norm[123]|catext_norm)\.(?P<p>\w+)",
     lambda m: f"detr_decoder.layers.{m['n']}.{_DETR_NORMS[m['x']]}.{m['p']}"),
    (r"transformer\.decoder\.layers\.(?P<n>\d+)\.linear(?P<k>[12])\.(?P<p>\w+)",
     r"detr_decoder.layers.\g<n>.mlp.fc\g<k>.\g<p>"),
    (r"transformer\.decoder\.norm\.(?P<p>\w+)", r"detr_decoder.output_layer_norm.\g<p>"),
    (r"transformer\.decoder\.presence_token_out_norm\.(?P<p>\w+)", r"detr_decoder.presence_layer_norm.\g<p>"),
    (r"transformer\.decoder\.(?P<x>query_embed|reference_points|presence_token)\.(?P<p>\w+)",
     r"detr_decoder.\g<x>.\g<p>"),
    (r"transformer\.decoder\.(?P<x>bbox_embed|presence_token_head|ref_point_head|boxRPB_embed_x|boxRPB_embed_y)"
     r"\.layers\.(?P<i>\d+)\.(?P<p>\w+)",
     lambda m: f"detr_decoder.{_DETR_MLPS[m['x']]}.layer{int(m['i']) + 1}.{m['p']}"),
    # scoring and segmentation heads
    (r"dot_prod_scoring\.prompt_mlp\.layers\.(?P<i>\d+)\.(?P<p>\w+)",
     lambda m: f"dot_product_scoring.text_mlp.layer{int(m['i']) + 1}.{m['p']}"),
    (r"dot_prod_scoring\.prompt_mlp\.out_norm\.(?P<p>\w+)", r"dot_product_scoring.text_mlp_out_norm.\g<p>"),
    (r"dot_prod_scoring\.prompt_proj\.(?P<p>\w+)", r"dot_product_scoring.text_proj.\g<p>"),
    (r"dot_prod_scoring\.hs_proj\.(?P<p>\w+)", r"dot_product_scoring.query_proj.\g<p>"),
    (r"segmentation_head\.pixel_decoder\.(?P<x>conv_layers|norms)\.(?P<n>\d+)\.(?P<p>\w+)",
     r"mask_decoder.pixel_decoder.\g<x>.\g<n>.\g<p>"),
    (r"segmentation_head\.(mask_predictor\.)?mask_embed\.layers\.(?P<n>\d+)\.(?P<p>\w+)",
     r"mask_decoder.mask_embedder.layers.\g<n>.\g<p>"),
    (r"segmentation_head\.instance_seg_head\.(?P<p>\w+)", r"mask_decoder.instance_projection.\g<p>"),
    (r"segmentation_head\.semantic_seg_head\.(?P<p>\w+)", r"mask_decoder.semantic_projection.\g<p>"),
    (r"segmentation_head\.cross_attend_prompt\.out_proj\.(?P<p>\w+)", r"mask_decoder.prompt_cross_attn.o_proj.\g<p>"),
    (r"segmentation_head\.cross_attn_norm\.(?P<p>\w+)", r"mask_decoder.prompt_cross_attn_norm.\g<p>"),
]
_NECK = {"dconv_2x2_0": "scale_layers.0", "dconv_2x2": "scale_layers.0", "dconv_2x2_1": "scale_layers.2",
         "conv_1x1": "proj1", "conv_3x3": "proj2"}
_STACK = {"geometry_encoder.encode": "geometry_encoder", "transformer.encoder.layers": "detr_encoder"}
_GEOMETRY_NORMS = {"img_pre_norm": "vision_layer_norm", "norm": "prompt_layer_norm", "encode_norm": "output_layer_norm"}
_DETR_MLPS = {"bbox_embed": "box_head", "presence_token_head": "presence_head", "ref_point_head": "ref_point_head",
              "boxRPB_embed_x": "box_rpb_embed_x", "boxRPB_embed_y": "box_rpb_embed_y"}

# (Meta name after `tracker.`, transformers name under `tracker_model.`): SAM2's tracker.
_MD = r"sam_mask_decoder\."
TRACKER_RULES: list[Rule] = [
    (r"maskmem_tpos_enc", "memory_temporal_positional_encoding"),
    (r"no_mem_embed", "no_memory_embedding"),
    (r"no_mem_pos_enc", "no_memory_positional_encoding"),
    (r"no_obj_ptr", "no_object_pointer"),
    (r"no_obj_embed_spatial", "occlusion_spatial_embedding_parameter"),
    (r"mask_downsample\.(?P<p>\w+)", r"mask_downsample.\g<p>"),
    (r"obj_ptr_tpos_proj\.(?P<p>\w+)", r"temporal_positional_encoding_projection_layer.\g<p>"),
    (r"obj_ptr_proj\.layers\.(?P<i>\d)\.(?P<p>\w+)", _mlp3("object_pointer_proj")),
    # memory attention
    (r"transformer\.encoder\.layers\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_image)\.(?P<x>[qkv]_proj|out_proj)"
     r"\.(?P<p>\w+)", lambda m: f"memory_attention.layers.{m['n']}.{m['a']}.{_o(m['x'])}.{m['p']}"),
    (r"transformer\.encoder\.layers\.(?P<n>\d+)\.(?P<x>linear[12])\.(?P<p>\w+)",
     r"memory_attention.layers.\g<n>.\g<x>.\g<p>"),
    (r"transformer\.encoder\.layers\.(?P<n>\d+)\.norm(?P<k>[123])\.(?P<p>\w+)",
     r"memory_attention.layers.\g<n>.layer_norm\g<k>.\g<p>"),
    (r"transformer\.encoder\.norm\.(?P<p>\w+)", r"memory_attention.layer_norm.\g<p>"),
    # memory encoder
    (r"maskmem_backbone\.mask_downsampler\.encoder\.(?P<i>\d+)\.(?P<p>\w+)", _downsampler),
    (r"maskmem_backbone\.pix_feat_proj\.(?P<p>\w+)", r"memory_encoder.feature_projection.\g<p>"),
    (r"maskmem_backbone\.out_proj\.(?P<p>\w+)", r"memory_encoder.projection.\g<p>"),
    (r"maskmem_backbone\.fuser\.layers\.(?P<n>\d+)\.(?P<x>gamma|dwconv|norm|pwconv1|pwconv2)(\.(?P<p>\w+))?",
     lambda m: f"memory_encoder.memory_fuser.layers.{m['n']}.{_FUSER[m['x']]}" + (f".{m['p']}" if m["p"] else "")),
    # prompt encoder
    (r"sam_prompt_encoder\.(?P<x>not_a_point_embed|no_mask_embed)\.(?P<p>\w+)", r"prompt_encoder.\g<x>.\g<p>"),
    (r"sam_prompt_encoder\.mask_downscaling\.(?P<i>\d)\.(?P<p>\w+)",
     _numbered("prompt_encoder.mask_embed", {0: "conv1", 1: "layer_norm1", 3: "conv2", 4: "layer_norm2", 6: "conv3"})),
    # SAM mask decoder
    (_MD + r"transformer\.layers\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
     r"\.(?P<x>[qkv]_proj|out_proj)\.(?P<p>\w+)",
     lambda m: f"mask_decoder.transformer.layers.{m['n']}.{m['a']}.{_o(m['x'])}.{m['p']}"),
    (_MD + r"transformer\.layers\.(?P<n>\d+)\.norm(?P<k>[1234])\.(?P<p>\w+)",
     r"mask_decoder.transformer.layers.\g<n>.layer_norm\g<k>.\g<p>"),
    (_MD + r"transformer\.layers\.(?P<n>\d+)\.mlp\.lin(?P<k>[12])\.(?P<p>\w+)",
     lambda m: f"mask_decoder.transformer.layers.{m['n']}.mlp.{('proj_in', 'proj_out')[int(m['k']) - 1]}.{m['p']}"),
    (_MD + r"transformer\.final_attn_token_to_image\.(?P<x>[qkv]_proj|out_proj)\.(?P<p>\w+)",
     lambda m: f"mask_decoder.transformer.final_attn_token_to_image.{_o(m['x'])}.{m['p']}"),
    (_MD + r"transformer\.norm_final_attn\.(?P<p>\w+)", r"mask_decoder.transformer.layer_norm_final_attn.\g<p>"),
    (_MD + r"(?P<x>iou_token|mask_tokens|obj_score_token|conv_s0|conv_s1)\.(?P<p>\w+)", r"mask_decoder.\g<x>.\g<p>"),
    (_MD + r"output_upscaling\.(?P<i>\d)\.(?P<p>\w+)",
     _numbered("mask_decoder", {0: "upscale_conv1", 1: "upscale_layer_norm", 3: "upscale_conv2"})),
    (_MD + r"output_hypernetworks_mlps\.(?P<n>\d+)\.layers\.(?P<i>\d)\.(?P<p>\w+)",
     _mlp3(r"mask_decoder.output_hypernetworks_mlps.\g<n>")),
    (_MD + r"(?P<x>iou_prediction_head|pred_obj_score_head)\.layers\.(?P<i>\d)\.(?P<p>\w+)",
     _mlp3(r"mask_decoder.\g<x>")),
]
_FUSER = {"gamma": "scale", "dwconv": "depthwise_conv", "norm": "layer_norm", "pwconv1": "pointwise_conv1",
          "pwconv2": "pointwise_conv2"}


def _o(name: str) -> str:
    return "o_proj" if name == "out_proj" else name


def _fused(rest: str, video: bool) -> list[Target] | None:
    """Fused attention input projections → three targets (q, k, v)."""
    patterns = [
        (_VIT + r"blocks\.(?P<n>\d+)\.attn\.qkv\.(?P<p>\w+)", "vision_encoder.backbone.layers.{n}.attention.{x}.{p}"),
        (_TEXT + r"transformer\.resblocks\.(?P<n>\d+)\.attn\.in_proj_(?P<p>\w+)",
         "text_encoder.text_model.encoder.layers.{n}.self_attn.{x}.{p}"),
        (r"geometry_encoder\.encode\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_image)\.in_proj_(?P<p>\w+)",
         "geometry_encoder.layers.{n}.{a}.{x}.{p}"),
        (r"transformer\.encoder\.layers\.(?P<n>\d+)\.(?P<a>self_attn|cross_attn_image)\.in_proj_(?P<p>\w+)",
         "detr_encoder.layers.{n}.{a}.{x}.{p}"),
        (r"transformer\.decoder\.layers\.(?P<n>\d+)\.(?P<a>self_attn|ca_text|cross_attn)\.in_proj_(?P<p>\w+)",
         "detr_decoder.layers.{n}.{a}.{x}.{p}"),
        (r"segmentation_head\.cross_attend_prompt\.in_proj_(?P<p>\w+)", "mask_decoder.prompt_cross_attn.{x}.{p}"),
    ]
    for pattern, template in patterns:
        m = re.fullmatch(pattern, rest)
        if m:
            fields = m.groupdict()
            if "a" in fields:  # the DETR decoder's and encoders' names for their attentions
                fields["a"] = _DETR_ATTN.get(fields["a"], fields["a"]) if pattern.startswith("transformer\\.decoder") \
                    else fields["a"].removesuffix("_image")
            prefix = "detector_model." if video else ""
            return [Target(prefix + template.format(x=x, **fields), "chunk", i) for i, x in enumerate(_QKV)]
    return None


def _apply(rules: list[Rule], rest: str) -> str | None:
    for pattern, replacement in rules:
        m = re.fullmatch(pattern, rest)
        if m:
            return replacement(m) if callable(replacement) else m.expand(replacement)
    return None


def map_key(key: str, video: bool) -> list[Target] | str | None:
    """The transformers tensor(s) a Meta-format tensor becomes in ``Sam3VideoModel`` (``video``)
    or ``Sam3Model``; a string: the reason it has no place there; None: not a SAM3 name."""
    component, _, rest = key.partition(".")
    for pattern, reason in UNUSED.items():
        if re.fullmatch(pattern, rest):
            return reason
    if component == "detector":
        prefix = "detector_model." if video else ""
        if rest == "backbone.vision_backbone.trunk.pos_embed":
            return [Target(prefix + "vision_encoder.backbone.embeddings.position_embeddings", "drop_first")]
        if rest == "backbone.language_backbone.encoder.text_projection":
            return [Target(prefix + "text_encoder.text_projection.weight", "transpose")]
        fused = _fused(rest, video)
        if fused:
            return fused
        name = _apply(DETECTOR_RULES, rest)
        if name is None:
            return None
        if name.startswith("@"):  # the tracker's own neck on the shared trunk: video models only
            return [Target(name[1:])] if video else "the tracker's neck: an image model has no tracker"
        return [Target(prefix + name)]
    if component == "tracker":
        if not video:
            return "the tracker: imported with --kind video"
        if rest == "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":  # shared by two modules
            return [Target("tracker_model.prompt_encoder.shared_embedding.positional_embedding"),
                    Target("tracker_model.shared_image_embedding.positional_embedding", "clone")]
        m = re.fullmatch(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight", rest)
        if m:
            return [Target("tracker_model.prompt_encoder.point_embed.weight", "row", int(m[1]))]
        name = _apply(TRACKER_RULES, rest)
        return None if name is None else [Target("tracker_model." + name)]
    return None


def normalise_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """Meta names in one convention: `detector.` added to bare detector names, DDP's `module.` dropped."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(DETECTOR_ROOTS):
            key = "detector." + key
        out[key] = value
    return out


def _make(target: Target, source: torch.Tensor) -> torch.Tensor:
    if target.op == "chunk":
        return source.chunk(3, dim=0)[target.index]
    if target.op == "drop_first":
        return source[:, 1:]
    if target.op == "transpose":
        return source.t()
    if target.op == "clone":  # a second tensor from one source: its own storage (no shared tensors on save)
        return source.clone()
    return source


def _module(key: str) -> str:
    """The report's grouping: the first two parts of a name (``tracker_model.memory_attention``)."""
    return ".".join(key.split(".")[:2])


def convert_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], video: bool,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Meta-format tensors → transformers tensors for a model whose state has the names and
    shapes ``expected``; returns (tensors, report). The report's ``problems`` list every target
    made twice, misshapen, or never made (the allow-list of uninitialised tensors is empty)."""
    made: dict[str, torch.Tensor] = {}
    rows: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    producers: Counter[str] = Counter()
    unused: dict[str, str] = {}
    unknown: list[str] = []
    for key, tensor in normalise_keys(state).items():  # idempotent: import_checkpoint has done it
        targets = map_key(key, video)
        if targets is None:
            unknown.append(key)
            continue
        if isinstance(targets, str):
            unused[key] = targets
            continue
        for target in targets:
            producers[target.key] += 1
            if target.op == "row":
                rows[target.key].append((target.index, tensor))
            else:
                made[target.key] = _make(target, tensor)
    for key, parts in rows.items():
        producers[key] = 1 if len({i for i, _ in parts}) == len(parts) else 2
        made[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    problems: list[str] = []
    twice = sorted(k for k, n in producers.items() if n > 1)
    if twice:
        problems.append(f"made more than once: {', '.join(twice[:5])}")
    strange = sorted(k for k in made if k not in expected)
    if strange:
        problems.append(f"no such tensor in the model: {', '.join(strange[:5])}")
    misshapen = [f"{k} {tuple(made[k].shape)} != {tuple(s)}" for k, s in expected.items()
                 if k in made and tuple(made[k].shape) != tuple(s)]
    if misshapen:
        problems.append(f"shape mismatch: {'; '.join(misshapen[:5])}")
    strays = [k for k in unknown if k.startswith(("detector.", "tracker."))]
    if strays:
        problems.append(f"{len(strays)} SAM3 tensors this import does not know (fine-tuning deltas such as "
                        f"unmerged LoRA would be lost), e.g. {', '.join(strays[:5])}")
    missing = [k for k in expected if k not in made]
    if missing:
        problems.append(f"{len(missing)} model tensors would keep their initial values, e.g. {', '.join(missing[:5])}")
    by_module: dict[str, dict[str, int]] = defaultdict(lambda: {"converted": 0, "uninitialised": 0})
    for key in expected:
        by_module[_module(key)]["converted" if key in made else "uninitialised"] += 1
    report = {
        "kind": "video" if video else "image",
        "source_tensors": len(state),
        "converted_source_tensors": len(state) - len(unused) - len(unknown),
        "target_tensors": len(expected),
        "target_tensors_converted": sum(1 for k in expected if k in made),
        "uninitialised": sorted(missing),
        "unused": dict(Counter(f"{_module(k)}: {r}" for k, r in unused.items())),
        "unknown_source_tensors": unknown,  # outside detector./tracker.: reported, not fatal
        "by_module": dict(sorted(by_module.items())),
        "problems": problems,
    }
    return made, report


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a Meta-format checkpoint, memory-mapped (a 10 GB file is not read into
    memory); unwraps ``{"model": ...}`` / ``{"state_dict": ...}``. Only tensors and plain
    containers are unpickled (``weights_only``): a checkpoint cannot run code here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointImportError(f"{path}: no such file")
    try:
        try:
            data = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear refusal
        reason = f"{type(exc).__name__}: {exc}".strip()
        raise CheckpointImportError(f"{path}: not a readable PyTorch checkpoint ({reason})") from exc
    if isinstance(data, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(data.get(wrapper), Mapping):
                data = data[wrapper]
                break
    if not isinstance(data, Mapping) or not data:
        raise CheckpointImportError(f"{path}: holds no state dict (a mapping of names to tensors)")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointImportError(f"{path}: holds no tensors")
    return tensors


# Meta's ViT builds its LayerNorms with eps 1e-5 (sam3/model/vitdet.py:719, sam3==0.1.4) where
# transformers' Sam3ViTConfig defaults to 1e-6; an imported model keeps Meta's.
META_VIT_LAYER_NORM_EPS = 1e-5


def meta_config(video: bool, preset_name: str | None = None):
    """The transformers config an import writes: full size (or a preset's architecture) with
    Meta's ViT LayerNorm epsilon."""
    from transformers import Sam3Config, Sam3VideoConfig

    from medsam3.model import preset
    from medsam3.video import preset_video_config

    if preset_name is None:
        config = Sam3VideoConfig() if video else Sam3Config()
    else:
        config = preset_video_config(preset_name) if video else Sam3Config(**preset(preset_name)["config"])
    (config.detector_config if video else config).vision_config.backbone_config.layer_norm_eps = \
        META_VIT_LAYER_NORM_EPS
    return config


def target_model(video: bool, preset_name: str | None = None):
    """transformers' SAM3 (or SAM3 video) built on the meta device (names and shapes, no memory)
    from :func:`meta_config`."""
    from transformers import Sam3Model, Sam3VideoModel

    with torch.device("meta"):
        return (Sam3VideoModel if video else Sam3Model)(meta_config(video, preset_name))


def import_checkpoint(weights: str | os.PathLike, out_dir: str | os.PathLike, bpe_path: str | os.PathLike,
                      kind: str = "auto", preset_name: str | None = None) -> dict[str, Any]:
    """Convert ``weights`` into a Hugging Face folder ``out_dir`` (with SAM3's CLIP tokenizer
    from ``bpe_path`` and ``import_report.json``); returns the report. Refused, with nothing
    written, when the report lists any problem. ``preset_name``: the architecture of a preset
    instead of SAM3's one size (tests)."""
    from medsam3.io import storage
    from medsam3.model import TEXT_LENGTH, write_clip_tokenizer_files

    if kind not in KINDS:
        raise CheckpointImportError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    state = read_checkpoint(weights)
    names = normalise_keys(state)
    if not any(k.startswith("detector.backbone.vision_backbone.trunk.") for k in names):
        sample = ", ".join(list(state)[:3])
        raise CheckpointImportError(f"{weights}: no SAM3 vision trunk (`detector.backbone.vision_backbone.trunk.*`); "
                                    f"not a SAM3 checkpoint in Meta's format (its first tensors: {sample})")
    has_tracker = any(k.startswith("tracker.") for k in names)
    video = has_tracker if kind == "auto" else kind == "video"
    if video and not has_tracker:
        raise CheckpointImportError(f"{weights}: --kind video, but the checkpoint has no `tracker.*` tensors")
    model = target_model(video, preset_name)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tensors, report = convert_state(names, expected, video)
    report = {"source": os.fspath(weights), **report}
    if report["problems"]:
        raise CheckpointImportError(f"{weights}: not imported, nothing written:\n  " + "\n  ".join(report["problems"]))
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    report["source_dtypes"] = dict(dtypes)
    # fp32 in the folder (a bf16 release is widened tensor by tensor; training keeps fp32 masters)
    model.load_state_dict({k: v.float().contiguous() for k, v in tensors.items()}, strict=True, assign=True)
    model.config.architectures = [type(model).__name__]
    with storage.staged_output(out_dir, last=[REPORT_FILE]) as staging:
        model.save_pretrained(staging, max_shard_size="2GB")
        from transformers import CLIPTokenizer

        write_clip_tokenizer_files(bpe_path, staging)  # SAM3's tokenizer: CLIP's BPE, 32 positions
        CLIPTokenizer.from_pretrained(os.fspath(staging), model_max_length=TEXT_LENGTH).save_pretrained(staging)
        (Path(staging) / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return report


def summary(report: Mapping[str, Any]) -> str:
    """The report in a few lines for the console."""
    lines = [f"{report['source']}: SAM3 {report['kind']} checkpoint",
             f"  source tensors {report['source_tensors']}: converted {report['converted_source_tensors']}, "
             f"unused {sum(report['unused'].values()) + len(report['unknown_source_tensors'])}",
             f"  model tensors {report['target_tensors']}: from the checkpoint {report['target_tensors_converted']}, "
             f"left at their initial value {len(report['uninitialised'])}"]
    lines += [f"  unused: {n} × {why}" for why, n in report["unused"].items()]
    if report["unknown_source_tensors"]:
        lines.append(f"  unused: {len(report['unknown_source_tensors'])} tensors with names that are not SAM3's, "
                     f"e.g. {', '.join(report['unknown_source_tensors'][:3])}")
    return "\n".join(lines)
