"""Cut a decoded :class:`~medsam3.io.case.Case` into shard rows, one per (slice, label).

A row is a dict of plain values and numpy arrays (the MONAI habit): Ray Data writes it as is, and
a test can inspect it without Ray. See ``docs/data-format.md`` for the columns.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from medsam3.io.case import Case
from medsam3.plans import Plans
from medsam3.transforms import (
    display_slice,
    display_spacing,
    mask_to_box,
    range_to_uint8,
    resize_pad,
    resized_shape,
    robust_range,
    window_to_uint8,
)


def keep_empty_pair(seed: int, dataset: str, case_id: str, label: str, index: int, fraction: float) -> bool:
    """Seeded, order-independent draw: is this absent (slice, label) pair kept as an empty row?

    A hash of the pair's identity rather than a shared RNG, so the choice for one case never
    depends on which other cases exist or in what order workers process them.
    """
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    digest = hashlib.blake2b(f"{seed}|{dataset}|{case_id}|{label}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


class Intensity:
    """Maps one plane of a case to uint8 the way its modality asks (per CT window for CT), with the
    windows and percentiles of ``plans``."""

    def __init__(self, case: Case, plans: Plans):
        self.slope, self.intercept = case.intensity_scale
        self.keep = case.image.dtype == np.uint8 and (self.slope, self.intercept) == (1.0, 0.0)
        self.ct = case.modality == "CT"
        self.windows = plans.windows
        self.range = (0.0, 0.0)
        if not self.keep and not self.ct:
            low, high = robust_range(case.image, plans.percentiles)
            low, high = sorted((low * self.slope + self.intercept, high * self.slope + self.intercept))
            self.range = (low, high)

    def __call__(self, plane: np.ndarray, window: str) -> np.ndarray:
        if self.keep:
            return plane
        values = plane.astype(np.float32)
        if (self.slope, self.intercept) != (1.0, 0.0):
            values = values * self.slope + self.intercept
        if self.ct:
            if window not in self.windows:
                raise KeyError(f"CT window {window!r} is not defined in `windows` ({', '.join(self.windows)})")
            width, level = self.windows[window]
            return window_to_uint8(values, width, level)
        return range_to_uint8(values, *self.range)


def label_prompts(case: Case, plans: Plans) -> dict[int, tuple[str, str, str]]:
    """label value → (label name, prompt, CT window name) for every label of the case."""
    vocab = plans.vocab
    out = {}
    for value, name in sorted(case.label_names.items()):
        if value in case.prompts:  # Medical SAM3 NPZ: the file names its prompt
            entry = vocab.lookup(name, case.modality)
            prompt, window = case.prompts[value], entry.window if entry else vocab.default_window
        else:
            entry = vocab.resolve(name, case.modality)
            prompt, window = entry.prompt, entry.window
        out[value] = (name, prompt, plans.window_for(name, case.modality, default=window))
    return out


def case_rows(case: Case, cfg: Any, plans: Plans) -> Iterator[dict[str, Any]]:
    """Yield the shard rows of a case, slice by slice (a volume is never copied whole). ``plans``
    make the pixels; ``cfg`` (prepare's config) says which (slice, label) pairs become rows."""
    size = plans.image_size
    labels = label_prompts(case, plans)
    intensity = Intensity(case, plans)
    if case.is_3d:
        axis = plans.slice_axis
        count = case.image.shape[axis]
        spacing = display_spacing(case.spacing, axis)
        planes = (
            (k, display_slice(case.image, axis, k), [display_slice(layer, axis, k) for layer in case.layers])
            for k in range(count)
        )
    else:
        count, spacing = 1, case.spacing
        planes = iter([(-1, case.image, case.layers)])
    source = case.source_sha256
    for index, plane, layer_planes in planes:
        height, width = plane.shape[:2]
        new_h, new_w = resized_shape(height, width, size)
        pixel = np.array([spacing[0] * height / new_h, spacing[1] * width / new_w, spacing[2]], np.float32)
        images: dict[str, np.ndarray] = {}  # one stored image per CT window used on this slice
        for value, (name, prompt, window) in labels.items():
            mask = np.zeros((height, width), bool)
            for layer in layer_planes:
                mask |= layer == value
            present = bool(mask.any())
            if not present and not keep_empty_pair(cfg.seed, case.dataset, case.case_id, name, index,
                                                   float(cfg.empty_fraction)):
                continue
            stored_mask = resize_pad(mask.view(np.uint8), size, nearest=True)
            area = int(stored_mask.sum())
            if present and area < int(cfg.min_mask_pixels):
                continue  # too small to survive resizing: neither a target nor a true absence
            if window not in images:
                images[window] = plans.square(plane, intensity, window)
            yield {
                "image": images[window],
                "mask": stored_mask,
                "box": mask_to_box(stored_mask),
                "prompt": prompt,
                "label": name,
                "dataset": case.dataset,
                "modality": case.modality,
                "case_id": case.case_id,
                "slice_index": index,
                "num_slices": count,
                "spacing": pixel,
                "orig_size": np.array([height, width], np.int32),
                "area": area,
                "source_sha256": source,
            }
