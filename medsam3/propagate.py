"""3D propagation: a volume segmented as a video with transformers' ``Sam3VideoModel``.

Two ways in, as in Medical SAM3 and MedSAM2:

* **Text only** — independent clips of ``clip_length`` slices along the slice axis, each started
  with the text prompt (the detector finds the structure, the tracker carries it through the clip
  with its memory), run forward and, with ``directions: both``, backward; overlapping clips are
  fused per voxel by averaging their probabilities.
* **Box on one slice** (``x0,y0,x1,y1@z=N``) — the box seeds the tracker on slice N and the mask is
  propagated forward and backward to the volume's ends. Boxes seeded on the same slice share one
  tracker session.
* **Clicks on one slice** (foreground / background points, e.g. a viewer's clicks) — SAM's point
  prompts seed the tracker the same way, alone or with a box.

Frames are made on demand from the volume (:class:`LazyFrames`) and a session keeps only the
memories the tracker can still attend to, so memory stays bounded whatever the depth. Pixels go
through the same :class:`~medsam3.inference.Preprocessor` as slice-by-slice inference.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from medsam3.io.case import Case
from medsam3.model import tokenize
from medsam3.results import PromptResult, masks_to_grid
from medsam3.samples import Intensity
from medsam3.transforms import model_pixels, resized_shape, undisplay_slice


@dataclass(frozen=True)
class PropagationSettings:
    """``propagate`` section of configs/predict.yaml."""

    clip_length: int = 8
    clip_overlap: int = 4
    directions: str = "both"  # both | forward
    mask_threshold: float = 0.5  # on the fused probability

    @classmethod
    def from_config(cls, section: DictConfig | dict | None) -> PropagationSettings:
        settings = cls(**dict(section or {}))
        if settings.clip_length < 1 or not 0 <= settings.clip_overlap < settings.clip_length:
            raise ValueError(f"propagate.clip_length {settings.clip_length} and clip_overlap "
                             f"{settings.clip_overlap}: need clip_length ≥ 1 and 0 ≤ overlap < length")
        if settings.directions not in ("both", "forward"):
            raise ValueError(f"propagate.directions {settings.directions!r}: one of both, forward")
        return settings

    def clips(self, depth: int) -> list[range]:
        """Slice ranges of the clips covering ``depth`` slices; the last one ends at the last slice."""
        length, stride = min(self.clip_length, depth), self.clip_length - self.clip_overlap
        starts = list(range(0, depth - length + 1, stride))
        if starts[-1] + length < depth:
            starts.append(depth - length)
        return [range(s, s + length) for s in starts]


class LazyFrames(Mapping):
    """A session's frames, made when the model asks for one (the last few are kept)."""

    def __init__(self, make: Callable[[int], torch.Tensor], count: int, keep: int = 2):
        self.make, self.count, self.keep = make, count, keep
        self.recent: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise KeyError(index)
        if index not in self.recent:
            self.recent[index] = self.make(index)
            while len(self.recent) > self.keep:
                self.recent.popitem(last=False)
        return self.recent[index]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))


