"""``medsam3 predict``: masks for text prompts (and optional boxes) on one scan.

Reads the scan like ``prepare`` does, runs :class:`medsam3.inference.Segmenter` and writes, in
OUT: ``labels.nii.gz`` (NIfTI and NPZ inputs: a label map with the input's affine),
``segmentation.dcm`` (DICOM inputs: a DICOM-SEG referencing the source series),
``<n>_<prompt>.png`` masks (2D inputs), ``overlay.png`` (each prompt's mask in its colour, with a
legend) and ``summary.json`` (per prompt: pixels/voxels, volume in ml, score, whether the model
was trained on the prompt). OUT is written in a staging folder and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from medsam3.adapters import AdapterError
from medsam3.errors import StageError
from medsam3.inference import Preprocessor, PromptResult, Segmenter, prompt_request
from medsam3.io import storage
from medsam3.io.case import CaseError
from medsam3.io.scan import Scan, describe, read_scan
from medsam3.io.storage import staged_output
from medsam3.io.write import (
    overlay,
    save_overlay_figure,
    volume_panels,
    write_dicom_seg,
    write_nifti_labels,
    write_png_mask,
)
from medsam3.model import CheckpointError
from medsam3.transforms import display_slice, to_rgb


class PredictError(StageError):
    """The input, the prompts or the checkpoint cannot be used."""


def summarize(scan: Scan, results: Sequence[PromptResult], checkpoint: str | os.PathLike,
              threshold: float) -> dict[str, Any]:
    voxel_ml = float(np.prod(scan.case.spacing)) / 1000.0 if scan.is_3d else None
    prompts = []
    for value, result in enumerate(results, start=1):
        count = int(result.mask.sum())
        entry = {"prompt": result.prompt, "label_value": value, "score": round(result.score, 4),
                 "voxels" if scan.is_3d else "pixels": count, "in_vocabulary": result.in_vocabulary,
                 "box": result.box}
        if scan.is_3d:
            entry["volume_ml"] = round(count * voxel_ml, 3)
            entry["slices_with_mask"] = result.slices_with_mask
        else:
            entry["instances"] = len(result.instances)
        if not result.in_vocabulary:
            entry["warning"] = "prompt not seen in training: the result may be unreliable"
        prompts.append(entry)
    return {"input": describe(scan), "checkpoint": storage.name(checkpoint), "threshold": threshold, "prompts": prompts}


def overlay_figure(scan: Scan, results: Sequence[PromptResult], prep: Preprocessor, cfg: DictConfig,
                   path: Path) -> Path:
    """overlay.png: the image (a volume: a few slices where the masks are) with each prompt's
    mask in its colour and a legend with the scores."""
    masks, prompts = [r.mask for r in results], [r.prompt for r in results]
    intensity = prep.intensity(scan.case)
    window = prep.window(prompts[0], scan.case.modality)
    if scan.is_3d:
        axis = prep.axis
        panels = volume_panels(lambda k: intensity(display_slice(scan.case.image, axis, k), window), masks, axis,
                               int(cfg.overlay_slices))
    else:
        panels = [(scan.name, overlay(to_rgb(intensity(scan.case.image, window)), masks))]
    return save_overlay_figure(panels, prompts, path, [r.score for r in results])


def write_outputs(scan: Scan, results: Sequence[PromptResult], prep: Preprocessor, cfg: DictConfig,
                  out: Path) -> list[str]:
    """Every output file for one scan into ``out`` (an existing, empty folder); returns their names."""
    masks, prompts = [r.mask for r in results], [r.prompt for r in results]
    files = []
    if scan.is_3d:
        if scan.kind == "dicom":
            write_dicom_seg(masks, prompts, scan.case.affine, scan.dicom_files, out / "segmentation.dcm")
            files.append("segmentation.dcm")
        write_nifti_labels(masks, scan.case.affine, out / "labels.nii.gz", scan.source_affine)
        files.append("labels.nii.gz")
    else:
        for value, result in enumerate(results, start=1):
            name = f"{value}_{re.sub(r'[^a-z0-9]+', '_', result.prompt.lower()).strip('_') or 'prompt'}.png"
            write_png_mask(result.mask, out / name)
            files.append(name)
    overlay_figure(scan, results, prep, cfg, out / "overlay.png")
    files.append("overlay.png")
    labels = {str(v): p for v, p in enumerate(prompts, start=1)}
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return files + ["labels.json"]


def run_predict(input_path: str | os.PathLike, prompts: Sequence[str], checkpoint: str | os.PathLike,
                out_dir: str | os.PathLike, cfg: DictConfig, boxes: Sequence[str] = (),
                progress: bool = True, adapter: str | os.PathLike | None = None) -> dict[str, Any]:
    """Segment one scan (with the LoRA ``adapter`` folder applied to ``checkpoint`` when given)
    and write its outputs; returns the summary."""
    try:
        prompt_request(prompts, boxes)  # refused before the model loads
    except ValueError as exc:
        raise PredictError(f"--prompt/--box: {exc}") from exc
    name = None if adapter is None else storage.name(adapter).replace(".", "_")  # peft: no "." in names
    try:
        segmenter = Segmenter(checkpoint, cfg, adapters=None if adapter is None else {name: adapter})
    except AdapterError as exc:
        raise PredictError(str(exc)) from exc
    except CheckpointError as exc:
        raise PredictError(f"checkpoint: {exc}") from exc
    try:
        scan = read_scan(storage.local_copy(input_path), cfg.modality, cfg.channel, bool(cfg.allow_pickle))
    except CaseError as exc:
        raise PredictError(str(exc)) from exc
    try:
        results = segmenter.segment(scan.case, prompts, boxes, progress=progress, mode=str(cfg.mode), adapter=name)
    except AdapterError as exc:  # it does not fit the base
        raise PredictError(str(exc)) from exc
    except (ValueError, CheckpointError) as exc:
        raise PredictError(f"{storage.name(input_path)}: {exc}") from exc
    with staged_output(out_dir) as staging:
        files = write_outputs(scan, results, segmenter.prep_of(name), cfg, staging)
        summary = summarize(scan, results, checkpoint, segmenter.threshold) | {"files": files}
        if adapter is not None:
            summary["adapter"] = name
        (staging / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
