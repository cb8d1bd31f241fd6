"""Training data: prepare's shards → case-level train/val split → augmentation → model batches.

Ray Data reads, splits and shuffles the rows; each Ray Train worker augments the batches it
streams. The augmentation runs there, not in a Ray Data ``map``, because its random draw is a
function of (seed, epoch, sample), and a ``map`` cannot know which epoch is reading it. The
per-batch step (tokens, instances, box prompts) also runs in the worker, where the tokenizer lives.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsam3.losses import Target, TargetRule
from medsam3.model import box_prompts, tokenize
from medsam3.schema import decode_row
from medsam3.transforms import model_pixels, resize_square

_SIDE = re.compile(r"\b(left|right)\b")


def case_draw(dataset: str, case_id: str, seed: int) -> float:
    """A case's seeded draw in [0, 1): a hash, the same in every run and on every machine."""
    digest = hashlib.blake2b(f"{seed}|{dataset}|{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def in_validation(dataset: str, case_id: str, fraction: float, seed: int) -> bool:
    """Whole cases go to validation (never some slices of a case): a seeded hash of the case."""
    return case_draw(dataset, case_id, seed) < fraction


def swap_sides(prompt: str) -> str:
    """"left kidney" ↔ "right kidney": a horizontal flip changes which side a structure is on."""
    return _SIDE.sub(lambda m: "right" if m.group(1) == "left" else "left", prompt)


@dataclass(frozen=True)
class Augmentation:
    """The random transforms of a training sample (``train.*`` keys of the same names)."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    flip_prob: float = 0.0
    intensity_jitter: float = 0.0

    @classmethod
    def from_config(cls, train: Mapping[str, Any]) -> Augmentation:
        scale, ratio = tuple(float(v) for v in train["crop_scale"]), tuple(float(v) for v in train["crop_ratio"])
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"train.crop_scale={list(scale)}: expected [low, high] with 0 < low <= high <= 1")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"train.crop_ratio={list(ratio)}: expected [low, high] with 0 < low <= high")
        return cls(scale, ratio, float(train["flip_prob"]), float(train["intensity_jitter"]))


def sample_rng(seed: int, epoch: int, row: Mapping[str, Any]) -> np.random.Generator:
    """The random stream of one sample in one epoch, from its identity: the same draw whichever
    worker gets the row and in whatever order (a resumed or re-split run augments identically)."""
    identity = f"{row['dataset']}|{row['case_id']}|{row['slice_index']}|{row['prompt']}"
    key = int.from_bytes(hashlib.blake2b(identity.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, key])


def train_transform(row: dict[str, Any], size: int, augment: Augmentation,
                    rng: np.random.Generator) -> dict[str, Any]:
    """Random resized crop, horizontal flip (with the prompt's sides swapped), intensity jitter,
    drawn once from ``rng`` for the image and its mask (MONAI's seeded dictionary transforms)."""
    row = decode_row(row)
    image, mask = row["image"], row["mask"]
    side = image.shape[0]
    for _ in range(10):  # torchvision-style: a few tries for a crop that fits
        area = rng.uniform(*augment.crop_scale) * side * side
        ratio = np.exp(rng.uniform(*np.log(augment.crop_ratio)))
        w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < w <= side and 0 < h <= side:
            x0, y0 = rng.integers(0, side - w + 1), rng.integers(0, side - h + 1)
            image, mask = image[y0:y0 + h, x0:x0 + w], mask[y0:y0 + h, x0:x0 + w]
            break
    image = resize_square(np.ascontiguousarray(image), size)
    mask = resize_square(np.ascontiguousarray(mask), size, nearest=True)
    prompt = row["prompt"]
    if rng.random() < augment.flip_prob:
        image, mask, prompt = image[:, ::-1], mask[:, ::-1], swap_sides(prompt)
    jitter = augment.intensity_jitter
    if jitter > 0:
        gain, shift = 1 + rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter) * 255
        image = np.clip(image.astype(np.float32) * gain + shift, 0, 255)
    return _model_row(row, image, mask, prompt)


def augment_batch(batch: Mapping[str, np.ndarray], size: int, augment: Augmentation, seed: int,
                  epoch: int) -> tuple[dict[str, np.ndarray], list[np.random.Generator]]:
    """A batch of shard rows (as Ray Data hands them) → augmented model rows, and each sample's
    random stream (its box prompt is drawn from the same stream, after the augmentation)."""
    rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["prompt"]))]
    rngs = [sample_rng(seed, epoch, row) for row in rows]
    out = [train_transform(row, size, augment, rng) for row, rng in zip(rows, rngs, strict=True)]
    return stack_rows(out), rngs


def stack_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Model rows → a numpy batch (arrays stacked, strings and ids as object arrays)."""
    return {k: np.stack([r[k] for r in rows]) if isinstance(rows[0][k], np.ndarray)
            else np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def eval_transform(row: dict[str, Any], size: int) -> dict[str, Any]:
    """No augmentation: the stored square resized to the model's input."""
    row = decode_row(row)
    image, mask = resize_square(row["image"], size), resize_square(row["mask"], size, nearest=True)
    return _model_row(row, image, mask, row["prompt"])


def _model_row(row, image, mask, prompt) -> dict[str, Any]:
    pixels = model_pixels(image, image.shape[0])  # already at the model's size (jitter makes it float)
    return {"pixel_values": pixels, "mask": np.ascontiguousarray(mask, dtype=np.uint8), "prompt": prompt,
            "case_id": row["case_id"], "slice_index": row["slice_index"], "dataset": row["dataset"]}


def collate(batch: Mapping[str, np.ndarray], tokenizer, rngs: Sequence[np.random.Generator] = (),
            box_prob: float = 0.0, box_noise: float = 0.1, box_noise_max_px: float = 20.0,
            targets_from: TargetRule | None = None):
    """A numpy batch → model inputs and loss targets (``targets_from``: union, or components).

    With probability ``box_prob`` sample i also gets a box prompt, drawn from ``rngs[i]``: one of
    its instances' boxes, jittered by N(0, box_noise × size) capped at ``box_noise_max_px`` pixels.
    """
    pixels = torch.from_numpy(np.stack(batch["pixel_values"]))
    size = pixels.shape[-1]
    tokens = tokenize(tokenizer, [str(p) for p in batch["prompt"]])
    targets_from = targets_from or TargetRule()
    targets: list[Target] = [targets_from(m) for m in batch["mask"]]
    inputs = {"pixel_values": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    if box_prob > 0:
        boxes = np.full((len(targets), 4), np.nan)
        for i, (target, rng) in enumerate(zip(targets, rngs, strict=True)):
            if target.num and rng.random() < box_prob:
                x0, y0, x1, y1 = target.boxes[rng.integers(target.num)].tolist()
                w, h = x1 - x0, y1 - y0
                cap = box_noise_max_px / size
                noise = np.clip(rng.normal(0, box_noise, 4) * [w, h, w, h], -cap, cap)
                boxes[i] = np.clip([x0, y0, x1, y1] + noise, 0, 1) * size
        # Always passed, padding included: under ZeRO-3 every rank must run the same modules in
        # the same order (parameters are gathered collectively), box or no box.
        inputs["input_boxes"], inputs["input_boxes_labels"] = box_prompts(boxes, size)
    return inputs, targets