class VolumePropagator:
    """Propagation through any sequence of frames (model pixels, made lazily) with a
    ``Sam3VideoModel``; callers map the low-resolution probabilities back to their own grid."""

    def __init__(self, video_model, tokenizer, settings: PropagationSettings):
        self.video, self.tokenizer, self.settings = video_model, tokenizer, settings
        self.tracker = video_model.tracker_model
        self.device, self.dtype = video_model.device, video_model.dtype
        self.size = int(self.tracker.image_size)
        # memories the tracker still reads: its memory bank and its object pointers
        self.window = max(self.tracker.num_maskmem, self.tracker.config.max_object_pointers_in_encoder)

    # --- text: clips started by the detector -----------------------------------------------

    def text(self, frames: Callable[[range], LazyFrames], depth: int, prompt: str
             ) -> Iterator[tuple[int, torch.Tensor, float]]:
        """(slice, fused probability (low-res square), best score) for every slice, each once,
        as soon as no later clip covers it. ``frames(indices)`` makes a clip's frames."""
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        tokens = tokenize(self.tokenizer, [prompt])
        side = self.video.low_res_mask_size
        pending: dict[int, list] = {}  # slice → [sum of probabilities, count, best score]
        clips = self.settings.clips(depth)
        for c, clip in enumerate(clips):
            runs = [(0, False)] + ([(len(clip), True)] if self.settings.directions == "both" else [])
            for start, reverse in runs:  # a fresh session per run: clips and directions are independent
                session = Sam3VideoInferenceSession(video_height=self.size, video_width=self.size,
                                                    inference_device=self.device,
                                                    inference_state_device=self.device, dtype=self.dtype)
                session.processed_frames = frames(clip)
                prompt_id = session.add_prompt(prompt)
                session.prompt_input_ids[prompt_id] = tokens["input_ids"].to(self.device)
                session.prompt_attention_masks[prompt_id] = tokens["attention_mask"].to(self.device)
                for out in self.video.propagate_in_video_iterator(session, start_frame_idx=start, reverse=reverse):
                    masks = list(out.obj_id_to_mask.values())
                    prob = (torch.stack(masks).float().sigmoid().amax(dim=0).reshape(side, side) if masks
                            else torch.zeros(side, side, device=self.device))
                    score = max((float(v) for v in out.obj_id_to_score.values()), default=0.0)
                    entry = pending.setdefault(clip[out.frame_idx], [0.0, 0, 0.0])
                    entry[0], entry[1], entry[2] = entry[0] + prob, entry[1] + 1, max(entry[2], score)
            done_below = clips[c + 1].start if c + 1 < len(clips) else depth
            for k in sorted(k for k in pending if k < done_below):
                total, count, score = pending.pop(k)
                yield k, total / count, score

    # --- seeds: the tracker prompted on one slice (boxes and clicks) ----------------------------

    def seeded(self, frames: LazyFrames, seeds: list[tuple[list[float] | None, list[list[float]] | None]], z: int
               ) -> Iterator[tuple[int, list[tuple[torch.Tensor, float]]]]:
        """Objects seeded on frame ``z``, each by a box (xyxy) and/or clicks ([x, y, label], label 1
        foreground, 0 background), all in model pixels → per frame, from ``z`` to the end and then
        back to the start: each object's (probability (low-res square), object score); an object
        the tracker scores as absent has probability 0 there."""
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession,
        )

        depth = len(frames)
        if not 0 <= z < depth:
            raise ValueError(f"seed slice z={z} is outside the volume's {depth} slices")
        session = Sam3TrackerVideoInferenceSession(video_height=self.size, video_width=self.size,
                                                   inference_device=self.device,
                                                   inference_state_device=self.device, dtype=self.dtype)
        session.processed_frames = frames
        for obj_id, (box, clicks) in enumerate(seeds):
            # SAM's prompt encoder: a box is its two corners (labels 2 and 3), clicks are points (1 / 0)
            coords = ([box[:2], box[2:]] if box is not None else []) + [c[:2] for c in clicks or []]
            labels = ([2, 3] if box is not None else []) + [int(c[2]) for c in clicks or []]
            session.add_point_inputs(session.obj_id_to_idx(obj_id), z, {
                "point_coords": torch.tensor(coords, dtype=torch.float32, device=self.device)[None, None],
                "point_labels": torch.tensor(labels, dtype=torch.int32, device=self.device)[None, None]})
        session.obj_with_new_inputs = list(range(len(seeds)))
        order = [(k, False) for k in range(z, depth)] + [(k, True) for k in range(z - 1, -1, -1)]
        for k, reverse in order:
            self._cache_features(session, frames, k)
            out = self.tracker(inference_session=session, frame_idx=k, reverse=reverse)
            logits = out.pred_masks.reshape(len(seeds), -1, *out.pred_masks.shape[-2:])[:, 0].float()
            present = out.object_score_logits.reshape(len(seeds), -1)[:, 0].float()
            yield k, [(mask.sigmoid() if score > 0 else torch.zeros_like(mask), float(score.sigmoid()))
                      for mask, score in zip(logits, present, strict=True)]
            self._forget(session, k)

    @torch.inference_mode()
    def _cache_features(self, session, frames: LazyFrames, k: int) -> None:
        """The shared backbone runs once per frame; the tracker reads its own neck's features."""
        pixels = frames[k][None].to(self.device, self.dtype)
        vision = self.video.detector_model.get_vision_features(pixel_values=pixels)
        feats, pos = self.video.get_vision_features_for_tracker(vision_embeds=vision)
        session.cache.cache_vision_features(k, {"vision_feats": feats, "vision_pos_embeds": pos})

    def _forget(self, session, k: int) -> None:
        """Drop tracked frames the tracker can no longer attend to (bounded memory on deep volumes)."""
        for outputs in session.output_dict_per_obj.values():
            stale = [f for f in outputs["non_cond_frame_outputs"] if abs(f - k) > self.window]
            for f in stale:
                del outputs["non_cond_frame_outputs"][f]


