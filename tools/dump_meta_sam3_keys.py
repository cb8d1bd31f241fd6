"""Dump the parameter/buffer names and shapes of Meta's SAM3 models, keyed as in
Meta's released checkpoint ``sam3.pt`` (``detector.*`` / ``tracker.*``).

Output: tests/data/meta_sam3_keys.json.gz (reference data; no weights involved).

The models are built from Meta's own ``sam3`` package (PyPI 0.1.4) with random
init on CPU and *no* checkpoint (``checkpoint_path=None, load_from_HF=False``);
only ``state_dict()`` names/shapes are recorded.

Key mapping (sam3/model_builder.py, sam3==0.1.4):
  * video: ``build_sam3_video_model`` loads the checkpoint with
    ``model.load_state_dict(ckpt, strict=True)`` -> the video model's state_dict
    keys ARE the sam3.pt keys, unchanged.
  * image: ``_load_checkpoint`` keeps keys containing "detector" and applies
    ``k.replace("detector.", "")`` (strict=False); with
    ``enable_inst_interactivity=True`` it also maps ``tracker.`` ->
    ``inst_interactive_predictor.model.``.  We invert that: image key ``k`` ->
    ``"detector." + k`` (and ``inst_interactive_predictor.model.X`` -> ``tracker.X``).

MUST be run in an isolated venv (NOT the project's .venv). How it was made:

    python3 -m venv /tmp/metavenv && P=/tmp/metavenv/bin/pip
    $P install -U pip && $P install torch==2.13.0           # resolves to 2.13.0+cpu here
    $P install --no-deps sam3==0.1.4 torchvision==0.28.0 triton==3.8.0
    $P install "numpy<2.4" pillow timm "iopath<0.2,>=0.1.10" "ftfy<6.4" regex \
        "einops<0.9" "pycocotools<2.1,>=2.0.10" psutil
    # torchvision 0.28.0 on PyPI is CUDA-built; its _C.so cannot load with CPU torch
    # and `import torchvision` dies registering fake kernels for torchvision::nms.
    # Import-only patch in the venv's torchvision/__init__.py: wrap
    # `from torchvision import _autograd_registrations, _meta_registrations`
    # in try/except RuntimeError.  (sam3 imports triton at module level -> triton
    # is installed only to be importable; it is never used on CPU.)
    # The sam3 wheel does not ship its BPE vocab (assets/bpe_simple_vocab_16e6.txt.gz);
    # the identical CLIP file is taken from the open_clip_torch wheel:
    $P download --no-deps open_clip_torch -d /tmp/dl
    unzip -j /tmp/dl/open_clip_torch-*.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/dl

    /tmp/metavenv/bin/python tools/dump_meta_sam3_keys.py --bpe /tmp/dl/bpe_simple_vocab_16e6.txt.gz
"""

import argparse
import gc
import gzip
import importlib.metadata
import json
import math
import os

import torch
from sam3.model_builder import build_sam3_image_model, build_sam3_video_model

INST = "inst_interactive_predictor.model."


