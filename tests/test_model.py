"""SAM3 presets, checkpoint checks and tokenizers (the CLIP BPE one from ../shared/data)."""

from __future__ import annotations

import json

import pytest
import torch

from medsam3.model import (
    CheckpointError,
    build_model,
    build_tokenizer,
    check_checkpoint,
    model_image_size,
    tokenize,
)
from tests.builders import SHARED

BPE = SHARED / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"


def test_clip_bpe_tokenizer_matches_clip_ids(tmp_path):
    tok = build_tokenizer(bpe_path=BPE, work_dir=tmp_path)
    assert len(tok) == 49408
    enc = tokenize(tok, ["left", "left kidney", "retinal blood vessel"])
    assert enc["input_ids"].shape == (3, 32)
    assert enc["input_ids"][0, :3].tolist() == [49406, 1823, 49407]  # BOS, "left", EOS
    assert enc["attention_mask"][1].sum() == 4
    assert tok.decode(enc["input_ids"][2], skip_special_tokens=True) == "retinal blood vessel"
    assert "blood</w>" in tok.convert_ids_to_tokens(enc["input_ids"][2].tolist())


def test_word_tokenizer_for_tiny():
    tok = build_tokenizer(prompts=["left kidney", "liver", "polyp"])
    enc = tokenize(tok, ["left kidney", "Liver", "unknown thing"])
    ids = enc["input_ids"]
    assert ids.shape == (3, 32) and ids[0, 0] == tok.bos_token_id and ids[0, 3] == tok.eos_token_id
    assert ids[0, 1] != ids[0, 2] and ids[1, 1] == tok.convert_tokens_to_ids("liver")
    assert ids[2, 1] == tok.unk_token_id and enc["attention_mask"][2].sum() == 4


def test_tiny_preset_runs_forward_and_backward():
    torch.manual_seed(0)
    model = build_model("tiny")
    size = model_image_size(model)
    assert size == 224 and sum(p.numel() for p in model.parameters()) < 10_000_000
    out = model(pixel_values=torch.randn(2, 3, size, size), input_ids=torch.randint(0, 1000, (2, 32)),
                attention_mask=torch.ones(2, 32, dtype=torch.long))
    queries = model.config.detr_decoder_config.num_queries
    assert out.pred_masks.shape[:2] == (2, queries) and out.pred_boxes.shape == (2, queries, 4)
    assert out.presence_logits.shape == (2, 1)
    (out.pred_masks.mean() + out.pred_logits.mean() + out.presence_logits.mean()).backward()
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert {"vision_encoder", "text_encoder", "detr_encoder", "detr_decoder", "mask_decoder"} <= with_grad
    # text-only prompts leave the geometry (box) encoder unused
    assert all(p.grad is None for p in model.geometry_encoder.parameters())


def test_activation_checkpointing_keeps_gradients():
    from medsam3.model import enable_activation_checkpointing

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model("tiny")
        if checkpointed:
            enable_activation_checkpointing(model)
        torch.manual_seed(1)
        out = model(pixel_values=torch.randn(1, 3, 224, 224), input_ids=torch.randint(0, 1000, (1, 32)),
                    attention_mask=torch.ones(1, 32, dtype=torch.long))
        (out.pred_masks.mean() + out.pred_logits.mean()).backward()
        first = next(model.vision_encoder.backbone.layers[0].parameters())
        grads.append(first.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0


def test_checkpoint_round_trip_and_refusals(tmp_path):
    model = build_model("tiny")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = build_model(path=tmp_path / "ckpt")
    assert torch.equal(loaded.state_dict()["mask_decoder.mask_embedder.layers.0.weight"],
                       model.state_dict()["mask_decoder.mask_embedder.layers.0.weight"])
    with pytest.raises(CheckpointError, match="not a directory"):
        check_checkpoint(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="not 'sam3'"):
        check_checkpoint(tmp_path / "other")
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        build_model("huge")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero3_loads_a_checkpoint_partitioned_with_its_weights(tmp_path, monkeypatch, precision):
    """Under ZeRO-3 no rank holds the whole model at any time, and the partitioned model holds the
    checkpoint's weights (transformers loads each module gathered on rank 0)."""
    import deepspeed
    import torch.distributed as dist
    from transformers import Sam3Model

    from medsam3.model import partitioned_construction

    torch.manual_seed(0)
    saved = build_model("tiny")
    saved.save_pretrained(tmp_path / "tiny")
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
                  "bf16": {"enabled": precision == "bf16"}}
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        with partitioned_construction(config):
            model = Sam3Model.from_pretrained(tmp_path / "tiny", local_files_only=True)
        params = dict(model.named_parameters())
        assert all(p.numel() == 0 and hasattr(p, "ds_numel") for p in params.values())  # partitioned at birth
        assert {p.dtype for p in params.values()} == {dtype}
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, weight in saved.named_parameters():
                assert torch.equal(params[name].detach(), weight.detach().to(dtype)), name
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        assert not is_deepspeed_zero3_enabled()  # later builds in the process are ordinary again
    finally:
        dist.destroy_process_group()