def square_frames(squares: Callable[[int], np.ndarray], size: int) -> Callable[[range], LazyFrames]:
    """``squares(k)``: slice k's stored square → a clip's lazily made model pixels."""
    def clip(indices: range) -> LazyFrames:
        return LazyFrames(lambda i: torch.from_numpy(model_pixels(squares(indices[i]), size)), len(indices))

    return clip


class CasePropagation:
    """Propagation on a scan for a :class:`~medsam3.inference.Segmenter` whose checkpoint has a
    tracker: frames from the volume's planes, masks back on the planes' own pixels."""

    def __init__(self, segmenter, case: Case, intensity: Intensity, settings: PropagationSettings):
        self.seg, self.case, self.intensity = segmenter, case, intensity
        self.propagator = VolumePropagator(segmenter.video, segmenter.tokenizer, settings)
        self.threshold = settings.mask_threshold
        prep = segmenter.prep
        self.depth = prep.num_slices(case)
        self.out_hw = prep.plane(case, 0).shape[:2]
        new_h, new_w = resized_shape(*self.out_hw, prep.square)
        self.content = (new_h / prep.square, new_w / prep.square)
        self.to_model = self.propagator.size / max(self.out_hw)  # plane pixels → model pixels

    def frames(self, window: str) -> Callable[[range], LazyFrames]:
        prep = self.seg.prep
        return square_frames(lambda k: prep.plans.square(prep.plane(self.case, k), self.intensity, window, None),
                             self.propagator.size)

    def write(self, result: PromptResult, k: int, prob: torch.Tensor, score: float) -> None:
        grid = masks_to_grid(prob[None, None].float(), self.out_hw, self.content)[0, 0] > self.threshold
        mask = grid.cpu().numpy()
        result.mask[(slice(None),) * self.seg.prep.axis + (k,)] = undisplay_slice(mask)
        result.slice_scores[k] = score if mask.any() else 0.0

    def text(self, result: PromptResult) -> None:
        frames = self.frames(self.seg.window(result.prompt, self.case.modality))
        for k, prob, score in self.propagator.text(frames, self.depth, result.prompt):
            self.write(result, k, prob, score)

    def seeded(self, results: list[PromptResult],
               seeds: dict[int, tuple[list[float] | None, list[list[float]] | None, int]]) -> None:
        """``seeds``: prompt index → (box, clicks [x, y, label]; both in plane pixels, either may be
        None, slice index); objects seeded on one slice with one window share a tracker session."""
        groups: dict[tuple[int, str], list[int]] = {}
        for i, (_, _, z) in seeds.items():
            groups.setdefault((z, self.seg.window(results[i].prompt, self.case.modality)), []).append(i)
        for (z, window), members in groups.items():
            scaled = [([v * self.to_model for v in box] if box is not None else None,
                       [[x * self.to_model, y * self.to_model, label] for x, y, label in clicks or []] or None)
                      for box, clicks, _ in (seeds[i] for i in members)]
            for k, answers in self.propagator.seeded(self.frames(window)(range(self.depth)), scaled, z):
                for i, (prob, score) in zip(members, answers, strict=True):
                    self.write(results[i], k, prob, score)