class CudaToCpu(torch.overrides.TorchFunctionMode):
    """sam3 0.1.4 hard-codes device="cuda" for two construction-time caches that are
    plain attributes, not state_dict entries (PositionEmbeddingSine.cache,
    TransformerDecoder.compilable_cord_cache).  Redirect such tensor creation to CPU
    so the model can be built on a CPU-only torch; the model code is untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def describe(model, to_ckpt_key):
    """-> ({ckpt_key: shape}, [buffer keys], {key: dtype} if not fp32, [[keys sharing storage]])."""
    sd = model.state_dict()
    buffer_names = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    shapes, buffers, dtypes, by_ptr = {}, [], {}, {}
    for k, v in sd.items():
        ck = to_ckpt_key(k)
        assert ck not in shapes, ck
        shapes[ck] = list(v.shape)
        if k in buffer_names:
            buffers.append(ck)
        if v.dtype != torch.float32:
            dtypes[ck] = str(v.dtype).replace("torch.", "")
        by_ptr.setdefault((v.data_ptr(), v.shape, v.stride()), []).append(ck)
    tied = [g for g in by_ptr.values() if len(g) > 1]
    return shapes, buffers, dtypes, tied


def image_key(k):
    return "tracker." + k[len(INST):] if k.startswith(INST) else "detector." + k


def build(a):
    common = dict(bpe_path=a.bpe, device="cpu", checkpoint_path=None, load_from_HF=False)
    res = {}
    with CudaToCpu():
        for name, fn in [
            ("image", lambda: build_sam3_image_model(enable_inst_interactivity=False, **common)),
            ("image_ii", lambda: build_sam3_image_model(enable_inst_interactivity=True, **common)),
            ("video", lambda: build_sam3_video_model(**common)),
        ]:
            m = fn()
            res[name] = describe(m, (lambda k: k) if name == "video" else image_key)
            del m
            gc.collect()
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe", required=True, help="bpe_simple_vocab_16e6.txt.gz")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "data", "meta_sam3_keys.json.gz"))
    a = ap.parse_args()
    torch.manual_seed(0)
    res = build(a)
    out = {}
    out["source"] = (
        f"sam3=={importlib.metadata.version('sam3')} (PyPI), torch {torch.__version__}; "
        "image: sam3.model_builder.build_sam3_image_model(enable_inst_interactivity=False, "
        "checkpoint_path=None, load_from_HF=False); video: sam3.model_builder.build_sam3_video_model("
        "checkpoint_path=None, load_from_HF=False) [defaults: apply_temporal_disambiguation=True, "
        "has_presence_token=True]; generated by tools/dump_meta_sam3_keys.py"
    )
    out["notes"] = (
        "Keys are state_dict() names mapped to sam3.pt names. video: identity (Meta loads sam3.pt into "
        "the video model with load_state_dict(strict=True), so this key set == sam3.pt key set, modulo "
        "the release actually being strict-loadable). image: 'detector.'+k, inverse of "
        "sam3/model_builder.py::_load_checkpoint (k.replace('detector.','') for keys containing 'detector', "
        "strict=False); with enable_inst_interactivity=True, inst_interactive_predictor.model.X <-> tracker.X "
        "(extra keys listed in image_inst_interactivity_extra). buffers_*: state_dict entries that are "
        "registered (persistent) buffers; tied_*: groups of state_dict keys sharing one tensor "
        "(each is still a separate key in state_dict/sam3.pt); dtypes_*: entries that are not float32 "
        "(fresh-init dtype, the "
        "released file may store other dtypes). Shapes are of a freshly built model; no weights were read. "
        "Facts: the 32 ViT trunk 'attn.freqs_cis' entries are persistent complex64 RoPE buffers "
        "([576,32] windowed blocks, [5184,32] global blocks 7/15/23/31); trunk.pos_embed is [1,577,1024] = "
        "1 class-token position + 24x24 pretrain grid (no separate cls_token parameter); patch_embed has no bias; "
        "the text encoder's attn_mask is a NON-persistent buffer (not in state_dict/sam3.pt); the video tracker "
        "has no vision backbone of its own (build_tracker(with_backbone=False)) and uses the detector's "
        "backbone.vision_backbone.sam2_convs.* neck, which the default image model (enable_inst_interactivity=False) "
        "does not build."
    )
    out["image"], out["buffers_image"], out["dtypes_image"], out["tied_image"] = res["image"]
    out["video"], out["buffers_video"], out["dtypes_video"], out["tied_video"] = res["video"]
    img_ii = res["image_ii"][0]
    for n in ("image", "video"):
        bufs = set(out["buffers_" + n])
        extra_alias = sum(len(g) - 1 for g in out["tied_" + n] if not bufs & set(g))
        out["num_params_" + n] = sum(math.prod(v) for k, v in out[n].items() if k not in bufs)
        out["num_param_aliases_" + n] = extra_alias
    img, vid, vid_det = set(out["image"]), set(out["video"]), {k for k in out["video"] if k.startswith("detector.")}
    out["image_inst_interactivity_extra"] = {k: img_ii[k] for k in sorted(set(img_ii) - img)}
    out["consistency"] = {
        "image_keys_not_in_video": sorted(img - vid),
        "video_detector_keys_not_in_image": sorted(vid_det - img),
        "image_inst_interactivity_keys_not_in_video": sorted(set(img_ii) - vid),
        "video_keys_not_in_image_inst_interactivity": sorted(vid - set(img_ii)),
        "shape_mismatches_image_vs_video": sorted(k for k in img & vid if out["image"][k] != out["video"][k]),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with gzip.open(a.out, "wt") as f:
        json.dump(out, f, indent=0)
    print(f"image {len(out['image'])} keys ({len(out['buffers_image'])} buffers), "
          f"video {len(out['video'])} keys ({len(out['buffers_video'])} buffers) -> {a.out}")
    print(json.dumps(out["consistency"], indent=1)[:4000])


if __name__ == "__main__":
    main()
