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

Each slice goes through the vision backbone once per volume and intensity window, ``batch_size``
slices per call (:class:`VisionPass`), whatever the clips, directions and prompts that read it;
text-started clips also share the detector's outputs per (slice, prompt). Frames are made on
demand from the volume (:class:`LazyFrames`), the vision pass holds only the slices a clip or
sweep still needs, and a session keeps only the memories the tracker can still attend to, so
memory stays bounded whatever the depth. Pixels go through the same
:class:`~medsam3.inference.Preprocessor` as slice-by-slice inference.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from medsam3.io.case import Case
from medsam3.model import take_batch, tokenize
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
    """A session's frames, made when the model asks for one (the last few are kept); ``last`` is
    the index asked for last (the frame a video model is working on)."""

    def __init__(self, make: Callable[[int], torch.Tensor], count: int, keep: int = 2):
        self.make, self.count, self.keep = make, count, keep
        self.recent: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.last: int | None = None

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.count:
            raise KeyError(index)
        self.last = index
        if index not in self.recent:
            self.recent[index] = self.make(index)
            while len(self.recent) > self.keep:
                self.recent.popitem(last=False)
        return self.recent[index]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))


class VisionPass:
    """The detector backbone's outputs (``Sam3Model.get_vision_features``) for a volume's slices,
    each computed once while held, with the slice's model pixels and, when asked, the tracker's
    features of it: a slice not held is computed with the next ``batch_size - 1`` slices in the
    direction of travel, in one backbone call. Callers ``release`` what no clip or sweep will
    read again; ``computed`` counts the slices run through the backbone."""

    def __init__(self, video_model, pixels: Callable[[int], torch.Tensor], depth: int, batch_size: int):
        self.video, self.pixels, self.depth, self.batch = video_model, pixels, depth, max(1, int(batch_size))
        detector = video_model.detector_model
        # the models' own methods, never a swap (_shared_detector)
        self.backbone = type(detector).get_vision_features.__get__(detector)
        self.tracker_neck = type(video_model).get_vision_features_for_tracker.__get__(video_model)
        self.held: dict[int, dict[str, Any]] = {}
        self.computed = 0

    @torch.inference_mode()
    def get(self, k: int, step: int = 1) -> Any:
        return self._slice(k, step)["vision"]

    def frame(self, k: int) -> torch.Tensor:
        """Slice k's model pixels: those of the pass when it holds the slice (nothing is computed
        for it otherwise: a session asks for its frame before the model asks for its features)."""
        return self.held[k]["pixels"] if k in self.held else self.pixels(k)

    @torch.inference_mode()
    def tracker_features(self, k: int, step: int = 1) -> tuple[Any, Any]:
        held = self._slice(k, step)
        if "tracker" not in held:
            held["tracker"] = self.tracker_neck(vision_embeds=held["vision"])
        return held["tracker"]

    def _slice(self, k: int, step: int) -> dict[str, Any]:
        if k not in self.held:
            todo = [j for j in range(k, k + step * self.batch, step) if 0 <= j < self.depth and j not in self.held]
            pixels = torch.stack([self.pixels(j) for j in todo]).to(self.video.device, self.video.dtype)
            with torch.inference_mode():
                output = self.backbone(pixel_values=pixels)
            for i, j in enumerate(todo):
                self.held[j] = {"vision": take_batch(output, slice(i, i + 1)), "pixels": pixels[i]}
            self.computed += len(todo)
        return self.held[k]

    def release(self, keep: Callable[[int], bool]) -> None:
        for k in [k for k in self.held if not keep(k)]:
            del self.held[k]


# Sam3VideoModel runs the backbone and the detector inside each frame's step, with no argument to
# hand them in: while a text session runs they answer from a VisionPass and a detections cache.
# The swap is on the shared model, so one propagation at a time holds it.
_DETECTOR_SWAP = threading.Lock()


