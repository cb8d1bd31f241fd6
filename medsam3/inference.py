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

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from medsam3.config import load_config
from medsam3.io.case import Case
from medsam3.model import check_checkpoint, model_image_size, tokenize
from medsam3.samples import Intensity
from medsam3.transforms import display_slice, model_pixels, resize_pad, resized_shape, undisplay_slice
from medsam3.vocab import Vocabulary


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


def select_queries(pred_logits: torch.Tensor, presence_logits: torch.Tensor, threshold: float):
    """(scores (B, Q), keep (B, Q)): a query is kept when score × presence > threshold."""
    scores = pred_logits.sigmoid() * presence_logits.reshape(len(pred_logits), -1)[:, :1].sigmoid()
    return scores, scores > threshold


def masks_to_grid(logits: torch.Tensor, out_hw: tuple[int, int], content: tuple[float, float]) -> torch.Tensor:
    """Mask logits over the model's square → the content's own pixels.

    ``content`` is the fraction of the square's height and width the image fills (the rest is
    bottom/right padding); the logits are scaled so that this part becomes ``out_hw``, then cropped.
    """
    height, width = out_hw
    full = (max(height, round(height / content[0])), max(width, round(width / content[1])))
    return F.interpolate(logits, size=full, mode="bilinear", align_corners=False)[..., :height, :width]


@dataclass
class PromptResult:
    """One prompt's answer for a scan."""

    prompt: str
    mask: np.ndarray  # bool, the scan's spatial shape (3D: canonical RAS axes)
    slice_scores: np.ndarray  # best kept score per slice (0 where no query passed)
    in_vocabulary: bool
    box: list[float] | None = None
    instances: list[np.ndarray] = field(default_factory=list)  # 2D only: one mask per kept query

    @property
    def score(self) -> float:
        return float(self.slice_scores.max(initial=0.0))


