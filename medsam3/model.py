"""SAM3 from Hugging Face transformers: presets, local checkpoints and the CLIP tokenizer.

Nothing here re-implements the network: a preset is a set of ``Sam3Config`` arguments in
``configs/model/<name>.yaml``; a checkpoint is a local directory for ``from_pretrained``. Nothing
is ever downloaded.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, Sam3Config, Sam3Model, Sam3VideoModel

from medsam3.config import CONFIG_DIR
from medsam3.io import storage

if TYPE_CHECKING:
    import torch

# CLIP's vocabulary: 256 byte symbols, the same with </w>, the first merges, then two specials.
CLIP_VOCAB_SIZE = 49408
CLIP_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
TEXT_LENGTH = 32  # SAM3's text encoder has 32 positions


class CheckpointError(ValueError):
    """A model directory is missing or is not a SAM3 checkpoint."""


def preset(name: str) -> dict[str, Any]:
    """A model preset (``configs/model/<name>.yaml``): ``{"image_size": int, "config": {...}}``."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(known)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def build_model(preset_name: str | None = None, path: str | os.PathLike | None = None) -> Sam3Model:
    """A SAM3 model (the detector of a video checkpoint) from a local checkpoint directory, or
    with random weights from a preset."""
    if path is not None:
        return load_detector(path)
    spec = preset(preset_name or "tiny")
    return Sam3Model(Sam3Config(**spec["config"]))


@contextlib.contextmanager
def partitioned_construction(deepspeed_config: dict[str, Any] | None) -> Iterator[None]:
    """Models loaded inside (``from_pretrained``) are born partitioned over the ranks when
    ``deepspeed_config`` is ZeRO-3: transformers then builds them under ``deepspeed.zero.Init``
    and loads each module's weights gathered on rank 0, and no rank ever holds the whole model
    (the full-size model in fp32 is 3.4 GB per rank). ``None``: an ordinary load."""
    if deepspeed_config is None or deepspeed_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    held = HfDeepSpeedConfig(deepspeed_config)  # transformers keeps only a weak reference to it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del held


def model_image_size(model: Sam3Model) -> int:
    """The square input side the model's vision backbone expects."""
    return int(model.config.vision_config.backbone_config.image_size)


