"""Clips for ``train.mode=clips``: shard rows of one (dataset, case, prompt) → runs of K
consecutive slices, each one training sample for the detector (every frame) and the tracker.

The rows are grouped by (dataset, case_id, prompt) (:func:`clip_dataset`) and :func:`make_clips` cuts each group:
the stored slices sorted, split where the slice index jumps (``prepare`` may sample slices
out), each run cut into windows of ``length`` (the last one ending at the run's end). A window
shorter than ``length`` (a short run, or a 2D image: a single-frame clip) is padded with copies
of its last frame that the loss ignores, so every clip has the same length (ZeRO-3 needs every
rank to run the same modules). One augmentation is drawn per clip and applied to each frame.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.train_data import Augmentation, collate, sample_rng, stack_rows, train_transform

if TYPE_CHECKING:
    import ray

    from medsam3.losses import TargetRule

CLIP_KEYS = ("dataset", "case_id", "prompt")


def clip_windows(slice_indices: np.ndarray, length: int) -> list[np.ndarray]:
    """Positions (into ``slice_indices``) of each clip, in slice order: runs of consecutive
    slices cut into windows of ``length``; a 2D image (index -1) is a clip of its own."""
    order = np.argsort(slice_indices, kind="stable")
    ordered = np.asarray(slice_indices)[order]
    if len(ordered) and ordered[0] < 0:  # 2D images: one frame each
        return [order[i:i + 1] for i in range(len(order))]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    windows = []
    for run in np.split(order, breaks):
        starts = list(range(0, max(len(run) - length, 0) + 1, length))
        if starts[-1] + length < len(run):
            starts.append(len(run) - length)
        windows += [run[s:s + length] for s in starts]
    return windows


def make_clips(group: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """One group's rows (a Ray Data numpy batch) → clip rows: ``image`` and ``mask`` hold the
    ``length`` frames' bytes one after the other, ``frames`` how many are real."""
    clips = []
    for window in clip_windows(group["slice_index"], length):
        padded = list(window) + [window[-1]] * (length - len(window))
        clips.append({"image": b"".join(bytes(group["image"][i]) for i in padded),
                      "mask": b"".join(bytes(group["mask"][i]) for i in padded),
                      "frames": len(window), "slice_index": int(group["slice_index"][window[0]]),
                      **{key: group[key][window[0]] for key in CLIP_KEYS}})
    return {key: np.array([c[key] for c in clips], dtype=object if key in ("image", "mask", *CLIP_KEYS)
                          else np.int64) for key in clips[0]} if clips else {}


def clip_dataset(rows: ray.data.Dataset, length: int, in_driver: bool) -> ray.data.Dataset:
    """One row per clip of ``rows`` (shard rows); shards small enough to be held in memory are
    grouped in the driver (``in_driver``, :func:`medsam3.ray_local.driver_groups`)."""
    import ray

    from medsam3.ray_local import driver_groups, group_arrays, map_groups

    if not in_driver:
        return map_groups(rows, list(CLIP_KEYS), make_clips, False, fn_kwargs={"length": length})
    clips = []
    for part in driver_groups(rows.select_columns([*CLIP_KEYS, "slice_index", "image", "mask"]), list(CLIP_KEYS)):
        cut = make_clips(group_arrays(part), length)
        clips += [{key: values[i] for key, values in cut.items()} for i in range(len(cut.get("frames", [])))]
    return ray.data.from_items(clips)


def count_clips(slices: Mapping[tuple[str, str, str], list[int]], length: int) -> int:
    """Clips of every (dataset, case, prompt) → slice indices mapping (the driver's count)."""
    return sum(len(clip_windows(np.array(indices), length)) for indices in slices.values())


def clip_frames(row: Mapping[str, Any], length: int) -> list[dict[str, Any]]:
    """A clip row → ``length`` shard-like rows (one per frame; padding repeats the last slice)."""
    image, mask = bytes(row["image"]), bytes(row["mask"])
    step_i, step_m = len(image) // length, len(mask) // length
    base = {k: v for k, v in row.items() if k not in ("image", "mask", "frames")}
    return [{**base, "slice_index": int(row["slice_index"]) + min(f, int(row["frames"]) - 1),
             "image": image[f * step_i:(f + 1) * step_i], "mask": mask[f * step_m:(f + 1) * step_m],
             "box": [0, 0, 0, 0], "spacing": [1, 1, 1], "orig_size": [0, 0]} for f in range(length)]


def augment_clips(batch: Mapping[str, np.ndarray], size: int, augment: Augmentation, seed: int, epoch: int,
                  length: int):
    """A batch of clip rows → augmented frames (B·K model rows, clip by clip), each frame's own
    random stream (for its detector box prompt), each clip's stream (for its tracker seed box)
    and the valid-frame mask (B, K). Every frame of a clip gets the same crop, flip and jitter."""
    rows, frame_rngs, clip_rngs, valid = [], [], [], []
    for c in range(len(batch["prompt"])):
        clip = {k: v[c] for k, v in batch.items()}
        rng = sample_rng(seed, epoch, clip)
        clip_rngs.append(rng.spawn(1)[0])  # the seed box's stream, apart from the augmentation's
        frames = clip_frames(clip, length)
        rows += [train_transform(frame, size, augment, copy.deepcopy(rng)) for frame in frames]
        frame_rngs += [sample_rng(seed, epoch, frame) for frame in frames]
        valid.append(np.arange(length) < int(clip["frames"]))
    return stack_rows(rows), frame_rngs, clip_rngs, np.stack(valid)


