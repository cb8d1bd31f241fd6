"""`medsam3 import`: Meta-format SAM3 checkpoints → Hugging Face folders.

The mapping is checked against facts it was not written from: Meta's own names and shapes
(``tests/data/meta_sam3_keys.json.gz``, dumped from Meta's ``sam3`` package by
``tools/dump_meta_sam3_keys.py`` in an isolated venv) must produce every tensor of transformers'
full-size ``Sam3Model`` / ``Sam3VideoModel`` exactly once, with its shape. Tiny checkpoints in
Meta's format then test the file handling end to end (wrappers, prefixes, bf16, refusals).
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from medsam3.cli import main
from medsam3.meta_import import Target, convert_state, map_key, target_model
from tests.builders import SHARED

with gzip.open(Path(__file__).parent / "data" / "meta_sam3_keys.json.gz") as _file:
    META_KEYS = json.load(_file)
BPE = SHARED / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
ALLOWED_UNUSED = {
    "detector.backbone: ViT rotary tables: transformers computes them from the config": 32,
    "detector.geometry_encoder: point prompts to the detector: transformers' Sam3Model takes boxes only": 6}


@pytest.mark.parametrize("kind", ["image", "video"])
def test_metas_names_make_every_tensor_of_the_full_size_model_exactly_once(kind):
    video = kind == "video"
    source = {k: torch.empty(shape, device="meta") for k, shape in META_KEYS[kind].items()}
    expected = {k: v.shape for k, v in target_model(video).state_dict().items()}
    made, report = convert_state(source, expected, video)
    assert report["problems"] == []
    assert set(made) == set(expected)  # made once each (a second maker is a problem), shapes checked
    assert report["unused"] == ALLOWED_UNUSED and report["unknown_source_tensors"] == []
    assert report["converted_source_tensors"] == len(source) - 38
    assert report["target_tensors"] == (1797 if video else 1468)


def test_the_transforms_of_the_mapping():
    vit = "detector.backbone.vision_backbone.trunk."
    assert map_key(vit + "blocks.3.attn.qkv.weight", video=False) == [
        Target(f"vision_encoder.backbone.layers.3.attention.{x}_proj.weight", "chunk", i) for i, x in enumerate("qkv")]
    assert map_key(vit + "pos_embed", video=True) == [
        Target("detector_model.vision_encoder.backbone.embeddings.position_embeddings", "drop_first")]
    assert map_key("detector.backbone.language_backbone.encoder.text_projection", video=False) == [
        Target("text_encoder.text_projection.weight", "transpose")]
    assert map_key("tracker.sam_prompt_encoder.point_embeddings.2.weight", video=True) == [
        Target("tracker_model.prompt_encoder.point_embed.weight", "row", 2)]
    assert map_key("detector.transformer.decoder.layers.1.ca_text.in_proj_bias", video=False)[1] == \
        Target("detr_decoder.layers.1.text_cross_attn.k_proj.bias", "chunk", 1)
    assert isinstance(map_key("tracker.maskmem_tpos_enc", video=False), str)  # image models: unused, said why
    assert map_key("resnet.conv1.weight", video=False) is None


def tiny_meta_checkpoint(model: torch.nn.Module, video: bool) -> dict[str, torch.Tensor]:
    """``model``'s weights under Meta's names: the Meta names of the full-size key set whose
    targets the tiny model has, each made from those targets by the inverse of its transform."""
    hf = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, shape in META_KEYS["video" if video else "image"].items():
        targets = map_key(key, video)
        if isinstance(targets, str):  # unused by transformers: any values
            out[key] = torch.randn(shape) if "freqs_cis" not in key else torch.randn(shape, dtype=torch.complex64)
            continue
        if not all(t.key in hf for t in targets):
            continue  # a layer the tiny model does not have
        first = targets[0]
        if first.op == "chunk":
            out[key] = torch.cat([hf[t.key] for t in targets])
        elif first.op == "drop_first":
            table = hf[first.key]
            out[key] = torch.cat([torch.randn(1, 1, table.shape[-1]), table], dim=1)
        elif first.op == "transpose":
            out[key] = hf[first.key].t().contiguous()
        elif first.op == "row":
            out[key] = hf[first.key][first.index:first.index + 1].clone()
        else:
            out[key] = hf[first.key].clone()
    return out


def tiny_model(video: bool):
    """A tiny model with the config an import writes (Meta's ViT LayerNorm epsilon)."""
    from transformers import Sam3Model, Sam3VideoModel

    from medsam3.meta_import import meta_config

    torch.manual_seed(0)
    if not video:
        return Sam3Model(meta_config(False, "tiny")).eval()
    model = Sam3VideoModel(meta_config(True, "tiny_video")).eval()
    tracker = model.tracker_model
    # one table in Meta's tracker, two in transformers': the same values, as in the released weights
    tracker.shared_image_embedding.positional_embedding.data.copy_(
        tracker.prompt_encoder.shared_embedding.positional_embedding)
    return model


def test_tiny_medical_sam3_image_checkpoint_imports_and_gives_the_same_outputs(tmp_path, tiny_checkpoint):
    """Medical SAM3's 2D convention: bare detector names in a {"model": ...} wrapper, fp32."""
    from transformers import AutoTokenizer, Sam3Model

    from pipelines.recipe import probe_inputs

    model = tiny_model(video=False)
    meta = {k.removeprefix("detector."): v for k, v in tiny_meta_checkpoint(model, False).items()}
    torch.save({"model": meta, "epoch": 7}, tmp_path / "checkpoint_2D.pt")
    assert main(["import", str(tmp_path / "checkpoint_2D.pt"), str(tmp_path / "hf"), "--bpe", str(BPE),
                 "--preset", "tiny"]) == 0
    report = json.loads((tmp_path / "hf" / "import_report.json").read_text())
    assert report["kind"] == "image" and report["problems"] == [] and report["uninitialised"] == []
    assert report["target_tensors_converted"] == report["target_tensors"] == len(model.state_dict())
    imported = Sam3Model.from_pretrained(tmp_path / "hf").eval()
    inputs = probe_inputs(AutoTokenizer.from_pretrained(tmp_path / "hf"), 224)
    with torch.no_grad():
        ours, theirs = imported(**inputs), model(**inputs)
    assert torch.equal(ours.pred_masks, theirs.pred_masks) and torch.equal(ours.pred_logits, theirs.pred_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_sam3_video_checkpoint_imports_with_its_tracker(tmp_path, dtype):
    """Meta's release convention: `detector.` and `tracker.` names, here in a state_dict wrapper."""
    from medsam3.video import load_video_model

    model = tiny_model(video=True)
    meta = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_meta_checkpoint(model, True).items()}
    torch.save({"state_dict": meta}, tmp_path / "sam3.pt")
    assert main(["import", str(tmp_path / "sam3.pt"), str(tmp_path / "hf"), "--bpe", str(BPE),
                 "--preset", "tiny_video"]) == 0
    report = json.loads((tmp_path / "hf" / "import_report.json").read_text())
    assert report["kind"] == "video" and report["problems"] == []
    assert set(report["source_dtypes"]) == {str(dtype).removeprefix("torch."), "complex64"}  # rotary tables
    imported = load_video_model(tmp_path / "hf").state_dict()
    original = model.state_dict()
    assert set(imported) == set(original)
    for key, value in original.items():  # every tensor the tiny model had, through bf16
        assert torch.equal(imported[key], value.to(dtype).float()), key


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("meta")
    state = tiny_meta_checkpoint(tiny_model(video=False), False)
    torch.save(state, folder / "sam3.pt")
    return folder, state


def refused(capsys, weights, out, *extra) -> str:
    assert main(["import", str(weights), str(out), "--bpe", str(BPE), "--preset", "tiny", *extra]) == 1
    assert not out.exists()  # nothing written
    return capsys.readouterr().err


def test_truncated_file_is_refused_naming_it(meta_file, tmp_path, capsys):
    folder, _ = meta_file
    data = (folder / "sam3.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "cut.pt: not a readable PyTorch checkpoint" in refused(capsys, tmp_path / "cut.pt", tmp_path / "out")


def test_a_checkpoint_that_is_not_sam3_is_refused(tmp_path, capsys):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, tmp_path / "resnet.pt")
    error = refused(capsys, tmp_path / "resnet.pt", tmp_path / "out")
    assert "resnet.pt: no SAM3 vision trunk" in error and "conv1.weight" in error


def test_missing_modules_and_wrong_shapes_are_refused_naming_the_tensors(meta_file, tmp_path, capsys):
    _, state = meta_file
    no_decoder = {k: v for k, v in state.items() if ".transformer.decoder." not in k}
    torch.save(no_decoder, tmp_path / "partial.pt")
    error = refused(capsys, tmp_path / "partial.pt", tmp_path / "out")
    assert "would keep their initial values" in error and "detr_decoder." in error
    no_trunk = {k: v for k, v in state.items() if ".trunk." not in k}
    torch.save(no_trunk, tmp_path / "no_trunk.pt")
    assert "no SAM3 vision trunk" in refused(capsys, tmp_path / "no_trunk.pt", tmp_path / "out")
    reshaped = dict(state)
    key = "detector.transformer.decoder.query_embed.weight"
    reshaped[key] = torch.zeros(reshaped[key].shape[0] + 1, reshaped[key].shape[1])
    torch.save(reshaped, tmp_path / "reshaped.pt")
    assert "shape mismatch: detr_decoder.query_embed.weight" in refused(capsys, tmp_path / "reshaped.pt",
                                                                        tmp_path / "out")
    assert "--kind video, but the checkpoint has no `tracker.*`" in refused(
        capsys, meta_file[0] / "sam3.pt", tmp_path / "out", "--kind", "video")
    unmerged = dict(state)  # a fine-tuning delta that no rule knows would be dropped: refused instead
    unmerged["detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.lora_A.weight"] = torch.zeros(4, 64)
    torch.save(unmerged, tmp_path / "lora.pt")
    assert "SAM3 tensors this import does not know" in refused(capsys, tmp_path / "lora.pt", tmp_path / "out")


with gzip.open(Path(__file__).parent / "data" / "hf_sam3_conversion_map.json.gz") as _file:
    HF_CONVERSION = json.load(_file)  # transformers' conversion scripts on META_KEYS: tools/dump_hf_conversion_map.py
# Meta keys that transformers' scripts map to names its models do not have (so they are dropped on
# load); map_key lists them as unused. Each must stay absent from the real model's state dict.
HF_NAMING_ONLY = {
    r"detector\.backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis": 32,
    r"detector\.geometry_encoder\.points_(direct|pool|pos_enc)_project\.(weight|bias)": 6,
}


@pytest.mark.parametrize("kind", ["image", "video"])
def test_map_key_agrees_with_transformers_own_conversion_scripts(kind):
    """Every Meta key: the same transformers names, ops and chunk/row indices as transformers'
    convert_sam3_to_hf.py / convert_sam3_video_to_hf.py produce (``clone`` is their second name
    for the one tensor, recorded there as ``copy``), and the shapes they produce are the model's."""
    video = kind == "video"
    theirs_all = HF_CONVERSION[kind]
    assert set(theirs_all) == set(META_KEYS[kind])
    real = {k: list(v.shape) for k, v in target_model(video).state_dict().items()}
    disagreements, naming_only, compared, agreeing = [], Counter(), 0, 0
    for key in META_KEYS[kind]:
        theirs = sorted((name, op, index) for name, op, index, _ in theirs_all[key])
        ours = map_key(key, video)
        if isinstance(ours, list):
            ours = sorted((t.key, "copy" if t.op == "clone" else t.op, t.index) for t in ours)
        allowed = [p for p in HF_NAMING_ONLY if re.fullmatch(p, key)]
        if allowed:
            naming_only[allowed[0]] += 1
            if not isinstance(ours, str) or any(name in real for name, *_ in theirs):
                disagreements.append(f"{key}: ours {ours!r}, transformers {theirs!r} (allow-listed as unused)")
            continue
        compared += 1
        misshapen = [f"{name} {shape} vs model {real.get(name)}" for name, _, _, shape in theirs_all[key]
                     if real.get(name) != shape]
        if ours != theirs or misshapen:
            disagreements.append(f"{key}: ours {ours!r}, transformers {theirs!r} {'; '.join(misshapen)}".rstrip())
        else:
            agreeing += 1
    assert not disagreements, f"{len(disagreements)} Meta keys disagree, e.g.\n" + "\n".join(disagreements[:5])
    assert naming_only == HF_NAMING_ONLY
    assert compared == agreeing == len(META_KEYS[kind]) - 38 == (1427 if video else 1096)