def check_checkpoint(path: str | os.PathLike) -> Path:
    """The local directory of a SAM3 checkpoint (an ``s3://`` one is fetched into the cache);
    a directory that is not one is refused with the reason."""
    try:
        folder = storage.local_copy(path)
    except (OSError, FileNotFoundError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    config = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a directory")
    if not config.is_file():
        raise CheckpointError(f"{folder}: no config.json; not a Hugging Face model directory")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in ("sam3", "sam3_video"):
        raise CheckpointError(f"{folder}: config.json has model_type {model_type!r}, not 'sam3' or 'sam3_video'")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: no weights (*.safetensors)")
    return folder


def checkpoint_type(path: str | os.PathLike) -> str:
    """``sam3`` (image model) or ``sam3_video`` (detector + tracker) for a checkpoint folder."""
    return json.loads((check_checkpoint(path) / "config.json").read_text())["model_type"]


def load_detector(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Sam3Model:
    """The detector (``Sam3Model``) of an image or a video checkpoint."""
    folder = check_checkpoint(path)
    if checkpoint_type(folder) == "sam3_video":
        return Sam3VideoModel.from_pretrained(os.fspath(folder), local_files_only=True, dtype=dtype).detector_model
    return Sam3Model.from_pretrained(os.fspath(folder), local_files_only=True, dtype=dtype)


def parse_checkpoints(specs: list[str] | tuple[str, ...], first_name: str | None = None,
                      what: str = "checkpoint") -> dict[str, str]:
    """``DIR`` or ``NAME=DIR`` → {name: absolute folder or s3:// URI}, in the given order. A name
    defaults to the folder's name (the first one's to ``first_name`` when given); ValueError for
    none or two with one name (``what``: the option's name, for the message)."""
    found: dict[str, str] = {}
    for spec in specs:
        name, folder = storage.split_name(spec)
        path = folder if storage.is_remote(folder) else str(Path(folder).absolute())
        name = name or (first_name if first_name and not found else storage.name(path))
        if name in found:
            raise ValueError(f"two {what}s named {name!r}: use NAME=DIR to tell them apart")
        found[name] = path
    if not found:
        raise ValueError(f"give at least one --{what}")
    return found


def write_clip_tokenizer_files(bpe_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Derive CLIP's ``vocab.json`` and ``merges.txt`` from the original BPE merges file
    (``bpe_simple_vocab_16e6.txt.gz``), the way CLIP builds its vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe_path = storage.local_copy(bpe_path)  # may be an s3:// URI
    opener = gzip.open if str(bpe_path).endswith(".gz") else open
    with opener(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_NUM_MERGES + 1]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: not a CLIP BPE merges file ({len(merges)} merges read)")
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return out


def build_word_tokenizer(prompts: list[str]) -> PreTrainedTokenizerFast:
    """A small word-level tokenizer over the words of the prompt vocabulary, for the ``tiny``
    preset when no BPE file is given. Same special tokens and length as SAM3's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for p in prompts for w in p.lower().split()})
    specials = ["<|startoftext|>", "<|endoftext|>", "<|unk|>"]
    vocab = {token: i for i, token in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[(s, vocab[s]) for s in specials[:2]]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1], unk_token=specials[2], model_max_length=TEXT_LENGTH)


def build_tokenizer(path: str | os.PathLike | None = None, bpe_path: str | os.PathLike | None = None,
                    prompts: list[str] | None = None, work_dir: str | os.PathLike | None = None):
    """SAM3's tokenizer: from a checkpoint directory, else CLIP BPE from a merges file, else a
    word-level tokenizer over ``prompts`` (tiny models only)."""
    if path is not None:
        local = storage.local_copy(path)  # an s3:// checkpoint is fetched into the cache
        if (local / "tokenizer_config.json").is_file():
            return CLIPTokenizer.from_pretrained(os.fspath(local), local_files_only=True)
    if bpe_path is not None:
        if work_dir is None:
            raise ValueError("work_dir is needed to derive the CLIP tokenizer files")
        folder = write_clip_tokenizer_files(bpe_path, Path(work_dir) / "clip-tokenizer")
        return CLIPTokenizer.from_pretrained(os.fspath(folder), model_max_length=TEXT_LENGTH)
    if prompts:
        return build_word_tokenizer(prompts)
    raise ValueError("no tokenizer: give a checkpoint with tokenizer files, model.bpe_path, or prompts")


def tokenize(tokenizer, prompts: list[str]) -> dict[str, Any]:
    """Token ids and attention mask for SAM3's 32-position text encoder (torch tensors)."""
    return tokenizer(prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt")


def enable_activation_checkpointing(model: Sam3Model) -> None:
    """Recompute the vision backbone's transformer layers during backward instead of keeping
    their activations (SAM3 in transformers has no built-in switch for it)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    for layer in model.vision_encoder.backbone.layers:
        forward = layer.forward

        def recomputed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = recomputed


NO_BOX = -10  # SAM3's label for a padded (absent) box prompt


def box_prompts(boxes, side: int):
    """SAM3's geometric prompt tensors for one box (or none) per sample, shared by training and
    inference so both encode a box identically.

    ``boxes``: (N, 4) xyxy in pixels of a ``side``² square, a row of NaN meaning no box. Returns
    ``input_boxes`` (N, 1, 4) as cxcywh in [0, 1] (clipped to the image, at least one pixel wide)
    and ``input_boxes_labels`` (N, 1): 1 for a box, ``NO_BOX`` for padding.
    """
    import numpy as np
    import torch

    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    given = np.isfinite(boxes).all(axis=1)
    x0, y0, x1, y1 = np.clip(np.nan_to_num(boxes) / side, 0, 1).T
    cxcywh = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, np.maximum(x1 - x0, 1 / side),
                       np.maximum(y1 - y0, 1 / side)], axis=1)
    cxcywh[~given] = 0
    labels = np.where(given, 1, NO_BOX)
    return torch.from_numpy(cxcywh).float()[:, None], torch.from_numpy(labels).long()[:, None]


def take_batch(output, index):
    """Index the batch dimension of every tensor in a transformers ModelOutput (tuples included)."""
    import torch

    def pick(value):
        if isinstance(value, torch.Tensor):
            return value[index]
        if isinstance(value, tuple | list):
            return type(value)(pick(v) for v in value)
        return value

    return type(output)(**{key: pick(value) for key, value in output.items()})