class Segmenter:
    """A SAM3 checkpoint ready for prompt-driven inference."""

    def __init__(self, checkpoint: str | os.PathLike, cfg: DictConfig | None = None, device: str | None = None):
        from transformers import AutoTokenizer, Sam3Model
        from transformers.utils import logging as hf_logging

        from medsam3.ops import enable_box_prompts

        self.cfg = cfg if cfg is not None else inference_config()
        check_checkpoint(checkpoint)
        self.checkpoint = Path(checkpoint)
        enable_box_prompts()
        hf_logging.disable_progress_bar()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = Sam3Model.from_pretrained(os.fspath(checkpoint), local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(os.fspath(checkpoint), local_files_only=True)
        self.size = model_image_size(self.model)
        self.square = int(self.cfg.prepare.image_size)
        self.threshold = float(self.cfg.threshold)
        self.vocab = Vocabulary.from_file(self.cfg.prepare.vocabulary, self.cfg.prepare.extra_labels)
        export = self.checkpoint / "medsam3_export.json"
        trained = json.loads(export.read_text()).get("prompts") if export.is_file() else None
        self.trained_prompts = set(trained) if trained else None

    # --- vocabulary ------------------------------------------------------------------------

    def in_vocabulary(self, prompt: str, modality: str | None = None) -> bool:
        """Was the model trained on this prompt (or, for released weights, does the vocabulary know it)?"""
        if self.trained_prompts is not None:
            return prompt in self.trained_prompts
        return self.vocab.lookup(prompt, modality) is not None

    def window(self, prompt: str, modality: str | None) -> str:
        entry = self.vocab.lookup(prompt, modality)
        return str(self.cfg.prepare.window or (entry.window if entry else self.vocab.default_window))

    # --- squares (evaluate) ----------------------------------------------------------------

    @torch.inference_mode()
    def run_squares(self, squares: np.ndarray, prompts: Sequence[str], boxes: np.ndarray | None = None):
        """Model outputs for stored squares (B, S, S, 3) uint8, one prompt per square; ``boxes``:
        (B, 4) xyxy in square pixels, rows of NaN for no box."""
        pixels = torch.from_numpy(np.stack([model_pixels(s, self.size) for s in squares])).to(self.device)
        vision = self.model.get_vision_features(pixel_values=pixels.to(self.model.dtype))
        return self._decode(vision, list(prompts), boxes, squares.shape[1])

    def _decode(self, vision, prompts: list[str], boxes: np.ndarray | None, side: int):
        tokens = tokenize(self.tokenizer, prompts)
        count = len(prompts)
        box_t = torch.zeros(count, 1, 4)
        labels = torch.full((count, 1), -10, dtype=torch.long)  # -10: no box, as in training
        if boxes is not None:
            for i, box in enumerate(np.asarray(boxes, np.float64).reshape(count, 4)):
                if np.all(np.isfinite(box)):
                    x0, y0, x1, y1 = np.clip(box / side, 0, 1)
                    box_t[i, 0] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, 1 / side),
                                                max(y1 - y0, 1 / side)])
                    labels[i, 0] = 1
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

    # --- scans (predict, serve) ------------------------------------------------------------

    def plane_squares(self, planes: Sequence[np.ndarray], intensity: Intensity, window: str) -> np.ndarray:
        """Display-ordered planes → the stored squares ``prepare`` writes for them (B, S, S, 3) uint8."""
        return np.stack([resize_pad(intensity(p, window), self.square, channels=3) for p in planes])

    def segment(self, case: Case, prompts: Sequence[str], boxes: Sequence[Sequence[float] | None] | None = None,
                progress: bool = False) -> list[PromptResult]:
        """Segment every prompt on a 2D image or a whole volume (slice batches along ``slice_axis``).

        ``boxes[i]`` goes with ``prompts[i]``: ``(x0, y0, x1, y1)`` in the plane's pixels (a 3D box
        applies to every slice), or None.
        """
        prompts = [str(p).strip() for p in prompts]
        if not prompts or not all(prompts):
            raise ValueError("at least one non-empty text prompt is needed")
        boxes = list(boxes) if boxes is not None else [None] * len(prompts)
        if len(boxes) != len(prompts):
            raise ValueError(f"{len(boxes)} box(es) for {len(prompts)} prompt(s): give one per prompt, in order")
        intensity = Intensity(case, self.cfg.prepare)
        axis = int(self.cfg.prepare.slice_axis)
        count = case.image.shape[axis] if case.is_3d else 1
        shape = case.image.shape if case.is_3d else case.image.shape[:2]
        plane_hw = display_slice(case.image, axis, 0).shape[:2] if case.is_3d else case.image.shape[:2]
        new_h, new_w = resized_shape(*plane_hw, self.square)
        content = (new_h / self.square, new_w / self.square)
        scale = np.array([new_w / plane_hw[1], new_h / plane_hw[0]] * 2)
        square_boxes = [None if b is None else np.asarray(b, np.float64) * scale for b in boxes]
        windows = {p: self.window(p, case.modality) for p in prompts}
        results = [PromptResult(p, np.zeros(shape, bool), np.zeros(count, np.float32),
                                self.in_vocabulary(p, case.modality), None if b is None else [float(v) for v in b])
                   for p, b in zip(prompts, boxes, strict=True)]
        batch = max(1, int(self.cfg.batch_size))
        starts = range(0, count, batch)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, total=len(starts), unit="batch", desc=f"{count} slice(s)")
        for start in starts:
            indices = list(range(start, min(start + batch, count)))
            planes = [display_slice(case.image, axis, k) if case.is_3d else case.image for k in indices]
            for window in sorted(set(windows.values())):
                squares = self.plane_squares(planes, intensity, window)
                pixels = torch.from_numpy(np.stack([model_pixels(s, self.size) for s in squares]))
                with torch.inference_mode():
                    vision = self.model.get_vision_features(pixel_values=pixels.to(self.device, self.model.dtype))
                    for result, square_box in zip(results, square_boxes, strict=True):
                        if windows[result.prompt] != window:
                            continue
                        box_rows = None if square_box is None else np.repeat(square_box[None], len(indices), 0)
                        out = self._decode(vision, [result.prompt] * len(indices), box_rows, self.square)
                        merged, best, each = self.merged_masks(out, plane_hw, [content] * len(indices),
                                                               instances=not case.is_3d)
                        result.slice_scores[indices] = best
                        for k, mask in zip(indices, merged, strict=True):
                            if case.is_3d:
                                result.mask[(slice(None),) * axis + (k,)] = undisplay_slice(mask)
                            else:
                                result.mask[:] = mask
                                result.instances = each[0]
        return results
