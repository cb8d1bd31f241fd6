"""Training SAM3's video model on clips of consecutive slices (``train.mode=clips``).

transformers' ``Sam3VideoModel.forward`` and ``Sam3TrackerVideoModel.forward`` run under
``torch.inference_mode`` (they are inference-only), and the tracker's ``forward`` drops the object
score in training mode. :class:`Sam3VideoForClipTraining` is the same model (same weights, same
state-dict keys) with a training ``forward`` that drives the tracker's own per-frame steps with
gradients, teacher-forced as SAM2 trains it:

1. the shared vision backbone runs once over every frame of the batch;
2. the detector (``Sam3Model``) is prompted with the clip's text on every frame (the image loss);
3. per clip, the tracker is seeded on a slice that shows the structure (drawn per sample, so
   both directions train) with the detector's top mask there (as Medical SAM3 seeds), the
   ground-truth mask, its noisy box or a click (``train.clip_seed``); a clip that never shows it
   is taught "absent" from its first slice. Then it tracks to the clip's end and back to its
   start: ``_prepare_memory_conditioned_features`` (memory attention over the previous frames'
   memories and object pointers), ``_single_frame_forward`` (prompt encoder + SAM mask decoder;
   a mask seed is the seed frame's output as it is, ``_use_mask_as_output``),
   ``_encode_new_memory`` (memory encoder on the predicted mask, soft as in training), stored in
   a ``Sam3TrackerVideoInferenceSession`` like inference does.

Every rank runs the same modules the same number of times (ZeRO-3 gathers parameters and
reduces their gradients collectively): one seed kind per step on every rank, and clips of a fixed
length, a shorter clip padded with copies of its last frame that no loss counts (``valid_frames``
for the detector, ``valid`` for the tracker).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam3VideoModel
from transformers.utils import ModelOutput

from medsam3.losses import dice_loss, sigmoid_focal_loss


@dataclass
class ClipOutputs(ModelOutput):
    """The detector's outputs on every frame, and the tracker's per clip and frame: mask logits at
    the model's input size (B, K, S, S), the predicted IoU of that mask (B, K) and the object
    score logit (B, K). A ``ModelOutput`` (a dict): ZeRO-3's backward hooks find its tensors."""

    detector: ModelOutput | None = None
    masks: torch.Tensor | None = None
    iou: torch.Tensor | None = None
    object_logits: torch.Tensor | None = None
    # with correction clicks: the seed frame's outputs before each click (B, C, S, S), (B, C),
    # (B, C), and that frame per clip (B,); ``masks`` holds its output after the last click
    step_masks: torch.Tensor | None = None
    step_iou: torch.Tensor | None = None
    step_object_logits: torch.Tensor | None = None
    step_frames: torch.Tensor | None = None