def seed_box(mask: np.ndarray, rng: np.random.Generator, noise: float, max_px: float) -> np.ndarray:
    """The mask's bounding box (xyxy pixels, exclusive end) jittered like the detector's box prompts."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    w, h = x1 - x0, y1 - y0
    jitter = np.clip(rng.normal(0, noise, 4) * [w, h, w, h], -max_px, max_px)
    return np.clip(np.array([x0, y0, x1, y1], np.float64) + jitter, 0, mask.shape[0])


SEED_KINDS = ("detector", "mask", "box", "clicks")  # codes 0-3 in the model's seed_kinds


def step_seed_kind(weights: Mapping[str, float], seed: int, step: int) -> str:
    """How the tracker is seeded at optimizer step ``step`` (``train.clip_seed``: a weight per kind).
    One kind per step, the same on every rank: the kinds run different prompt-encoder modules, and
    ZeRO-3 reduces each parameter's gradient across ranks, so every rank must use the same ones."""
    kinds = [k for k in SEED_KINDS if weights.get(k, 0) > 0]
    p = np.array([weights[k] for k in kinds], float)
    return kinds[np.random.default_rng([seed, step, 7]).choice(len(kinds), p=p / p.sum())]


def collate_clips(rows: Mapping[str, np.ndarray], tokenizer, frame_rngs, clip_rngs, valid: np.ndarray,
                  box_prob: float, box_noise: float, box_noise_max_px: float, targets_from: TargetRule,
                  seed_kind: str = "box", corrections: Mapping[str, float] | None = None):
    """Model inputs (the detector's, plus each clip's tracker seed: its frame, kind and prompt), the
    detector's targets per frame, and the tracker's targets: masks (B, K, S, S) and valid frames (B, K).

    The seed frame is a slice that shows the structure, drawn per clip (both directions train);
    ``seed_kind``: the detector's top mask there (as Medical SAM3 seeds), the ground-truth mask,
    its noisy box, or one click inside it. A clip that never shows the structure is seeded on its
    first slice: with no prompt (box, clicks) or with the detector's or an empty mask.
    ``corrections`` (``train.clip_corrections``): SAM2's correction clicks after a box or click
    seed, with the seed frame's ground truth and a seed per clip for drawing them."""
    inputs, targets = collate(rows, tokenizer, frame_rngs, box_prob, box_noise, box_noise_max_px, targets_from)
    clips, length = valid.shape
    masks = np.asarray(rows["mask"]).reshape(clips, length, *rows["mask"].shape[1:])
    size = masks.shape[-1]
    seeds, boxes, points = np.full(clips, -1), np.zeros((clips, 4)), np.zeros((clips, 2))
    seed_masks = np.zeros((clips, size, size), np.float32) if seed_kind == "mask" else np.zeros((clips, 1, 1))
    for c in range(clips):
        shown = [k for k in range(length) if valid[c, k] and masks[c, k].any()]
        if shown:
            seeds[c] = shown[clip_rngs[c].integers(len(shown))]
            seed = masks[c, seeds[c]]
            if seed_kind == "box":
                boxes[c] = seed_box(seed, clip_rngs[c], box_noise, box_noise_max_px)
            elif seed_kind == "clicks":
                ys, xs = np.nonzero(seed)
                pick = clip_rngs[c].integers(len(ys))
                points[c] = xs[pick] + 0.5, ys[pick] + 0.5
            elif seed_kind == "mask":
                seed_masks[c] = seed > 0
        elif seed_kind in ("detector", "mask"):
            seeds[c] = 0  # a mask seed says where the structure is, or that it is absent
    inputs["seed_frames"] = torch.from_numpy(seeds)
    inputs["seed_kinds"] = torch.full((clips,), SEED_KINDS.index(seed_kind))
    inputs["seed_boxes"] = torch.from_numpy(boxes).float()
    inputs["seed_points"] = torch.from_numpy(points).float()
    inputs["seed_masks"] = torch.from_numpy(seed_masks)
    if corrections and int(corrections["clicks"]) > 0 and seed_kind in ("box", "clicks"):
        inputs["correction_clicks"] = torch.tensor(int(corrections["clicks"]))
        inputs["correction_from_truth"] = torch.tensor(float(corrections["from_ground_truth"]))
        inputs["correction_masks"] = torch.from_numpy(masks[np.arange(clips), np.maximum(seeds, 0)] > 0)
        inputs["correction_seeds"] = torch.tensor([int(rng.integers(2**62)) for rng in clip_rngs])
    return inputs, targets, torch.from_numpy(masks > 0), torch.from_numpy(valid)
