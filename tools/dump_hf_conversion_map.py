"""Record what transformers' own SAM3 conversion scripts make of every Meta SAM3 checkpoint key.

Output: tests/data/hf_sam3_conversion_map.json.gz (reference data for tests/test_import.py; no
weights involved). For every key of tests/data/meta_sam3_keys.json.gz ("image" and "video"), the
transformers tensors the scripts produce from it: ``[name, op, index, shape]`` with ``op``

  * ``copy``: the source tensor unchanged (two ``copy`` targets: one tensor stored under two names),
  * ``chunk``: part ``index`` of ``torch.chunk(source, 3, dim=0)`` (fused q/k/v),
  * ``drop_first``: ``source[:, 1:]``,
  * ``transpose``: ``source.T``,
  * ``row``: the source is concatenated along dim 0 with others, starting at row ``index``,

and ``shape`` the target's shape for the source's full-size shape.

The scripts are not in transformers' wheel; download them from huggingface/transformers:

    mkdir -p /tmp/hfscripts && cd /tmp/hfscripts
    curl -LO https://raw.githubusercontent.com/huggingface/transformers/0d7e95d96b4e187c651e2b2406ed98ed40d74963/src/transformers/models/sam3/convert_sam3_to_hf.py
    curl -LO https://raw.githubusercontent.com/huggingface/transformers/0d511f8eddf5dd0f340908eac05badfbf4cbc962/src/transformers/models/sam3_video/convert_sam3_video_to_hf.py
    .venv/bin/python tools/dump_hf_conversion_map.py --scripts /tmp/hfscripts

(git blob ids af1786c94c7bacf459432dc9e59b4139459578e1 and 68d08c5fe223fca60b34da9a496257e660e7961a;
other versions are accepted and recorded by blob id, without a commit.)

How: each script is imported by path and its own ``convert_sam3_checkpoint`` runs unchanged, with
two names in its module replaced: ``load_original_state_dict`` returns stand-in tensors for the
Meta keys, and the model class (``Sam3Model`` / ``Sam3VideoModel``) is a stand-in whose
``load_state_dict`` keeps the converted state dict and stops the run (nothing is saved, no model
or tokenizer is built or downloaded; the config is written to a temporary folder). So the renaming
rules, the q/k/v split, the position-table row drop, the transpose, the point-embedding
concatenation and the shared positional-table copy are all the scripts' own code. Run twice:

  1. small tensors whose values encode (source key, element): every output element says where it
     came from, which gives each target's source(s) and ``op``;
  2. meta-device tensors of the full-size shapes: each target's ``shape``.

Inputs: the image script gets the detector keys without ``detector.`` (its rules are anchored at
``backbone.``, ``transformer.``, ... after an optional ``sam3_model.``; Meta's own image loader
drops ``detector.`` the same way); the video script gets ``detector.X`` as ``sam3_model.X`` and
``tracker.X`` as ``sam2_predictor.model.X``, the prefixes its rules and ``replace_keys`` expect.

Stub: the video script imports ``transformers.models.sam3.image_processing_sam3``, which needs
torchvision; where that import fails, the module is replaced by one holding transformers' own
top-level ``Sam3ImageProcessor`` placeholder (used by the script only when saving a processor,
which this run never reaches). The output's "source" field says whether that happened.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import importlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {  # kind: (file, path in huggingface/transformers, commit, git blob id of that version)
    "image": ("convert_sam3_to_hf.py", "src/transformers/models/sam3/convert_sam3_to_hf.py",
              "0d7e95d96b4e187c651e2b2406ed98ed40d74963", "af1786c94c7bacf459432dc9e59b4139459578e1"),
    "video": ("convert_sam3_video_to_hf.py", "src/transformers/models/sam3_video/convert_sam3_video_to_hf.py",
              "0d511f8eddf5dd0f340908eac05badfbf4cbc962", "68d08c5fe223fca60b34da9a496257e660e7961a"),
}
MODEL_CLASS = {"image": "Sam3Model", "video": "Sam3VideoModel"}
TAG = 2 ** 20  # value = source number * TAG + element number (exact in float64)


class _Captured(Exception):
    """Raised by the stand-in model once it has the converted state dict."""


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stub_image_processing() -> str | None:
    """Make ``transformers.models.sam3.image_processing_sam3`` importable without torchvision."""
    name = "transformers.models.sam3.image_processing_sam3"
    try:
        importlib.import_module(name)
        return None
    except ModuleNotFoundError as exc:
        import transformers

        stub = types.ModuleType(name)
        stub.Sam3ImageProcessor = transformers.Sam3ImageProcessor
        sys.modules[name] = stub
        return f"{name} replaced by a stub holding transformers.Sam3ImageProcessor ({exc})"


def load_script(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"hf_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from transformers.utils import logging

    logging.set_verbosity_error()  # the script turns on info logging at import
    return module


def convert(module: types.ModuleType, kind: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict the script's ``convert_sam3_checkpoint`` hands to its model."""
    captured: dict[str, torch.Tensor] = {}

    class StandInModel:
        def __init__(self, config):
            pass

        def load_state_dict(self, state_dict, strict=True):
            captured.update(state_dict)
            raise _Captured

    saved = module.load_original_state_dict, getattr(module, MODEL_CLASS[kind])
    module.load_original_state_dict = lambda checkpoint_path: dict(state)
    setattr(module, MODEL_CLASS[kind], StandInModel)
    try:
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            module.convert_sam3_checkpoint(checkpoint_path="stand-in tensors", output_path=out)
    except _Captured:
        pass
    finally:
        module.load_original_state_dict, _ = saved
        setattr(module, MODEL_CLASS[kind], saved[1])
    if not captured:
        raise RuntimeError(f"{kind}: the script's conversion never reached {MODEL_CLASS[kind]}.load_state_dict")
    return captured