class Sam3VideoForClipTraining(Sam3VideoModel):
    """``Sam3VideoModel`` with a training forward (see the module docstring)."""

    def register_zero3_parameters(self) -> None:
        """Gather the tracker's parameters for the whole step under ZeRO-3: transformers' tracker
        reads several of them outside the forward of the module that owns them (its memory
        embeddings, the prompt encoder's point embeddings), which ZeRO-3 would leave partitioned."""
        import deepspeed

        for param in self.tracker_model.parameters():
            deepspeed.zero.register_external_parameter(self, param)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                input_boxes: torch.Tensor | None = None, input_boxes_labels: torch.Tensor | None = None,
                seed_frames: torch.Tensor | None = None, seed_kinds: torch.Tensor | None = None,
                seed_boxes: torch.Tensor | None = None, seed_points: torch.Tensor | None = None,
                seed_masks: torch.Tensor | None = None, correction_masks: torch.Tensor | None = None,
                correction_seeds: torch.Tensor | None = None, correction_clicks: torch.Tensor | int = 0,
                correction_from_truth: torch.Tensor | float = 0.0, **kwargs):
        """Frames of B clips of K slices, flattened clip by clip (B·K, 3, S, S), each with its
        clip's text. ``seed_frames`` (B,): the frame the tracker is seeded on (-1: none);
        ``seed_kinds`` (B,): ``pipelines.clip_data.SEED_KINDS`` codes (0 the detector's top mask
        on the seed frame, 1 ``seed_masks`` (B, S, S), 2 ``seed_boxes`` (B, 4) xyxy, 3 one
        positive click ``seed_points`` (B, 2) xy, in input pixels; box when absent). Without seeds
        only the detector runs (validation, probes) and its outputs are returned as they are.

        ``correction_clicks`` > 0 (box and click seeds): SAM2's interactive training. After the
        seed frame's first prediction, that many more clicks, each drawn (:func:`error_click`,
        seeded by ``correction_seeds`` (B,)) from where the mask disagrees with
        ``correction_masks`` (B, S, S), the seed frame's ground truth, or with probability
        ``correction_from_truth`` from the ground truth alone; each is added to the prompt and
        fed back with the previous mask logits. Every step's output is returned for the loss."""
        vision = self.detector_model.get_vision_features(pixel_values=pixel_values)
        detector = self.detector_model(vision_embeds=vision, input_ids=input_ids, attention_mask=attention_mask,
                                       input_boxes=input_boxes, input_boxes_labels=input_boxes_labels)
        if seed_frames is None:
            return detector
        feats, pos = self.get_vision_features_for_tracker(vision_embeds=vision)
        clips, length = len(seed_frames), len(pixel_values) // len(seed_frames)
        kinds = torch.full((clips,), 2) if seed_kinds is None else seed_kinds
        outputs = []
        for c in range(clips):
            prompt = self._seed_prompt(int(kinds[c]), detector, c * length + int(seed_frames[c]), c,
                                       seed_boxes, seed_points, seed_masks) if seed_frames[c] >= 0 else None
            corrections = None
            if int(correction_clicks) and int(kinds[c]) >= 2:  # SAM2 corrects point and box prompts only
                generator = torch.Generator().manual_seed(int(correction_seeds[c]))
                corrections = Corrections(correction_masks[c] > 0, int(correction_clicks),
                                          float(correction_from_truth), generator)
            outputs.append(self._track_clip([f[:, c * length:(c + 1) * length] for f in feats],
                                            [p[:, c * length:(c + 1) * length] for p in pos],
                                            int(seed_frames[c]), prompt, corrections))
        masks, iou, objects = (torch.stack(parts) for parts in zip(*[o[:3] for o in outputs], strict=True))
        result = ClipOutputs(detector=detector, masks=masks, iou=iou, object_logits=objects)
        if outputs and outputs[0][3] is not None:
            steps = [o[3] for o in outputs]
            result.step_masks, result.step_iou, result.step_object_logits = (
                torch.stack([step[i] for step in steps]) for i in range(3))
            result.step_frames = torch.clamp(seed_frames, min=0).to(masks.device)
        return result

    def _seed_prompt(self, kind: int, detector, frame: int, clip: int, boxes, points, masks) -> dict[str, torch.Tensor]:
        """The seed frame's prompt: ``{"mask": (1, 1, S, S)}`` or ``{"point_coords", "point_labels"}``."""
        size = self.tracker_model.image_size
        if kind == 0:  # the detector's top query (presence-gated score), as Medical SAM3 seeds: no gradient
            with torch.no_grad():
                score = detector.pred_logits[frame].sigmoid()
                if detector.presence_logits is not None:
                    score = score * detector.presence_logits[frame].sigmoid()
                top = detector.pred_masks[frame, score.argmax()][None, None]
                mask = F.interpolate(top.float(), size=(size, size), mode="bilinear", align_corners=False) > 0
            return {"mask": mask.to(detector.pred_masks.dtype)}
        if kind == 1:
            return {"mask": masks[clip][None, None]}
        device = detector.pred_logits.device
        if kind == 3:
            return {"point_coords": points[clip].reshape(1, 1, 1, 2),
                    "point_labels": torch.ones(1, 1, 1, dtype=torch.int32, device=device)}
        return {"point_coords": boxes[clip].reshape(1, 1, 2, 2),
                "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32, device=device)}

    def _track_clip(self, feats: list[torch.Tensor], pos: list[torch.Tensor], seed: int,
                    prompt: dict[str, torch.Tensor] | None, corrections: Corrections | None = None):
        from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import (
            Sam3TrackerVideoInferenceSession,
        )

        tracker = self.tracker_model
        length = feats[-1].shape[1]
        session = Sam3TrackerVideoInferenceSession(
            video_height=tracker.image_size, video_width=tracker.image_size, inference_device=feats[-1].device,
            inference_state_device=feats[-1].device, dtype=feats[-1].dtype, max_vision_features_cache_size=length)
        session.processed_frames = dict.fromkeys(range(length))  # features come from the cache
        obj = session.obj_id_to_idx(0)
        start = max(seed, 0)
        results, steps = {}, None
        order = [(k, False) for k in range(start, length)] + [(k, True) for k in range(start - 1, -1, -1)]
        for k, reverse in order:
            frame_feats, frame_pos = [f[:, k:k + 1] for f in feats], [p[:, k:k + 1] for p in pos]
            is_seed = k == start
            high_res = [x.permute(1, 2, 0).reshape(1, x.size(2), *size)
                        for x, size in zip(frame_feats[:-1], tracker.backbone_feature_sizes[:-1], strict=True)]
            prompted = prompt if is_seed else None
            if prompted is not None and "mask" in prompted:
                # a mask seed is the seed frame's output as it is, as transformers' session does
                pixels = frame_feats[-1].permute(1, 2, 0).reshape(1, -1, *tracker.backbone_feature_sizes[-1])
                out = tracker._use_mask_as_output(pixels, high_res, prompted["mask"].to(pixels.dtype))
            else:
                conditioned = tracker._prepare_memory_conditioned_features(
                    inference_session=session, frame_idx=k, obj_idx=obj, is_initial_conditioning_frame=is_seed,
                    current_vision_features=frame_feats[-1], current_vision_positional_embeddings=frame_pos[-1],
                    num_total_frames=length, track_in_reverse_time=reverse)
                with inference_mask_choice(tracker.mask_decoder):
                    out = tracker._single_frame_forward(
                        input_points=None if prompted is None else prompted["point_coords"].to(feats[-1].dtype),
                        input_labels=None if prompted is None else prompted["point_labels"],
                        image_embeddings=high_res + [conditioned],
                        multimask_output=tracker._use_multimask(is_seed, prompted))
                    if is_seed and corrections is not None:
                        out, steps = self._correct(out, prompted, high_res + [conditioned], corrections)
            memory, memory_pos = tracker._encode_new_memory(
                current_vision_feats=frame_feats[-1], pred_masks_high_res=out.high_res_masks,
                object_score_logits=out.object_score_logits, is_mask_from_pts=prompted is not None)
            session.store_output(obj, k, output_value={
                "pred_masks": out.pred_masks, "object_pointer": out.object_pointer,
                "maskmem_features": memory, "maskmem_pos_enc": memory_pos}, is_conditioning_frame=is_seed)
            results[k] = frame_result(out, tracker.image_size)
        return (*(torch.stack([results[k][i] for k in range(length)]) for i in range(3)), steps)

    def _correct(self, out, prompt: dict[str, torch.Tensor] | None, embeddings: list[torch.Tensor],
                 corrections: Corrections):
        """SAM2's correction clicks on the seed frame (``forward``): the output after the last
        click, and the outputs before each click stacked as (C, S, S), (C,), (C,)."""
        tracker = self.tracker_model
        size = tracker.image_size
        device = embeddings[-1].device
        if prompt is None:  # no seed prompt (the clip never shows the structure): clicks alone
            points = torch.zeros(1, 1, 0, 2, device=device)
            labels = torch.zeros(1, 1, 0, dtype=torch.int32, device=device)
        else:
            points, labels = prompt["point_coords"].float(), prompt["point_labels"]
        steps = []
        for _ in range(corrections.clicks):
            steps.append(frame_result(out, size))
            mask = steps[-1][0]
            from_truth = float(torch.rand((), generator=corrections.generator)) < corrections.from_truth
            xy, label = error_click(corrections.truth.to(device),
                                    None if from_truth else (mask.detach() > 0), corrections.generator)
            points = torch.cat([points, xy.to(device, points.dtype).reshape(1, 1, 1, 2)], dim=2)
            labels = torch.cat([labels, torch.tensor([[[label]]], dtype=labels.dtype, device=device)], dim=2)
            out = tracker._single_frame_forward(
                input_points=points.to(embeddings[-1].dtype), input_labels=labels,
                input_masks=out.pred_masks.reshape(1, 1, *out.pred_masks.shape[-2:]),  # the previous logits
                image_embeddings=embeddings,
                multimask_output=tracker._use_multimask(True, {"point_labels": labels}))
        return out, tuple(torch.stack(parts) for parts in zip(*steps, strict=True))


def frame_result(out, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A tracker step's mask logits (S, S), the IoU the decoder predicts for the mask it chose (the
    best of several, or its only one) and the object score logit."""
    iou = out.iou_scores.reshape(-1)
    return (out.high_res_masks.reshape(size, size), iou.max() if iou.numel() > 1 else iou[0],
            out.object_score_logits.reshape(()))


@dataclass
class Corrections:
    """One clip's correction clicks: the seed frame's ground truth (S, S) bool, how many clicks,
    the chance to draw one from the ground truth instead of the errors, and the draws' source."""

    truth: torch.Tensor
    clicks: int
    from_truth: float
    generator: torch.Generator


def error_click(truth: torch.Tensor, predicted: torch.Tensor | None,
                generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """A correction click as SAM2 trains with (``uniform``): a pixel drawn uniformly from where
    ``predicted`` and ``truth`` (S, S) bool disagree; positive (1) where the structure was missed,
    negative (0) where the mask spills over. No prediction: a pixel of the structure. No error
    (or no structure): a negative click on the background. Returns the pixel's centre (x, y) and
    the label."""
    predicted = torch.zeros_like(truth) if predicted is None else predicted
    region = truth ^ predicted
    if not region.any():
        region = ~truth if (~truth).any() else truth
    where = torch.nonzero(region.cpu())
    y, x = where[int(torch.randint(len(where), (1,), generator=generator))].tolist()
    return torch.tensor([x + 0.5, y + 0.5]), int(truth[y, x])


@contextmanager
def inference_mask_choice(decoder: torch.nn.Module) -> Iterator[None]:
    """The tracker's mask decoder picks its single mask the way it does at inference.

    In eval mode transformers' decoder (as SAM2's) replaces an unstable single-mask output by its
    best multimask output (``dynamic_multimask_via_stability``); in training mode it always keeps
    the single mask. Training the single mask alone leaves the multimask outputs as they were (random
    in a model trained from scratch), and propagation then falls back to them on any slice whose
    single mask is unstable. The decoder has no dropout, so its mode changes nothing else."""
    mode = decoder.training
    decoder.training = False
    try:
        yield
    finally:
        decoder.training = mode


DETECTOR_LOSS_FIELDS = ("pred_logits", "pred_boxes", "pred_masks", "presence_logits", "semantic_seg")


def valid_frames(detector: ModelOutput, targets: list, valid: torch.Tensor) -> tuple[ModelOutput, list, np.ndarray]:
    """The detector's outputs and targets on a batch's real frames only: a clip shorter than the
    clip length is padded with copies of its last frame, which no loss may count (a short run's
    last slice would weigh as much as several, and the padding would inflate the normaliser).
    ``valid`` (B, K) bool, frames flattened clip by clip as in ``forward``; returns the outputs'
    loss fields, the targets and the kept frames' indices."""
    keep = np.flatnonzero(valid.reshape(-1).cpu().numpy())
    index = torch.as_tensor(keep, device=detector.pred_logits.device)
    fields = {name: getattr(detector, name)[index] for name in DETECTOR_LOSS_FIELDS
              if getattr(detector, name, None) is not None}
    return type(detector)(**fields), [targets[i] for i in keep], keep


def tracker_loss(outputs: ClipOutputs, masks: torch.Tensor, valid: torch.Tensor,
                 weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """SAM2's tracker losses on every valid frame, in float32: BCE on the object score; focal +
    Dice on the mask and L1 between the predicted and the actual IoU on the frames that show the
    structure and that the tracker scores as present. With correction clicks, each step before
    the last click is one more frame (SAM2 trains every step) with the seed frame's target.

    ``masks`` (B, K, S, S) 0/1 targets at the model's input size, ``valid`` (B, K) bool."""
    device = outputs.masks.device
    masks, valid = masks.to(device, torch.float32), valid.to(device)
    logits, target = outputs.masks.float()[valid], masks[valid]
    objects, ious = outputs.object_logits.float()[valid], outputs.iou.float()[valid]
    if outputs.step_masks is not None:
        steps = outputs.step_masks.shape[1]
        truth = masks[torch.arange(len(masks), device=device), outputs.step_frames]
        logits = torch.cat([logits, outputs.step_masks.float().flatten(0, 1)])
        target = torch.cat([target, truth[:, None].expand(-1, steps, -1, -1).flatten(0, 1)])
        objects = torch.cat([objects, outputs.step_object_logits.float().flatten()])
        ious = torch.cat([ious, outputs.step_iou.float().flatten()])
    present = target.flatten(1).amax(1)
    terms = {"tracker_object": weights["tracker_object"] * F.binary_cross_entropy_with_logits(objects, present)}
    # transformers' decoder replaces the mask of a frame it scores as empty by a constant (-1024):
    # such a frame carries no mask gradient (its object score is what must change), so the mask
    # terms cover the frames that show the structure and that the tracker scores as present
    shown = (present > 0) & (objects > 0)
    count = max(1.0, float(shown.sum()))
    if shown.any():
        pred, gt = logits[shown], target[shown]
        terms["tracker_mask_focal"] = weights["tracker_mask_focal"] * sigmoid_focal_loss(
            pred, gt, weights["tracker_mask_alpha"], weights["tracker_mask_gamma"]).flatten(1).mean(1).sum() / count
        terms["tracker_mask_dice"] = weights["tracker_mask_dice"] * dice_loss(pred, gt).sum() / count
        with torch.no_grad():
            hard = (pred > 0).float()
            inter, union = (hard * gt).flatten(1).sum(1), ((hard + gt) > 0).float().flatten(1).sum(1)
            actual = inter / union.clamp(min=1)
        terms["tracker_iou"] = weights["tracker_iou"] * F.l1_loss(ious[shown], actual, reduction="sum") / count
    else:
        zero = logits.sum() * 0.0 + ious.sum() * 0.0
        terms["tracker_mask_focal"] = terms["tracker_mask_dice"] = terms["tracker_iou"] = zero
    return terms


def tracker_dice(outputs: ClipOutputs, masks: torch.Tensor, valid: torch.Tensor) -> float:
    """Mean Dice of the tracker's masks (object score > 0, mask logits > 0) over the valid frames."""
    with torch.no_grad():
        shown = (outputs.object_logits > 0)[..., None, None]
        pred = ((outputs.masks > 0) & shown)[valid.to(outputs.masks.device)].flatten(1).cpu()
        gt = (masks[valid] > 0).flatten(1)
        total = pred.sum(1) + gt.sum(1)
        scores = torch.where(total == 0, 1.0, 2 * (pred & gt).sum(1) / total.clamp(min=1))
    return float(scores.mean())