class VolumePropagator:
    """Propagation through a volume's slices (model pixels, made lazily) with a
    ``Sam3VideoModel``; callers map the low-resolution probabilities back to their own grid.
    ``batch_size``: slices per backbone call."""

    def __init__(self, video_model, tokenizer, settings: PropagationSettings, batch_size: int = 1):
        self.video, self.tokenizer, self.settings = video_model, tokenizer, settings
        self.batch_size = max(1, int(batch_size))
        self.tracker = video_model.tracker_model
        self.device, self.dtype = video_model.device, video_model.dtype
        self.size = int(self.tracker.image_size)
        # memories the tracker still reads: its memory bank and its object pointers
        self.window = max(self.tracker.num_maskmem, self.tracker.config.max_object_pointers_in_encoder)
        self.vision: VisionPass | None = None  # the last call's (its ``computed`` count)

    # --- text: clips started by the detector -----------------------------------------------

    def text(self, pixels: Callable[[int], torch.Tensor], depth: int, prompts: list[str]
             ) -> Iterator[tuple[int, int, torch.Tensor, float]]:
        """(prompt index, slice, fused probability (low-res square), best score) for every prompt
        and slice, each once, as soon as no later clip covers the slice. ``pixels(k)``: slice k's
        model pixels. Clip by clip, every prompt and direction reads one vision pass, and each
        prompt's detections on a slice are made once; both are dropped when the next clip
        starts above the slice, so at most clip_length + batch_size - 1 slices are held."""
        from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

        tokens = [tokenize(self.tokenizer, [prompt]) for prompt in prompts]
        side = self.video.low_res_mask_size
        vision = self.vision = VisionPass(self.video, pixels, depth, self.batch_size)
        detections: dict[tuple[int, int], Any] = {}  # (prompt, slice) → the detector's outputs there
        pending: dict[tuple[int, int], list] = {}  # (prompt, slice) → [sum of probabilities, count, best score]
        clips = self.settings.clips(depth)
        for c, clip in enumerate(clips):
            runs = [(0, False)] + ([(len(clip), True)] if self.settings.directions == "both" else [])
            for p, ids in enumerate(tokens):
                for start, reverse in runs:  # a fresh session per run: clips and directions are independent
                    session = Sam3VideoInferenceSession(video_height=self.size, video_width=self.size,
                                                        inference_device=self.device,
                                                        inference_state_device=self.device, dtype=self.dtype)
                    frames = session.processed_frames = LazyFrames(lambda i, clip=clip: vision.frame(clip[i]),
                                                                   len(clip))
                    prompt_id = session.add_prompt(prompts[p])
                    session.prompt_input_ids[prompt_id] = ids["input_ids"].to(self.device)
                    session.prompt_attention_masks[prompt_id] = ids["attention_mask"].to(self.device)
                    with self._shared_detector(vision, detections, lambda p=p, clip=clip, frames=frames:
                                               (p, clip[frames.last])):
                        outputs = list(self.video.propagate_in_video_iterator(
                            session, start_frame_idx=start, reverse=reverse))
                    for out in outputs:
                        masks = list(out.obj_id_to_mask.values())
                        prob = (torch.stack(masks).float().sigmoid().amax(dim=0).reshape(side, side) if masks
                                else torch.zeros(side, side, device=self.device))
                        score = max((float(v) for v in out.obj_id_to_score.values()), default=0.0)
                        entry = pending.setdefault((p, clip[out.frame_idx]), [0.0, 0, 0.0])
                        entry[0], entry[1], entry[2] = entry[0] + prob, entry[1] + 1, max(entry[2], score)
            done_below = clips[c + 1].start if c + 1 < len(clips) else depth
            vision.release(lambda k, low=done_below: k >= low)
            for key in [key for key in detections if key[1] < done_below]:
                del detections[key]
            for p, k in sorted(key for key in pending if key[1] < done_below):
                total, count, score = pending.pop((p, k))
                yield p, k, total / count, score

    @contextmanager
    def _shared_detector(self, vision: VisionPass, detections: dict, key: Callable[[], tuple[int, int]]):
        """While a text session runs, the video model's backbone and the tracker's neck answer from
        ``vision`` and its detector from ``detections`` (filled on first use), for the frame
        ``key()`` names."""
        video, detector = self.video, self.video.detector_model
        run_detection = video.run_detection

        def vision_features(pixel_values: torch.Tensor, **_: Any):
            return vision.get(key()[1])

        def tracker_features(vision_embeds: Any):
            return vision.tracker_features(key()[1])

        def detect(inference_session, vision_embeds):
            found = key()
            if found not in detections:
                detections[found] = run_detection(inference_session=inference_session, vision_embeds=vision_embeds)
            return detections[found]

        with _DETECTOR_SWAP:
            detector.get_vision_features, video.run_detection = vision_features, detect
            video.get_vision_features_for_tracker = tracker_features
            try:
                yield
            finally:
                del detector.get_vision_features, video.run_detection, video.get_vision_features_for_tracker

    # --- seeds: the tracker prompted on one slice (boxes and clicks) ----------------------------

    def seeded(self, pixels: Callable[[int], torch.Tensor], depth: int,
               groups: list[tuple[int, list[tuple[list[float] | None, list[list[float]] | None]]]]
               ) -> Iterator[tuple[int, int, list[tuple[torch.Tensor, float]]]]:
        """``groups``: (slice z, objects seeded on it, each by a box (xyxy) and/or clicks ([x, y,
        label], label 1 foreground, 0 background), all in model pixels) → (group, frame, each
        object's (probability (low-res square), object score)); an object the tracker scores as
        absent has probability 0 there. Each group's session runs from its z to the end and then
        back to the start, as alone; the groups advance together, so a slice goes through the
        backbone once per sweep: once, or twice when it lies between the lowest and the highest z."""
        for z, _ in groups:
            if not 0 <= z < depth:
                raise ValueError(f"seed slice z={z} is outside the volume's {depth} slices")
        vision = self.vision = VisionPass(self.video, pixels, depth, self.batch_size)
        sessions = [self._seeded_session(pixels, depth, z, objects) for z, objects in groups]
        sweeps = [(range(min(z for z, _ in groups), depth), False),
                  (range(max(z for z, _ in groups) - 1, -1, -1), True)]
        for order, reverse in sweeps:
            for k in order:
                for g, ((z, objects), session) in enumerate(zip(groups, sessions, strict=True)):
                    if (k < z) == reverse:
                        features = vision.tracker_features(k, -1 if reverse else 1)
                        yield g, k, self._track(session, features, k, reverse, len(objects))
                vision.release(lambda j, k=k, reverse=reverse: j < k if reverse else j > k)

    def _seeded_session(self, pixels, depth: int, z: int, objects):
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession,
        )

        session = Sam3TrackerVideoInferenceSession(video_height=self.size, video_width=self.size,
                                                   inference_device=self.device,
                                                   inference_state_device=self.device, dtype=self.dtype)
        session.processed_frames = LazyFrames(pixels, depth)
        for obj_id, (box, clicks) in enumerate(objects):
            # SAM's prompt encoder: a box is its two corners (labels 2 and 3), clicks are points (1 / 0)
            coords = ([box[:2], box[2:]] if box is not None else []) + [c[:2] for c in clicks or []]
            labels = ([2, 3] if box is not None else []) + [int(c[2]) for c in clicks or []]
            session.add_point_inputs(session.obj_id_to_idx(obj_id), z, {
                "point_coords": torch.tensor(coords, dtype=torch.float32, device=self.device)[None, None],
                "point_labels": torch.tensor(labels, dtype=torch.int32, device=self.device)[None, None]})
        session.obj_with_new_inputs = list(range(len(objects)))
        return session

    @torch.inference_mode()
    def _track(self, session, features: tuple[Any, Any], k: int, reverse: bool, count: int
               ) -> list[tuple[torch.Tensor, float]]:
        """One tracker step on frame k, its tracker features given; then the memories it can no
        longer attend to are dropped (bounded memory on deep volumes)."""
        feats, pos = features
        session.cache.cache_vision_features(k, {"vision_feats": feats, "vision_pos_embeds": pos})
        out = self.tracker(inference_session=session, frame_idx=k, reverse=reverse)
        logits = out.pred_masks.reshape(count, -1, *out.pred_masks.shape[-2:])[:, 0].float()
        present = out.object_score_logits.reshape(count, -1)[:, 0].float()
        for outputs in session.output_dict_per_obj.values():
            for f in [f for f in outputs["non_cond_frame_outputs"] if abs(f - k) > self.window]:
                del outputs["non_cond_frame_outputs"][f]
        return [(mask.sigmoid() if score > 0 else torch.zeros_like(mask), float(score.sigmoid()))
                for mask, score in zip(logits, present, strict=True)]


