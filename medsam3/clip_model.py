"""Training SAM3's video model on clips of consecutive slices (``train.mode=clips``).

transformers' ``Sam3VideoModel.forward`` and ``Sam3TrackerVideoModel.forward`` run under
``torch.inference_mode`` (they are inference-only), and the tracker's ``forward`` drops the object
score in training mode. :class:`Sam3VideoForClipTraining` is the same model (same weights, same
state-dict keys) with a training ``forward`` that drives the tracker's own per-frame steps with
gradients, teacher-forced as SAM2 trains it:

1. the shared vision backbone runs once over every frame of the batch;
2. the detector (``Sam3Model``) is prompted with the clip's text on every frame (the image loss);
3. per clip, the tracker is seeded with the ground-truth box of a slice that shows the structure
   (drawn per sample, so both directions train; a clip that never shows it is seeded on its
   first slice with no prompt and taught "absent"), then tracks to the clip's end and back to
   its start: ``_prepare_memory_conditioned_features``
   (memory attention over the previous frames' memories and object pointers),
   ``_single_frame_forward`` (prompt encoder + SAM mask decoder), ``_encode_new_memory`` (memory
   encoder on the predicted mask, soft as in training), stored in a
   ``Sam3TrackerVideoInferenceSession`` like inference does.

Every rank runs the same modules the same number of times (ZeRO-3 gathers parameters
collectively): clips have a fixed length, and a clip shorter than it is padded with copies of
its last frame that the loss ignores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
                seed_frames: torch.Tensor | None = None, seed_boxes: torch.Tensor | None = None, **kwargs):
        """Frames of B clips of K slices, flattened clip by clip (B·K, 3, S, S), each with its
        clip's text. ``seed_frames`` (B,): the frame the tracker is seeded on (-1: no object in the
        clip); ``seed_boxes`` (B, 4): its box, xyxy in input pixels. Without seeds only the
        detector runs (validation, probes) and its outputs are returned as they are."""
        vision = self.detector_model.get_vision_features(pixel_values=pixel_values)
        detector = self.detector_model(vision_embeds=vision, input_ids=input_ids, attention_mask=attention_mask,
                                       input_boxes=input_boxes, input_boxes_labels=input_boxes_labels)
        if seed_frames is None:
            return detector
        feats, pos = self.get_vision_features_for_tracker(vision_embeds=vision)
        clips, length = len(seed_frames), len(pixel_values) // len(seed_frames)
        outputs = [self._track_clip([f[:, c * length:(c + 1) * length] for f in feats],
                                    [p[:, c * length:(c + 1) * length] for p in pos],
                                    int(seed_frames[c]), seed_boxes[c]) for c in range(clips)]
        masks, iou, objects = (torch.stack(parts) for parts in zip(*outputs, strict=True))
        return ClipOutputs(detector=detector, masks=masks, iou=iou, object_logits=objects)

    def _track_clip(self, feats: list[torch.Tensor], pos: list[torch.Tensor], seed: int, box: torch.Tensor):
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
        prompt = None
        if seed >= 0:
            prompt = {"point_coords": box.reshape(1, 1, 2, 2).to(feats[-1].dtype),
                      "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32, device=box.device)}
        results = {}
        order = [(k, False) for k in range(start, length)] + [(k, True) for k in range(start - 1, -1, -1)]
        for k, reverse in order:
            frame_feats, frame_pos = [f[:, k:k + 1] for f in feats], [p[:, k:k + 1] for p in pos]
            is_seed = k == start
            high_res = [x.permute(1, 2, 0).reshape(1, x.size(2), *size)
                        for x, size in zip(frame_feats[:-1], tracker.backbone_feature_sizes[:-1], strict=True)]
            conditioned = tracker._prepare_memory_conditioned_features(
                inference_session=session, frame_idx=k, obj_idx=obj, is_initial_conditioning_frame=is_seed,
                current_vision_features=frame_feats[-1], current_vision_positional_embeddings=frame_pos[-1],
                num_total_frames=length, track_in_reverse_time=reverse)
            points = prompt if is_seed else None
            with inference_mask_choice(tracker.mask_decoder):
                out = tracker._single_frame_forward(
                    input_points=None if points is None else points["point_coords"],
                    input_labels=None if points is None else points["point_labels"],
                    image_embeddings=high_res + [conditioned],
                    multimask_output=tracker._use_multimask(is_seed, points))
            memory, memory_pos = tracker._encode_new_memory(
                current_vision_feats=frame_feats[-1], pred_masks_high_res=out.high_res_masks,
                object_score_logits=out.object_score_logits, is_mask_from_pts=points is not None)
            session.store_output(obj, k, output_value={
                "pred_masks": out.pred_masks, "object_pointer": out.object_pointer,
                "maskmem_features": memory, "maskmem_pos_enc": memory_pos}, is_conditioning_frame=is_seed)
            # the IoU the decoder predicts for the mask it chose (the best of several, or its only one)
            iou = out.iou_scores.reshape(-1)
            results[k] = (out.high_res_masks.reshape(tracker.image_size, tracker.image_size),
                          iou.max() if iou.numel() > 1 else iou[0], out.object_score_logits.reshape(()))
        return tuple(torch.stack([results[k][i] for k in range(length)]) for i in range(3))


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


def tracker_loss(outputs: ClipOutputs, masks: torch.Tensor, valid: torch.Tensor,
                 weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """SAM2's tracker losses on every valid frame, in float32: BCE on the object score; focal +
    Dice on the mask and L1 between the predicted and the actual IoU on the frames that show the
    structure and that the tracker scores as present.

    ``masks`` (B, K, S, S) 0/1 targets at the model's input size, ``valid`` (B, K) bool."""
    device = outputs.masks.device
    masks, valid = masks.to(device, torch.float32), valid.to(device)
    logits = outputs.masks.float()[valid]
    target = masks[valid]
    present = target.flatten(1).amax(1)
    terms = {"tracker_object": weights["tracker_object"] * F.binary_cross_entropy_with_logits(
        outputs.object_logits.float()[valid], present)}
    # transformers' decoder replaces the mask of a frame it scores as empty by a constant (-1024):
    # such a frame carries no mask gradient (its object score is what must change), so the mask
    # terms cover the frames that show the structure and that the tracker scores as present
    shown = (present > 0) & (outputs.object_logits.float()[valid] > 0)
    count = max(1.0, float(shown.sum()))
    if shown.any():
        pred, gt = logits[shown], target[shown]
        terms["tracker_mask_focal"] = weights["tracker_mask_focal"] * sigmoid_focal_loss(
            pred, gt, weights["mask_alpha"], weights["class_gamma"]).flatten(1).mean(1).sum() / count
        terms["tracker_mask_dice"] = weights["tracker_mask_dice"] * dice_loss(pred, gt).sum() / count
        with torch.no_grad():
            hard = (pred > 0).float()
            inter, union = (hard * gt).flatten(1).sum(1), ((hard + gt) > 0).float().flatten(1).sum(1)
            actual = inter / union.clamp(min=1)
        terms["tracker_iou"] = weights["tracker_iou"] * F.l1_loss(
            outputs.iou.float()[valid][shown], actual, reduction="sum") / count
    else:
        zero = logits.sum() * 0.0 + outputs.iou.float().sum() * 0.0
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
