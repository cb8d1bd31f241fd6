"""Training data: prepare's shards → case-level train/val split → augmentation → model batches.

The per-row transforms are plain functions over dicts of numpy arrays; Ray Data maps them in
parallel on the cluster and each Ray Train worker streams its shard with ``iter_batches``. The
per-batch step (tokens, instances, box prompts) runs in the worker, where the tokenizer lives.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from medsam3.losses import Target, instances_from_mask
from medsam3.model import tokenize
from medsam3.schema import decode_row
from medsam3.transforms import model_pixels, resize_square

_SIDE = re.compile(r"\b(left|right)\b")


def in_validation(dataset: str, case_id: str, fraction: float, seed: int) -> bool:
    """Whole cases go to validation (never some slices of a case): a seeded hash of the case."""
    digest = hashlib.blake2b(f"{seed}|{dataset}|{case_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


def swap_sides(prompt: str) -> str:
    """"left kidney" ↔ "right kidney": a horizontal flip changes which side a structure is on."""
    return _SIDE.sub(lambda m: "right" if m.group(1) == "left" else "left", prompt)


def train_transform(row: dict[str, Any], size: int, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Random resized crop, horizontal flip (with the prompt's sides swapped), intensity jitter."""
    row = decode_row(row)
    rng = np.random.default_rng()
    image, mask = row["image"], row["mask"]
    side = image.shape[0]
    for _ in range(10):  # torchvision-style: a few tries for a crop that fits
        area = rng.uniform(*cfg["crop_scale"]) * side * side
        ratio = np.exp(rng.uniform(*np.log(cfg["crop_ratio"])))
        w, h = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 0 < w <= side and 0 < h <= side:
            x0, y0 = rng.integers(0, side - w + 1), rng.integers(0, side - h + 1)
            image, mask = image[y0:y0 + h, x0:x0 + w], mask[y0:y0 + h, x0:x0 + w]
            break
    image = resize_square(np.ascontiguousarray(image), size)
    mask = resize_square(np.ascontiguousarray(mask), size, nearest=True)
    prompt = row["prompt"]
    if rng.random() < cfg["flip_prob"]:
        image, mask, prompt = image[:, ::-1], mask[:, ::-1], swap_sides(prompt)
    jitter = cfg["intensity_jitter"]
    if jitter > 0:
        gain, shift = 1 + rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter) * 255
        image = np.clip(image.astype(np.float32) * gain + shift, 0, 255)
    return _model_row(row, image, mask, prompt)


def eval_transform(row: dict[str, Any], size: int) -> dict[str, Any]:
    """No augmentation: the stored square resized to the model's input."""
    row = decode_row(row)
    image, mask = resize_square(row["image"], size), resize_square(row["mask"], size, nearest=True)
    return _model_row(row, image, mask, row["prompt"])


def _model_row(row, image, mask, prompt) -> dict[str, Any]:
    pixels = model_pixels(image, image.shape[0])  # already at the model's size (jitter makes it float)
    return {"pixel_values": pixels, "mask": np.ascontiguousarray(mask, dtype=np.uint8), "prompt": prompt,
            "case_id": row["case_id"], "slice_index": row["slice_index"], "dataset": row["dataset"]}


def collate(batch: Mapping[str, np.ndarray], tokenizer, rng: np.random.Generator,
            box_prob: float = 0.0, box_noise: float = 0.1, box_noise_max_px: float = 20.0,
            max_instances: int | None = None):
    """A numpy batch → model inputs and loss targets (at most ``max_instances`` per sample, the largest).

    With probability ``box_prob`` a sample also gets a box prompt: one of its instances' boxes,
    jittered by N(0, box_noise × size) capped at ``box_noise_max_px`` pixels, as cxcywh in [0, 1].
    """
    pixels = torch.from_numpy(np.stack(batch["pixel_values"]))
    size = pixels.shape[-1]
    tokens = tokenize(tokenizer, [str(p) for p in batch["prompt"]])
    targets: list[Target] = [instances_from_mask(m, max_instances=max_instances) for m in batch["mask"]]
    inputs = {"pixel_values": pixels, "input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
    if box_prob > 0:
        boxes = torch.zeros(len(targets), 1, 4)
        labels = torch.full((len(targets), 1), -10, dtype=torch.long)  # -10: no box (SAM3's padding)
        for i, target in enumerate(targets):
            if target.num and rng.random() < box_prob:
                x0, y0, x1, y1 = target.boxes[rng.integers(target.num)].tolist()
                w, h = x1 - x0, y1 - y0
                cap = box_noise_max_px / size
                noise = np.clip(rng.normal(0, box_noise, 4) * [w, h, w, h], -cap, cap)
                x0, y0, x1, y1 = np.clip([x0, y0, x1, y1] + noise, 0, 1)
                width, height = max(x1 - x0, 1 / size), max(y1 - y0, 1 / size)
                boxes[i, 0] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, width, height])
                labels[i, 0] = 1
        # Always passed, padding included: under ZeRO-3 every rank must run the same modules in
        # the same order (parameters are gathered collectively), box or no box.
        inputs |= {"input_boxes": boxes, "input_boxes_labels": labels}
    return inputs, targets
