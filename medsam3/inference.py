"""The inference core: SAM3 + text prompts (+ optional boxes) → masks on the input's own grid.

``predict``, ``evaluate`` and ``serve`` all call :class:`Segmenter`. Pixels go through the same
code as ``prepare`` and training (intensity window per prompt, longest side → the stored square
with bottom/right padding, resize to the model's input), so inference sees what training saw.

Per image and prompt the decoder's queries whose score × presence exceeds ``threshold`` are
kept and their masks merged (instances stay available); masks are mapped back through the
padding and resizing to the plane's own pixels. A volume runs slice batch by slice batch: the
vision backbone runs once per batch and window, the text side once per prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from medsam3.adapters import AdapterError, AdapterSet
from medsam3.config import load_config
from medsam3.io import storage
from medsam3.io.case import Case
from medsam3.model import (
    CheckpointError,
    box_prompts,
    check_checkpoint,
    checkpoint_type,
    model_image_size,
    take_batch,
    tokenize,
)
from medsam3.plans import EXPORT_FILE, Plans, checkpoint_plans
from medsam3.results import PromptResult, masks_to_grid
from medsam3.samples import Intensity
from medsam3.transforms import (
    display_slice,
    model_pixels,
    resize_square,
    resized_shape,
    undisplay_slice,
)


def inference_config(overrides: Sequence[str] = (), config_file: str | os.PathLike | None = None,
                     params_file: str | os.PathLike | None = None, stage: str = "predict") -> DictConfig:
    """``configs/<stage>.yaml`` with its ``prepare`` section completed from ``configs/prepare.yaml``
    (the same preprocessing settings the shards were made with; override as ``prepare.KEY=VALUE``)."""
    cfg = load_config(stage, overrides, config_file, params_file)
    prepare_overrides = [f"{k}={v}" for k, v in _flat(OmegaConf.to_container(cfg.prepare, resolve=True))]
    cfg.prepare = load_config("prepare", prepare_overrides)
    return cfg


def _flat(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", json.dumps(value) if isinstance(value, list | dict) else value


MODES = ("slices", "propagate")  # each slice on its own | a volume as a video (medsam3.propagate)


def box_from_text(text: str) -> tuple[list[float], int | None]:
    """``"x0,y0,x1,y1"`` (pixels), optionally ``"@z=N"`` (the slice that seeds propagation) → four
    floats and the slice index or None; ValueError naming the text when it is not a box."""
    text = str(text).strip()
    coords, _, where = text.partition("@")
    slice_index = None
    if where:
        key, _, value = where.partition("=")
        if key.strip() != "z" or not value.strip().isdigit():
            raise ValueError(f"box {text!r}: the slice is written @z=N with N a slice index")
        slice_index = int(value)
    try:
        box = [float(v) for v in coords.split(",")]
    except ValueError:
        box = []
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {text!r} is not x0,y0,x1,y1 with x1 > x0 and y1 > y0")
    return box, slice_index


@dataclass
class PromptRequest:
    """A request's checked prompts: ``boxes[i]`` goes with ``prompts[i]`` (plane pixels or None),
    ``slices[i]`` is the slice its box or clicks seed in ``propagate`` mode (None: no seed);
    ``clicks[i]``: [x, y, label] points (plane pixels, label 1 foreground, 0 background) or None."""

    prompts: list[str]
    boxes: list[list[float] | None]
    slices: list[int | None]
    clicks: list[list[list[float]] | None]

    def require_seeds(self) -> None:
        """``propagate`` mode: every box must name the slice it seeds (ValueError otherwise)."""
        for prompt, box, z in zip(self.prompts, self.boxes, self.slices, strict=True):
            if box is not None and z is None:
                raise ValueError(f"propagate mode: the box of {prompt!r} needs the slice it seeds, "
                                 "as x0,y0,x1,y1@z=N")

    def seeds(self) -> dict[int, tuple[list[float] | None, list[list[float]] | None, int]]:
        """Prompt index → (box, clicks, slice) for every prompt the tracker is seeded with."""
        return {i: (box, clicks, z) for i, (box, clicks, z) in enumerate(zip(self.boxes, self.clicks, self.slices,
                                                                               strict=True))
                if box is not None or clicks is not None}


def clicks_from(value: Sequence, prompt: str) -> tuple[list[list[float]], int]:
    """``(points, z)``: points ``[x, y, label]`` (plane pixels; label 1 foreground, 0 background,
    at least one foreground) on slice ``z`` → checked floats; ValueError naming the prompt."""
    try:
        points, z = value
        clicks = [[float(x), float(y), int(label)] for x, y, label in points]
        z = int(z)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"clicks of {prompt!r}: ([[x, y, label], ...], z) is expected") from exc
    if not all(np.isfinite(c[:2]).all() and c[2] in (0, 1) for c in clicks) or z < 0:
        raise ValueError(f"clicks of {prompt!r}: finite x, y, a label 1 (foreground) or 0 (background), z ≥ 0")
    if not any(c[2] == 1 for c in clicks):
        raise ValueError(f"clicks of {prompt!r}: at least one foreground click (label 1) is needed")
    return clicks, z


def prompt_request(prompts: Sequence[str], boxes: Sequence[str | Sequence[float] | None] = (),
                   max_prompts: int | None = None, clicks: Sequence | None = None) -> PromptRequest:
    """The one check of a request's prompts and boxes (predict, serve, ``Segmenter.segment``):
    non-empty prompts, at most ``max_prompts``, at most one box per prompt and in its order
    (``"x0,y0,x1,y1[@z=N]"`` text or four numbers); prompts without a box get None. ``clicks[i]``:
    prompt i's ``([[x, y, label], ...], z)`` tracker seed (see :func:`clicks_from`) or None; on
    the slice of its box, if it has one. ValueError names the problem."""
    prompts = [str(p).strip() for p in prompts]
    if not prompts or not all(prompts):
        raise ValueError("every prompt must be non-empty text, and at least one is needed")
    if max_prompts is not None and len(prompts) > max_prompts:
        raise ValueError(f"{len(prompts)} prompts: at most {max_prompts} per request")
    boxes = list(boxes or [])
    if len(boxes) > len(prompts):
        raise ValueError(f"{len(boxes)} boxes for {len(prompts)} prompts: boxes go with prompts, in order")
    parsed = [(None, None) if b is None else box_from_text(b if isinstance(b, str) else ",".join(map(str, b)))
              for b in boxes]
    parsed += [(None, None)] * (len(prompts) - len(parsed))
    clicks = list(clicks or [])
    if len(clicks) > len(prompts):
        raise ValueError(f"clicks for {len(clicks)} prompts, but {len(prompts)} prompts: clicks go with prompts")
    seeds: list[list[list[float]] | None] = []
    slices = [z for _, z in parsed]
    for i, value in enumerate(clicks):
        points, z = (None, None) if value is None else clicks_from(value, prompts[i])
        if points is not None and slices[i] not in (None, z):
            raise ValueError(f"{prompts[i]!r}: its box seeds slice {slices[i]} and its clicks slice {z}: one slice")
        seeds.append(points)
        slices[i] = slices[i] if z is None else z
    seeds += [None] * (len(prompts) - len(seeds))
    return PromptRequest(prompts, [b for b, _ in parsed], slices, seeds)


def select_queries(pred_logits: torch.Tensor, presence_logits: torch.Tensor, threshold: float):
    """(scores (B, Q), keep (B, Q)): a query is kept when score × presence > threshold."""
    scores = pred_logits.sigmoid() * presence_logits.reshape(len(pred_logits), -1)[:, :1].sigmoid()
    return scores, scores > threshold


@dataclass
class SliceItem:
    """One (plane, prompt) pair ready for the model; ``serve`` ships these from its ingress to the
    model replicas, where items of concurrent requests are batched together."""

    square: np.ndarray  # the stored square (S, S, 3) uint8, exactly as prepare writes it
    square_key: str  # square_digest(square): items with equal keys share one vision pass
    prompt: str
    box: np.ndarray | None  # xyxy in square pixels
    out_hw: tuple[int, int]  # the plane's own pixels
    content: tuple[float, float]  # share of the square the plane fills (the rest is padding)
    slice_index: int
    prompt_index: int
    instances: bool = False  # also return each kept query's mask (2D predict)


@dataclass
class SliceAnswer:
    mask: np.ndarray  # bool (out_hw)
    score: float
    instances: list[np.ndarray] = field(default_factory=list)


def square_digest(square: np.ndarray) -> str:
    """Identity of a square's pixels (shape, dtype and content): the key under which items share
    vision features. Content, not (slice, window), so that items of different scans never share
    (serve batches items of concurrent requests), while the prompts of one slice still do."""
    square = np.ascontiguousarray(square)
    digest = hashlib.blake2b(f"{square.shape}{square.dtype}".encode(), digest_size=16)
    digest.update(memoryview(square).cast("B"))
    return digest.hexdigest()


def trained_prompts(checkpoint: str | os.PathLike) -> set[str] | None:
    """The prompts an exported run was trained on (``medsam3_export.json``), or None."""
    export = storage.local_copy(checkpoint) / EXPORT_FILE
    prompts = json.loads(export.read_text()).get("prompts") if export.is_file() else None
    return set(prompts) if prompts else None


def adapter_plans(adapter: str | os.PathLike, base: Plans, prepare_cfg) -> Plans:
    """The plans an adapter was trained with (the ``plans.json`` its export carries), else its
    base's: an adapter trained on pixels made otherwise than its base's is fed its own pixels."""
    if Plans.load(storage.local_copy(adapter)) is None:
        return base
    plans = checkpoint_plans(adapter, prepare_cfg)
    return base if not plans.differences(base) else plans


def adapter_prompts(adapter: str | os.PathLike, base: set[str] | None) -> set[str] | None:
    """The prompts a LoRA adapter was trained on (its export's ``medsam3_export.json``), else its base's."""
    return trained_prompts(adapter) or base


class Preprocessor:
    """Scans → :class:`SliceItem` with ``prepare``'s pixels (needs no model: serve's ingress uses it)."""

    def __init__(self, plans: Plans, model_size: int | None = None):
        self.plans = plans
        self.square = plans.image_size
        # With the model's input size known, items carry the square already resized to it (the
        # first step of model_pixels): serve ships these smaller arrays to the model replicas.
        self.model_size = model_size
        self.axis = plans.slice_axis

    def window(self, prompt: str, modality: str | None) -> str:
        return self.plans.window_for(prompt, modality)

    def intensity(self, case: Case) -> Intensity:
        return Intensity(case, self.plans)

    def in_vocabulary(self, prompt: str, modality: str | None, trained: set[str] | None) -> bool:
        """Was the model trained on this prompt (or, for released weights, does the vocabulary know it)?"""
        return prompt in trained if trained is not None else self.plans.vocab.lookup(prompt, modality) is not None

    def plane_squares(self, planes: Sequence[np.ndarray], intensity: Intensity, window: str,
                      channels: int | None = 3) -> np.ndarray:
        """Display-ordered planes → the stored squares ``prepare`` writes for them (B, S, S, 3) uint8.
        ``channels=None`` keeps grayscale planes as one band (B, S, S): the model sees the same
        pixels (see ``model_pixels``) for a third of the copying."""
        return np.stack([self.plans.square(p, intensity, window, channels) for p in planes])

    def num_slices(self, case: Case) -> int:
        return case.image.shape[self.axis] if case.is_3d else 1

    def plane(self, case: Case, index: int) -> np.ndarray:
        return display_slice(case.image, self.axis, index) if case.is_3d else case.image

    def items(self, case: Case, prompts: Sequence[str], boxes: Sequence, indices: Sequence[int],
              intensity: Intensity, instances: bool = False,
              slices: Sequence[int | None] | None = None) -> list[SliceItem]:
        """Every (slice, prompt) item of the given slices; ``boxes[i]`` is prompt i's
        ``(x0, y0, x1, y1)`` in the plane's pixels or None. A 3D box applies to every slice, or
        only to slice ``slices[i]`` when given (the text alone prompts the others)."""
        planes = {k: self.plane(case, k) for k in indices}
        height, width = next(iter(planes.values())).shape[:2]
        new_h, new_w = resized_shape(height, width, self.square)
        scale = np.array([new_w / width, new_h / height] * 2)
        squares = {}
        for window in sorted({self.window(p, case.modality) for p in prompts}):
            squared = self.plane_squares([planes[k] for k in indices], intensity, window, channels=None)
            for k, square in zip(indices, squared, strict=True):
                square = square if self.model_size is None else resize_square(square, self.model_size)
                squares[(k, window)] = (square, square_digest(square))
        items = []
        slices = slices or [None] * len(prompts)
        for k in indices:
            for i, (prompt, box) in enumerate(zip(prompts, boxes, strict=True)):
                square, key = squares[(k, self.window(prompt, case.modality))]
                box = box if slices[i] is None or slices[i] == k else None
                items.append(SliceItem(square, key, prompt, None if box is None else np.asarray(box) * scale,
                                       (height, width), (new_h / self.square, new_w / self.square), k, i,
                                       instances))
        return items

    def results(self, case: Case, prompts: Sequence[str], boxes: Sequence, trained: set[str] | None):
        """Empty :class:`PromptResult` per prompt, to be filled by :meth:`fill`."""
        shape = case.image.shape if case.is_3d else case.image.shape[:2]
        count = self.num_slices(case)
        return [PromptResult(p, np.zeros(shape, bool), np.zeros(count, np.float32),
                             self.in_vocabulary(p, case.modality, trained),
                             None if b is None else [float(v) for v in b],
                             slice_axis=self.axis if case.is_3d else None)
                for p, b in zip(prompts, boxes, strict=True)]

    def fill(self, case: Case, results: list[PromptResult], items: Sequence[SliceItem],
             answers: Sequence[SliceAnswer]) -> None:
        for item, answer in zip(items, answers, strict=True):
            result = results[item.prompt_index]
            result.slice_scores[item.slice_index] = answer.score
            if case.is_3d:
                result.mask[(slice(None),) * self.axis + (item.slice_index,)] = undisplay_slice(answer.mask)
            else:
                result.mask[:] = answer.mask
                result.instances = answer.instances


class Segmenter:
    """A SAM3 checkpoint ready for prompt-driven inference; with ``adapters`` ({name: LoRA
    adapter folder}, see :mod:`medsam3.adapters`), calls name the adapter to run with (None:
    the base), at most ``max_adapters`` of them kept loaded."""

    def __init__(self, checkpoint: str | os.PathLike, cfg: DictConfig | None = None, device: str | None = None,
                 adapters: Mapping[str, str | os.PathLike] | None = None, max_adapters: int = 8):
        from transformers import AutoTokenizer, Sam3Model
        from transformers.utils import logging as hf_logging

        from medsam3.ops import enable_box_prompts
        from medsam3.video import load_video_model

        self.cfg = cfg if cfg is not None else inference_config()
        checkpoint = check_checkpoint(checkpoint)  # local (an s3:// one is fetched into the cache)
        self.checkpoint = checkpoint
        enable_box_prompts()
        hf_logging.disable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        # a video checkpoint (detector + tracker) segments slices with its detector
        self.video = None
        if checkpoint_type(checkpoint) == "sam3_video":
            self.video = load_video_model(checkpoint, dtype).to(self.device).eval()
            self.model = self.video.detector_model
        else:
            self.model = Sam3Model.from_pretrained(os.fspath(checkpoint), local_files_only=True, dtype=dtype)
            self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(checkpoint), local_files_only=True)
        self.size = model_image_size(self.model)
        self.threshold = float(self.cfg.threshold)
        self.plans = checkpoint_plans(checkpoint, self.cfg.prepare)
        self.prep = Preprocessor(self.plans)
        self.preps: dict[str | None, Preprocessor] = {None: self.prep}  # an adapter's own plans: prep_of
        self.trained_prompts = trained_prompts(checkpoint)
        self.adapters = AdapterSet(self.model, adapters, max_adapters) if adapters else None

    def using(self, adapter: str | None) -> AbstractContextManager:
        """Model calls inside run with ``adapter`` (None: the base); serialised between threads
        when adapters are configured."""
        if adapter is None and self.adapters is None:
            return nullcontext()
        return self._adapter_set(adapter).using(adapter)

    def prompts_of(self, adapter: str | None) -> set[str] | None:
        """The prompts the base (None) or an adapter was trained on (None: unknown)."""
        if adapter is None:
            return self.trained_prompts
        return adapter_prompts(self._adapter_set(adapter).folder(adapter), self.trained_prompts)

    def prep_of(self, adapter: str | None) -> Preprocessor:
        """The pixels for the base (None) or an adapter: the adapter's own plans when it was trained
        on pixels made otherwise (see :func:`adapter_plans`)."""
        if adapter not in self.preps:
            plans = adapter_plans(self._adapter_set(adapter).folder(adapter), self.plans, self.cfg.prepare)
            self.preps[adapter] = self.prep if plans is self.plans else Preprocessor(plans)
        return self.preps[adapter]

    def _adapter_set(self, adapter: str | None) -> AdapterSet:
        if self.adapters is None:
            raise AdapterError(f"adapter {adapter!r}: {self.checkpoint} was loaded without adapters")
        return self.adapters

    def window(self, prompt: str, modality: str | None) -> str:
        return self.prep.window(prompt, modality)

    def plane_squares(self, planes: Sequence[np.ndarray], intensity: Intensity, window: str) -> np.ndarray:
        return self.prep.plane_squares(planes, intensity, window)

    # --- model calls -----------------------------------------------------------------------

    def _vision(self, squares: Sequence[np.ndarray]):
        # a sequence: grayscale (S, S) and colour (S, S, 3) squares of different requests mix in one batch
        pixels = torch.from_numpy(np.stack([model_pixels(s, self.size) for s in squares]))
        return self.model.get_vision_features(pixel_values=pixels.to(self.device, self.model.dtype))

    @torch.inference_mode()
    def run_squares(self, squares: np.ndarray, prompts: Sequence[str], boxes: np.ndarray | None = None):
        """Model outputs for stored squares (B, S, S, 3) uint8, one prompt per square; ``boxes``:
        (B, 4) xyxy in square pixels, rows of NaN for no box. The base model (adapters: see run_items)."""
        with self.using(None):
            return self._decode(self._vision(squares), list(prompts), boxes, squares.shape[1])

    @torch.inference_mode()
    def run_items(self, items: Sequence[SliceItem], adapter: str | None = None) -> list[SliceAnswer]:
        """Answers for any items (of one scan or of many requests), with ``adapter`` or the base:
        the vision backbone runs once per distinct square (``square_key``), the decoder once per item."""
        keys = list(dict.fromkeys(item.square_key for item in items))
        where = {key: i for i, key in enumerate(keys)}
        first = {item.square_key: item.square for item in reversed(items)}
        boxes = np.array([item.box if item.box is not None else [np.nan] * 4 for item in items], np.float64)
        with self.using(adapter):
            vision = self._vision([first[key] for key in keys])
            vision = take_batch(vision, torch.tensor([where[item.square_key] for item in items], device=self.device))
            # boxes are in the stored square's pixels, whatever size the item's square was shipped at
            outputs = self._decode(vision, [item.prompt for item in items], boxes, self.prep_of(adapter).square)
        answers: list[SliceAnswer | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}  # items whose planes share a size map back together
        for i, item in enumerate(items):
            groups.setdefault((item.out_hw, item.content, item.instances), []).append(i)
        for (out_hw, content, instances), picked in groups.items():
            index = torch.tensor(picked, device=self.device)
            chosen = SimpleNamespace(pred_logits=outputs.pred_logits[index], pred_masks=outputs.pred_masks[index],
                                     presence_logits=outputs.presence_logits[index])
            merged, best, each = self.merged_masks(chosen, out_hw, [content] * len(picked), instances)
            for j, i in enumerate(picked):
                answers[i] = SliceAnswer(merged[j], float(best[j]), each[j])
        return answers

    def _decode(self, vision, prompts: list[str], boxes: np.ndarray | None, side: int):
        tokens = tokenize(self.tokenizer, prompts)
        count = len(prompts)
        box_t, labels = box_prompts(np.full((count, 4), np.nan) if boxes is None else boxes, side)
        return self.model(vision_embeds=vision, input_ids=tokens["input_ids"].to(self.device),
                          attention_mask=tokens["attention_mask"].to(self.device),
                          input_boxes=box_t.to(self.device, self.model.dtype),
                          input_boxes_labels=labels.to(self.device))

    def merged_masks(self, outputs, out_hw: tuple[int, int], content: Sequence[tuple[float, float]],
                     instances: bool = False):
        """Per sample: the union of its kept queries' masks on ``out_hw`` pixels, its best kept score,
        and (``instances=True``) each kept query's mask."""
        scores, keep = select_queries(outputs.pred_logits.float(), outputs.presence_logits.float(), self.threshold)
        merged, best, each = [], [], []
        for b in range(len(scores)):
            kept = torch.nonzero(keep[b]).flatten()
            if kept.numel() == 0:
                merged.append(np.zeros(out_hw, bool))
                best.append(0.0)
                each.append([])
                continue
            masks = masks_to_grid(outputs.pred_masks[b, kept][None].float(), out_hw, content[b])[0] > 0
            merged.append(masks.any(0).cpu().numpy())
            best.append(float(scores[b, kept].max()))
            each.append([m.cpu().numpy() for m in masks] if instances else [])
        return merged, np.array(best, np.float32), each

    # --- scans (predict) -------------------------------------------------------------------

    def segment(self, case: Case, prompts: Sequence[str], boxes: Sequence | None = None,
                progress: bool = False, mode: str = "slices", adapter: str | None = None,
                clicks: Sequence | None = None) -> list[PromptResult]:
        """Segment every prompt on a 2D image or a whole volume.

        ``boxes[i]`` goes with ``prompts[i]``: ``"x0,y0,x1,y1[@z=N]"`` or four numbers in the plane's
        pixels, or None. ``mode="slices"``: each slice on its own, ``batch_size`` slices at a time (a
        volume streams through the model; only the masks are kept whole; a box applies to every
        slice, or with ``@z=N`` to slice N only). ``mode="propagate"`` (3D, a checkpoint with a
        tracker): a prompt with a box seeded on slice N is tracked from there to both ends, a
        text-only prompt runs as detector-started clips (see :mod:`medsam3.propagate`).
        ``adapter``: the LoRA adapter to segment with (None: the base). ``clicks[i]``: prompt i's
        ``([[x, y, label], ...], z)`` seeding the tracker (``propagate`` only: ``Sam3Model`` takes
        no points).
        """
        request = prompt_request(prompts, boxes or (), clicks=clicks)
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        if any(c is not None for c in request.clicks) and not (mode == "propagate" and case.is_3d):
            raise ValueError("clicks seed the tracker: they need mode propagate on a volume")
        prep = self.prep_of(adapter)
        intensity = prep.intensity(case)
        results = prep.results(case, request.prompts, request.boxes, self.prompts_of(adapter))
        if mode == "propagate" and case.is_3d:
            if prep is not self.prep:
                raise AdapterError(f"adapter {adapter!r} was trained on pixels made otherwise than its base's "
                                   "(its plans.json): propagate it as a merged export (`medsam3 export merge=true`)")
            with self.using(adapter):  # the whole video: the adapter must not change mid-volume
                self.propagate(case, request, results, intensity)
            return results
        count, batch = prep.num_slices(case), max(1, int(self.cfg.batch_size))
        starts = range(0, count, batch)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, total=len(starts), unit="batch", desc=f"{count} slice(s)")
        for start in starts:
            items = prep.items(case, request.prompts, request.boxes, range(start, min(start + batch, count)),
                               intensity, instances=not case.is_3d, slices=request.slices)
            prep.fill(case, results, items, self.run_items(items, adapter))
        return results

    def propagate(self, case: Case, request: PromptRequest, results: list[PromptResult],
                  intensity: Intensity) -> None:
        from medsam3.propagate import CasePropagation, PropagationSettings

        if self.video is None:
            raise CheckpointError(f"{self.checkpoint}: an image model (model_type 'sam3') cannot propagate; export "
                                  "the run with export.tracker=DIR or train it with train.mode=clips")
        request.require_seeds()
        propagation = CasePropagation(self, case, intensity, PropagationSettings.from_config(self.cfg.get("propagate")))
        seeds = request.seeds()
        if seeds:
            propagation.seeded(results, seeds)
        propagation.text([result for i, result in enumerate(results) if i not in seeds])


def checkpoint_image_size(checkpoint: str | os.PathLike) -> int:
    """The model's square input side, read from a checkpoint's config.json (no weights loaded)."""
    config = json.loads((storage.local_copy(checkpoint) / "config.json").read_text())
    config = config.get("detector_config", config)  # a video checkpoint: its detector's
    return int(config["vision_config"]["backbone_config"]["image_size"])
