"""SAM3's video model for volumes: transformers' ``Sam3VideoModel`` (the detector, a
``Sam3Model``, and a ``Sam3TrackerVideoModel`` sharing its vision backbone).

A volume is a video along the plans' slice axis. The detector is the one this project fine-tunes;
the tracker (memory attention, memory encoder, SAM mask decoder, and its own neck on the shared
backbone) comes from a folder holding trained tracker weights: the released SAM3 checkpoint in
Hugging Face format, or an export of a clip-trained run. A tracker with random weights is only
assembled when asked (``allow_random_tracker``: tests with the tiny preset).
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import Sam3Config, Sam3Model, Sam3VideoConfig, Sam3VideoModel

from medsam3.model import CheckpointError, check_checkpoint, checkpoint_type, load_detector, preset

TRACKER_PREFIXES = ("tracker_model.", "tracker_neck.")


def video_config(detector: Sam3Config | dict, tracker: dict | None = None, video: dict | None = None,
                 ) -> Sam3VideoConfig:
    """A ``Sam3VideoConfig`` around a detector config, the tracker's sized to the detector's input."""
    detector = detector.to_dict() if isinstance(detector, Sam3Config) else dict(detector)
    tracker = dict(tracker or {})
    tracker.setdefault("vision_config", detector.get("vision_config", {}))
    config = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, **(video or {}))
    config.image_size = config.detector_config.vision_config.backbone_config.image_size
    return config


def preset_video_config(name: str, detector: Sam3Config | None = None) -> Sam3VideoConfig:
    """The video config of a preset (its ``tracker`` and ``video`` sections), around ``detector``
    (default: the preset's own)."""
    spec = preset(name)
    if "tracker" not in spec:
        raise CheckpointError(f"model preset {name!r} has no tracker section (configs/model/{name}.yaml); "
                              "tiny_video and sam3 have one")
    return video_config(detector if detector is not None else spec["config"], spec.get("tracker"),
                        spec.get("video"))


def load_video_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Sam3VideoModel:
    """A ``Sam3VideoModel`` from a local folder; CheckpointError for an image-only checkpoint."""
    folder = check_checkpoint(path)
    if checkpoint_type(folder) != "sam3_video":
        raise CheckpointError(f"{folder}: an image model (model_type 'sam3') has no tracker for propagation; "
                              "export the run with export.tracker=DIR (a SAM3 video checkpoint such as the "
                              "released one), or train with train.mode=clips")
    return Sam3VideoModel.from_pretrained(os.fspath(folder), local_files_only=True, dtype=dtype)


def tracker_state(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tracker's tensors (``tracker_model.*``, ``tracker_neck.*``) of a SAM3 video checkpoint
    and its config. Loaded through ``from_pretrained``: transformers renames this model's keys
    between the file and the module (the file holds ``tracker_model.tracker_model.*``)."""
    folder = check_checkpoint(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "sam3_video" or "tracker_config" not in config:
        raise CheckpointError(f"{folder}: not a SAM3 video checkpoint (model_type {config.get('model_type')!r}); "
                              "tracker weights come from a folder with model_type 'sam3_video'")
    source, info = Sam3VideoModel.from_pretrained(os.fspath(folder), local_files_only=True,
                                                  output_loading_info=True)
    unloaded = [k for k in info["missing_keys"] if k.startswith(TRACKER_PREFIXES)]
    if unloaded or info["mismatched_keys"]:
        raise CheckpointError(f"{folder}: its tracker is incomplete: {len(unloaded)} tensor(s) missing from the "
                              f"file (e.g. {unloaded[:3]}), {len(info['mismatched_keys'])} of another shape")
    state = {k: v for k, v in source.state_dict().items() if k.startswith(TRACKER_PREFIXES)}
    return state, config


def assemble_video_model(detector: Sam3Model, tracker_from: str | os.PathLike | None = None,
                         preset_name: str | None = None, allow_random_tracker: bool = False,
                         model_class: type[Sam3VideoModel] = Sam3VideoModel) -> Sam3VideoModel:
    """A ``Sam3VideoModel`` holding ``detector``'s weights and a tracker loaded from
    ``tracker_from`` (a SAM3 video folder); with no folder, a random tracker from the preset's
    config only when ``allow_random_tracker``. Every tracker tensor must be loaded: a half-loaded
    tracker is refused with the missing and mismatched names. ``model_class``: a subclass with
    the same weights (clip training's)."""
    if tracker_from is None and not allow_random_tracker:
        raise CheckpointError("no tracker weights: give a SAM3 video checkpoint for the tracker "
                              "(export.tracker=DIR), or allow_random_tracker=true for tests")
    if tracker_from is not None:
        state, source = tracker_state(tracker_from)
        config = video_config(detector.config, source["tracker_config"],
                              {k: v for k, v in source.items() if k not in ("detector_config", "tracker_config")
                               and k in Sam3VideoConfig.__annotations__})
    else:
        state, config = {}, preset_video_config(preset_name or "tiny_video", detector.config)
    model = model_class(config)
    model.detector_model.load_state_dict(detector.state_dict())
    if state:
        own = {k: v for k, v in model.state_dict().items() if k.startswith(TRACKER_PREFIXES)}
        missing = sorted(set(own) - set(state))
        shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or shapes:
            raise CheckpointError(f"{tracker_from}: the tracker does not fit this detector: "
                                  f"missing {missing[:5]} ({len(missing)}), shape mismatch {shapes[:5]} "
                                  f"({len(shapes)})")
        model.load_state_dict(state, strict=False)
    return model.to(detector.dtype).eval()


def build_video_model(preset_name: str | None = None, path: str | os.PathLike | None = None,
                      model_class: type[Sam3VideoModel] = Sam3VideoModel) -> Sam3VideoModel:
    """A video model to train or test: a SAM3 video folder's; an image folder's detector with a
    random tracker of the preset's config; or all random from the preset."""
    if path is None:
        return model_class(preset_video_config(preset_name or "tiny_video"))
    if checkpoint_type(path) == "sam3_video":
        return model_class.from_pretrained(os.fspath(check_checkpoint(path)), local_files_only=True)
    return assemble_video_model(load_detector(path), None, preset_name, allow_random_tracker=True,
                                model_class=model_class)