def small(shape: list[int]) -> list[int]:
    """A small shape of the same rank; dims divisible by 3 stay so (fused q/k/v)."""
    return [d if d <= 6 else (6 if d % 3 == 0 else 4) for d in shape]


def describe(out: torch.Tensor, sources: list[torch.Tensor]) -> list[tuple[int, str, int]]:
    """(source number, op, index) for one output tensor of the tagged run."""
    numbers = sorted({int(n) for n in (out // TAG).unique()})
    if len(numbers) == 1:
        (n,) = numbers
        src = sources[n]
        if out.shape == src.shape and torch.equal(out, src):
            return [(n, "copy", 0)]
        for i, part in enumerate(torch.chunk(src, 3, dim=0)):
            if out.shape == part.shape and torch.equal(out, part):
                return [(n, "chunk", i)]
        if src.dim() == 3 and out.shape == src[:, 1:].shape and torch.equal(out, src[:, 1:]):
            return [(n, "drop_first", 0)]
        if src.dim() == 2 and out.shape == src.T.shape and torch.equal(out, src.T):
            return [(n, "transpose", 0)]
    else:  # concatenation along dim 0 of whole sources
        order = sorted(numbers, key=lambda m: int((out == sources[m].flatten()[0]).nonzero()[0, 0]))
        if torch.equal(out, torch.cat([sources[m] for m in order], dim=0)):
            starts, row = [], 0
            for m in order:
                starts.append((m, "row", row))
                row += sources[m].shape[0]
            return starts
    return [(n, f"other {tuple(out.shape)}", 0) for n in numbers]


def script_keys(kind: str, meta_keys: list[str]) -> dict[str, str]:
    """Meta key -> the key as the script expects it."""
    if kind == "image":
        return {k: k.removeprefix("detector.") for k in meta_keys}
    prefixes = {"detector": "sam3_model.", "tracker": "sam2_predictor.model."}
    return {k: prefixes[k.partition(".")[0]] + k.partition(".")[2] for k in meta_keys}


def mapping(module: types.ModuleType, kind: str, shapes: dict[str, list[int]]) -> dict[str, list]:
    meta_keys = list(shapes)
    fed = script_keys(kind, meta_keys)
    tagged = [(torch.arange(torch.Size(small(shapes[k])).numel(), dtype=torch.float64) + n * TAG)
              .reshape(small(shapes[k])) for n, k in enumerate(meta_keys)]
    values = convert(module, kind, {fed[k]: t for k, t in zip(meta_keys, tagged, strict=True)})
    full = convert(module, kind, {fed[k]: torch.empty(shapes[k], device="meta") for k in meta_keys})
    if set(values) != set(full):
        raise RuntimeError(f"{kind}: the two runs made different names")
    result: dict[str, list] = {k: [] for k in meta_keys}
    for name, out in values.items():
        for n, op, index in describe(out, tagged):
            result[meta_keys[n]].append([name, op, index, list(full[name].shape)])
    for targets in result.values():
        targets.sort()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scripts", required=True, type=Path, help="folder holding the two upstream scripts")
    ap.add_argument("--keys", type=Path, default=ROOT / "tests" / "data" / "meta_sam3_keys.json.gz")
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "hf_sam3_conversion_map.json.gz")
    a = ap.parse_args()
    with gzip.open(a.keys) as f:
        meta = json.load(f)
    import transformers

    stub = stub_image_processing()
    out: dict = {}
    versions = []
    for kind, (file, repo_path, commit, blob) in SCRIPTS.items():
        path = a.scripts / file
        found = git_blob_id(path.read_bytes())
        where = f"huggingface/transformers {repo_path} @ {commit}" if found == blob else \
            f"huggingface/transformers {repo_path}, version with git blob {found} (commit not recorded here)"
        if found != blob:
            print(f"warning: {path} is not the version at {commit} (blob {found} != {blob})", file=sys.stderr)
        versions.append(f"{kind}: {where} (git blob {found})")
        out[kind] = mapping(load_script(path), kind, meta[kind])
    out["source"] = (
        "transformers' own SAM3 conversion code, run unchanged: " + "; ".join(versions) + ". "
        f"Each script's convert_sam3_checkpoint with stand-in tensors for the keys of meta_sam3_keys.json.gz "
        "(load_original_state_dict and the model class replaced in its module, the converted state dict taken "
        "at load_state_dict); ops read from tagged tensor values, shapes from a full-size meta-device run. "
        "Inputs: image 'detector.X' fed as 'X'; video 'detector.X' as 'sam3_model.X', 'tracker.X' as "
        f"'sam2_predictor.model.X'. transformers {transformers.__version__}, torch {torch.__version__}. "
        + (f"Stub: {stub}. " if stub else "")
        + "Generated by tools/dump_hf_conversion_map.py."
    )
    out["format"] = ("image/video: Meta key -> [[transformers name, op, index, shape], ...]; op: copy | chunk "
                     "(index: part of 3 along dim 0) | drop_first (source[:, 1:]) | transpose | row (concatenated "
                     "along dim 0 from row index); two copy targets: one tensor under two names")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(a.out, "wb", mtime=0) as f:
        f.write(json.dumps(out, sort_keys=True, separators=(",", ":")).encode())
    ops = {kind: sorted({t[1] for ts in out[kind].values() for t in ts}) for kind in SCRIPTS}
    print(f"image {len(out['image'])} keys, video {len(out['video'])} keys; ops {ops} -> "
          f"{os.path.relpath(a.out)} ({a.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