def square_pixels(squares: Callable[[int], np.ndarray], size: int) -> Callable[[int], torch.Tensor]:
    """``squares(k)``: slice k's stored square → slice k's model pixels."""
    return lambda k: torch.from_numpy(model_pixels(squares(k), size))


class CasePropagation:
    """Propagation on a scan for a :class:`~medsam3.inference.Segmenter` whose checkpoint has a
    tracker: frames from the volume's planes, masks back on the planes' own pixels. Prompts with
    one intensity window share each slice's vision pass."""

    def __init__(self, segmenter, case: Case, intensity: Intensity, settings: PropagationSettings):
        self.seg, self.case, self.intensity = segmenter, case, intensity
        self.propagator = VolumePropagator(segmenter.video, segmenter.tokenizer, settings,
                                           batch_size=int(segmenter.cfg.batch_size))
        self.threshold = settings.mask_threshold
        prep = segmenter.prep
        self.depth = prep.num_slices(case)
        self.out_hw = prep.plane(case, 0).shape[:2]
        new_h, new_w = resized_shape(*self.out_hw, prep.square)
        self.content = (new_h / prep.square, new_w / prep.square)
        self.to_model = self.propagator.size / max(self.out_hw)  # plane pixels → model pixels

    def pixels(self, window: str) -> Callable[[int], torch.Tensor]:
        prep = self.seg.prep
        return square_pixels(lambda k: prep.plans.square(prep.plane(self.case, k), self.intensity, window, None),
                             self.propagator.size)

    def by_window(self, results: list[PromptResult]) -> dict[str, list[int]]:
        windows: dict[str, list[int]] = {}
        for i, result in enumerate(results):
            windows.setdefault(self.seg.window(result.prompt, self.case.modality), []).append(i)
        return windows

    def write(self, result: PromptResult, k: int, prob: torch.Tensor, score: float) -> None:
        grid = masks_to_grid(prob[None, None].float(), self.out_hw, self.content)[0, 0] > self.threshold
        mask = grid.cpu().numpy()
        result.mask[(slice(None),) * self.seg.prep.axis + (k,)] = undisplay_slice(mask)
        result.slice_scores[k] = score if mask.any() else 0.0

    def text(self, results: list[PromptResult]) -> None:
        for window, members in self.by_window(results).items():
            prompts = [results[i].prompt for i in members]
            for p, k, prob, score in self.propagator.text(self.pixels(window), self.depth, prompts):
                self.write(results[members[p]], k, prob, score)

    def seeded(self, results: list[PromptResult],
               seeds: dict[int, tuple[list[float] | None, list[list[float]] | None, int]]) -> None:
        """``seeds``: prompt index → (box, clicks [x, y, label]; both in plane pixels, either may be
        None, slice index); objects seeded on one slice with one window share a tracker session."""
        seeded = sorted(seeds)
        for window, members in self.by_window([results[i] for i in seeded]).items():
            groups: dict[int, list[int]] = {}
            for m in members:
                groups.setdefault(seeds[seeded[m]][2], []).append(seeded[m])
            order = sorted(groups)
            scaled = [(z, [([v * self.to_model for v in box] if box is not None else None,
                            [[x * self.to_model, y * self.to_model, label] for x, y, label in clicks or []] or None)
                           for box, clicks, _ in (seeds[i] for i in groups[z])]) for z in order]
            for g, k, answers in self.propagator.seeded(self.pixels(window), self.depth, scaled):
                for i, (prob, score) in zip(groups[order[g]], answers, strict=True):
                    self.write(results[i], k, prob, score)
