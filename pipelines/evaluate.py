"""``medsam3 evaluate``: the paper's comparison on prepared shards, distributed with Ray Data.

1. each checkpoint runs over the shards in a Ray Data actor pool (one model per actor, a GPU
   each when asked), once per prompt mode: text only, and text + the slice's ground-truth box;
2. rows are grouped per (dataset, case, label, mode): a 3D case's slices are stacked back into a
   volume at their slice positions, so Dice, IoU, NSD (tolerance in mm) and HD95 are volume
   metrics, never averages over slices; 2D images are their own group;
3. the driver writes ``metrics.csv`` (one row per case, label, mode and checkpoint),
   ``report.md`` (per-dataset tables of mean ± std and n; a side-by-side table for two
   checkpoints), ``summary.json`` and a gallery of each dataset's best and worst cases.

Which cases: a checkpoint exported from a run records the cases that run trained on, and by
default (``split=auto``) only the other cases are scored (``val``); ``train`` and ``all`` ask
for the rest. Metrics are computed on the stored squares' content (padding cropped) with the
stored pixel spacing.

Whole volumes: ``prepare`` keeps only a sample of the slices where a label is absent, so a 3D
case's shards are not its volume. Given ``scans`` (the folder prepare read), every 3D case is
read again from its scan (checked against the manifest's SHA-256) and cut into every slice with
the shards' own plans, so a false positive on any slice counts. Without ``scans`` a 3D case is
scored on the slices its shards hold (slices missing from them count as empty in both masks),
and the report says so.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from medsam3.errors import StageError
from medsam3.io import storage
from medsam3.io.storage import staged_output
from medsam3.metrics import all_metrics
from medsam3.model import CheckpointError, check_checkpoint
from medsam3.model import parse_checkpoints as parse
from medsam3.plans import EXPORT_FILE, Plans
from medsam3.ray_local import driver_groups, group_arrays, init_ray, map_groups
from medsam3.schema import arrow_source, decode_batch, row_tables, shard_dataset, shard_files, validate_shards
from medsam3.transforms import resized_shape

KEYS = ["checkpoint", "mode", "dataset", "modality", "label", "prompt", "case_id"]
METRICS = ["dice", "iou", "nsd", "hd95"]
SPLITS = ("auto", "val", "train", "all")


class EvaluateError(StageError):
    """Bad shards, a checkpoint that is not SAM3, or an unknown option."""


def parse_checkpoints(specs: Sequence[str]) -> dict[str, str]:
    """``DIR`` or ``NAME=DIR`` → {name: dir or s3:// URI}; names default to the folder names and
    must differ."""
    try:
        found = parse(list(specs))
    except ValueError as exc:
        raise EvaluateError(str(exc)) from exc
    for path in found.values():
        try:
            check_checkpoint(path)
        except CheckpointError as exc:
            raise EvaluateError(f"checkpoint: {exc}") from exc
    return found


def trained_cases(checkpoint: str) -> set[str] | None:
    """``dataset/case_id`` of every case the checkpoint's run trained on, when it records them."""
    export = storage.local_copy(checkpoint) / EXPORT_FILE
    split = json.loads(export.read_text()).get("split") if export.is_file() else None
    return set(split["train"]) if split else None


def select_cases(cases: Sequence[tuple[str, str]], found: dict[str, str], split: str) -> tuple[str, list]:
    """The (dataset, case_id) pairs to score: ``val`` = no checkpoint's run trained on them,
    ``train`` = some run did, ``all``; ``auto`` = ``val`` when a checkpoint records its run's
    training cases, else ``all``. Returns (the split resolved, the cases)."""
    if split not in SPLITS:
        raise EvaluateError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    known = [t for t in (trained_cases(path) for path in found.values()) if t is not None]
    if split == "auto":
        split = "val" if known else "all"
    if split == "all":
        return split, list(cases)
    if not known:
        raise EvaluateError(f"split={split}: no checkpoint records the cases it was trained on (exports of "
                            "`medsam3 train` runs do); use split=all")
    trained = set().union(*known)
    chosen = [c for c in cases if (f"{c[0]}/{c[1]}" in trained) == (split == "train")]
    if not chosen:
        raise EvaluateError(f"split=val: all {len(cases)} case(s) in the shards were trained on; split=all "
                            "scores them anyway" if split == "val" else
                            f"split=train: none of the {len(cases)} case(s) in the shards was trained on")
    return split, chosen


def _check_plans(manifest: dict, found: dict[str, str], shards) -> Plans | None:
    """The shards' plans; a checkpoint that saved other ones would be scored on foreign pixels."""
    if "plans" not in manifest:
        return None
    plans = Plans.from_dict(manifest["plans"])
    for name, path in found.items():
        saved = Plans.load(storage.local_copy(path))
        if saved is not None:
            saved.require_same(plans, f"checkpoint {name}", f"shards {storage.name(shards)}", error=EvaluateError)
    return plans


def _volume_tables(batch: dict[str, Any], cfg: dict, plans: dict, rows_per_block: int = 32):
    """Ray Data UDF: one 3D case read again from its scan → every (slice, label) row of it, with
    the shards' plans, as Arrow tables in the shard schema."""
    from medsam3.io import CaseRef, read_case
    from medsam3.samples import case_rows

    ref, want = CaseRef.from_dict(json.loads(batch["ref"][0])), set(json.loads(batch["sha256"][0]))
    config = OmegaConf.create(cfg)
    storage.configure(config.get("storage"))
    case = read_case(ref, config)
    if {s["sha256"] for s in case.sources} != want:
        raise EvaluateError(f"{ref.describe()}: this scan is not the one the shards were made from "
                            "(its SHA-256 differs from the manifest's)")
    yield from row_tables(case_rows(case, config, Plans.from_dict(plans)), rows_per_block)


def volume_source(scans: str, manifest: dict, volumes: set[tuple[str, str]], prepare: DictConfig):
    """A Ray Data dataset of every slice of the given 3D cases, read from ``scans`` (prepare's
    input) with the shards' settings: their manifest's config, every empty slice kept."""
    import ray

    from medsam3.config import load_config
    from medsam3.io import discover

    # the vocabulary travels in the plans (the manifest names only its file)
    public = {k: v for k, v in manifest["config"].items() if k not in ("vocabulary", "extra_labels")}
    cfg = OmegaConf.merge(load_config("prepare"), public, {"salt": prepare.salt, "empty_fraction": 1.0})
    plans = Plans.from_dict(manifest["plans"])
    refs, _ = discover(storage.local_copy(scans), cfg, plans.vocab)
    refs = [r for r in refs if (r.dataset, r.case_id) in volumes]
    missing = volumes - {(r.dataset, r.case_id) for r in refs}
    if missing:
        raise EvaluateError(f"scans={scans}: {len(missing)} case(s) of the shards are not there, e.g. "
                            f"{'/'.join(sorted(missing)[0])}; give the folder `prepare` read")
    digests: dict[tuple[str, str], list[str]] = {}
    for entry in manifest["inputs"]:
        digests.setdefault((entry["dataset"], entry["case_id"]), []).append(entry["sha256"])
    cfg.storage = storage.settings()
    items = [{"ref": json.dumps(r.to_dict()), "sha256": json.dumps(digests[(r.dataset, r.case_id)])} for r in refs]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        _volume_tables, batch_size=1, batch_format="numpy",
        fn_kwargs={"cfg": OmegaConf.to_container(cfg, resolve=True), "plans": plans.to_dict()})


# --- actors ----------------------------------------------------------------------------------

SLICE_MODES = ("text", "text+box")  # each slice on its own
VOLUME_MODES = ("propagate", "propagate+box")  # 3D cases as videos for the tracker
ROW_KEYS = ("dataset", "modality", "label", "prompt", "case_id", "slice_index", "spacing", "orig_size")


class Predictor:
    """A Ray Data actor: one Segmenter; shard rows in, predicted masks (packed bits) out."""

    def __init__(self, checkpoint: str, cfg: dict, threads: int):
        import torch

        from medsam3.inference import Segmenter

        torch.set_num_threads(max(1, threads))
        storage.configure(cfg.get("storage"))
        self.segmenter = Segmenter(checkpoint, OmegaConf.create(cfg))
        self.modes = [m for m in cfg["modes"] if m in SLICE_MODES]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = decode_batch(batch)
        images = np.stack(rows["image"])
        side = images.shape[1]
        out: dict[str, list] = {k: [] for k in ("mode", "pred", "score", "gt", *ROW_KEYS)}
        for mode in self.modes:
            boxes = None
            if mode == "text+box":
                boxes = np.array([b if np.any(b) else [np.nan] * 4 for b in batch["box"]], np.float64)
            outputs = self.segmenter.run_squares(images, list(batch["prompt"]), boxes)
            merged, scores, _ = self.segmenter.merged_masks(outputs, (side, side), [(1.0, 1.0)] * len(images))
            for i, mask in enumerate(merged):
                out["mode"].append(mode)
                out["pred"].append(np.packbits(mask).tobytes())
                out["gt"].append(np.packbits(rows["mask"][i] > 0).tobytes())
                out["score"].append(float(scores[i]))
                for key in ROW_KEYS:
                    out[key].append(batch[key][i])
        return typed_rows(out)


class VolumePredictor:
    """A Ray Data actor for the propagation modes: one (dataset, case, prompt) group of 3D rows
    in slice order is a video for the checkpoint's tracker (medsam3.propagate) → the same rows as
    :class:`Predictor`, scored (one metrics row per mode). ``propagate``: text-started clips;
    ``propagate+box``: the tracker seeded with the ground-truth box of the slice where the
    structure is largest (MedSAM2's key slice)."""

    def __init__(self, checkpoint: str, cfg: dict, threads: int):
        import torch

        from medsam3.inference import Segmenter
        from medsam3.propagate import PropagationSettings, VolumePropagator

        torch.set_num_threads(max(1, threads))
        storage.configure(cfg.get("storage"))
        segmenter = Segmenter(checkpoint, OmegaConf.create(cfg))
        if segmenter.video is None:
            raise EvaluateError(f"{checkpoint}: an image model has no tracker for modes "
                                f"{[m for m in cfg['modes'] if m in VOLUME_MODES]}; export it with a tracker")
        settings = PropagationSettings.from_config(cfg.get("propagate"))
        self.propagator = VolumePropagator(segmenter.video, segmenter.tokenizer, settings,
                                           batch_size=int(cfg["batch_size"]))
        self.modes = [m for m in cfg["modes"] if m in VOLUME_MODES]
        self.threshold = settings.mask_threshold
        self.tolerance_mm = float(cfg["tolerance_mm"])

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch.nn.functional as F

        from medsam3.propagate import square_pixels

        order = np.argsort(group["slice_index"])
        batch = {k: v[order] for k, v in group.items()}
        rows = decode_batch(batch)
        images, side, depth = rows["image"], rows["image"].shape[1], len(order)
        pixels = square_pixels(lambda k: images[k], self.propagator.size)
        out: dict[str, list] = {k: [] for k in ("mode", "pred", "score", "gt", *ROW_KEYS)}
        areas = rows["mask"].reshape(depth, -1).sum(1)
        for mode in self.modes:
            if mode == "propagate+box" and areas.any():
                z = int(np.argmax(areas))
                box = [float(v) * self.propagator.size / side for v in batch["box"][z]]
                tracked = self.propagator.seeded(pixels, depth, [(z, [(box, None)])])
                answers = ((k, *found[0]) for _, k, found in tracked)
            else:  # text only (and a structure absent from every slice has no box to give)
                answers = ((k, prob, score) for _, k, prob, score in
                           self.propagator.text(pixels, depth, [str(batch["prompt"][0])]))
            for k, prob, score in sorted(answers, key=lambda a: a[0]):
                grid = F.interpolate(prob[None, None].float(), size=(side, side), mode="bilinear",
                                     align_corners=False)[0, 0] > self.threshold
                mask = grid.cpu().numpy()
                out["mode"].append(mode)
                out["pred"].append(np.packbits(mask).tobytes())
                out["gt"].append(np.packbits(rows["mask"][k] > 0).tobytes())
                out["score"].append(float(score) if mask.any() else 0.0)
                for key in ROW_KEYS:
                    out[key].append(batch[key][k])
        # scored here, per mode: the group is the whole (case, label) already
        rows = typed_rows(out)
        scored = [case_metrics({k: v[rows["mode"] == mode] for k, v in rows.items()}, side, self.tolerance_mm)
                  for mode in self.modes]
        return {k: np.array([row[k] for row in scored]) for k in scored[0]}


def typed_rows(out: dict[str, list]) -> dict[str, np.ndarray]:
    """Predicted rows with fixed dtypes: rows read from the shards and rows cut from a scan again
    (``scans``), of every mode, must give blocks of one schema, or Ray Data cannot group them."""
    typed = {"spacing": np.float64, "orig_size": np.int64, "slice_index": np.int64, "score": np.float64}
    return {k: np.array(v, dtype=object) if k in ("pred", "gt") else
            np.stack([np.asarray(x, typed[k]) for x in v]) if k in ("spacing", "orig_size") and v else
            np.array(v, dtype=typed.get(k)) for k, v in out.items()}


def case_metrics(group: dict[str, np.ndarray], side: int, tolerance_mm: float) -> dict[str, Any]:
    """One (case, label, mode) group of predicted rows → one metrics row (3D: over the stacked volume)."""
    order = np.argsort(group["slice_index"])
    height, width = (int(v) for v in group["orig_size"][order[0]])
    new_h, new_w = resized_shape(height, width, side)

    def plane(packed: bytes) -> np.ndarray:
        return np.unpackbits(np.frombuffer(packed, np.uint8), count=side * side).reshape(side, side)[:new_h, :new_w]

    spacing = [float(v) for v in group["spacing"][order[0]]]  # (row mm, column mm, through-plane mm)
    indices = group["slice_index"][order]
    if indices[0] < 0:  # a 2D image
        pred, gt, metric_spacing = plane(group["pred"][order[0]]), plane(group["gt"][order[0]]), spacing[:2]
    else:
        depth = int(indices[-1] - indices[0] + 1)
        pred, gt = np.zeros((depth, new_h, new_w), bool), np.zeros((depth, new_h, new_w), bool)
        for row, k in zip(order, indices, strict=True):
            pred[k - indices[0]], gt[k - indices[0]] = plane(group["pred"][row]), plane(group["gt"][row])
        metric_spacing = [spacing[2], spacing[0], spacing[1]]
    first = order[0]
    return {"mode": group["mode"][first], "dataset": group["dataset"][first], "modality": group["modality"][first],
            "label": group["label"][first], "prompt": group["prompt"][first], "case_id": group["case_id"][first],
            "slices": len(order), "gt_pixels": int(gt.sum()), "pred_pixels": int(pred.sum()),
            "score": float(np.max(group["score"])), **all_metrics(pred, gt, metric_spacing, tolerance_mm)}


def _metrics_batch(group: dict[str, np.ndarray], side: int, tolerance_mm: float) -> dict[str, np.ndarray]:
    row = case_metrics(group, side, tolerance_mm)
    return {k: np.array([v]) for k, v in row.items()}


def score_slices(rows, side: int, tolerance_mm: float, in_driver: bool):
    """Predicted rows (a Ray Data dataset) → one metrics row per (mode, case, label), as a pandas
    frame: grouped and scored in the driver for small runs, in the cluster otherwise."""
    import pandas as pd

    keys = ["mode", "dataset", "case_id", "label"]
    if in_driver:  # here: a worker scoring a few groups would spend longer importing this module
        return pd.DataFrame([case_metrics(group_arrays(part), side, tolerance_mm)
                             for part in driver_groups(rows, keys)])
    return map_groups(rows, keys, _metrics_batch, False,
                      fn_kwargs={"side": side, "tolerance_mm": tolerance_mm}).to_pandas()


# --- driver ----------------------------------------------------------------------------------

def run_evaluate(shards: str | os.PathLike, checkpoints: Sequence[str], out_dir: str | os.PathLike,
                 cfg: DictConfig, address: str | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint on the shards; returns the summary (also written to OUT)."""
    import pandas as pd
    import ray

    found = parse_checkpoints(checkpoints)
    unknown = set(cfg.modes) - {*SLICE_MODES, *VOLUME_MODES}
    if unknown or not cfg.modes:
        raise EvaluateError(f"modes must be a non-empty subset of {[*SLICE_MODES, *VOLUME_MODES]}, "
                            f"got {list(cfg.modes)}")
    try:
        manifest = validate_shards(shards)
    except ValueError as exc:
        raise EvaluateError(str(exc)) from exc
    _check_plans(manifest, found, shards)
    files = shard_files(shards)
    paths, filesystem = arrow_source(files)
    side = _stored_side(paths[0], filesystem)
    index = shard_dataset(files).to_table(columns=["dataset", "case_id", "slice_index", "label", "num_slices"])
    volumes_all = {(d, c) for d, c, k in zip(*(index.column(i).to_pylist() for i in range(3)), strict=True) if k >= 0}
    cases = sorted(set(zip(index.column(0).to_pylist(), index.column(1).to_pylist(), strict=True)))
    split, chosen = select_cases(cases, found, str(cfg.split))
    chosen_set = set(chosen)
    scans = cfg.get("scans")
    volumes = volumes_all & chosen_set if scans else set()
    if volumes and "plans" not in manifest:
        raise EvaluateError(f"{shards}: the manifest has no preprocessing plans (shards from an older "
                            "medsam3 prepare); prepare them again to score whole volumes")
    if not ray.is_initialized():
        needed = int(cfg.num_actors) * float(cfg.cpus_per_actor) + 1
        init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, math.ceil(needed)),
                 include_dashboard=False, logging_level="WARNING")
    cfg.storage = storage.settings()  # actors get the settings in force here (config or environment)
    plain = OmegaConf.to_container(cfg, resolve=True)
    frames = []
    # the chosen cases' rows, built once for every checkpoint (the scans are discovered once); a
    # 3D case is read again from its scan when given (whole volumes)
    from_shards = chosen_set - volumes
    source = ray.data.read_parquet(paths, filesystem=filesystem).filter(
        lambda r: (r["dataset"], r["case_id"]) in from_shards) if from_shards else None
    if volumes:
        whole = volume_source(scans, manifest, volumes, cfg.prepare)
        source = whole if source is None else source.union(whole)
    actor = {"compute": ray.data.ActorPoolStrategy(size=int(cfg.num_actors)),
             "num_cpus": float(cfg.cpus_per_actor), "num_gpus": 1 if cfg.use_gpu else 0}
    in_driver = _driver_bytes(index, from_shards, volumes, cfg.modes, side) <= float(cfg.driver_group_mb) * 2**20
    for name, folder in found.items():
        kwargs = {"checkpoint": folder, "cfg": plain, "threads": int(cfg.cpus_per_actor)}
        parts = []
        if set(cfg.modes) & set(SLICE_MODES):
            rows = source.map_batches(Predictor, fn_constructor_kwargs=kwargs, batch_size=int(cfg.batch_size),
                                      **actor)
            parts.append(score_slices(rows, side, float(cfg.tolerance_mm), in_driver))
        if set(cfg.modes) & set(VOLUME_MODES):  # 3D cases only: a 2D image is no video
            videos = source.filter(lambda r: r["slice_index"] >= 0)
            parts.append(map_groups(videos, ["dataset", "case_id", "prompt"], VolumePredictor, in_driver,
                                    fn_constructor_kwargs=kwargs, **actor).to_pandas())
        frame = pd.concat(parts, ignore_index=True)
        frame.insert(0, "checkpoint", name)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True).sort_values(KEYS).reset_index(drop=True)
    scope = {"split": split, "cases": len(chosen), "of_cases": len(cases),
             "volumes": "whole (read from the scans)" if scans else "the slices the shards hold"}
    return write_reports(table, list(found), found, shards, out_dir, cfg, side, scope)


def _driver_bytes(index, from_shards: set, volumes: set, modes: Sequence[str], side: int) -> int:
    """Bytes the driver would hold to form the groups itself: packed predicted and true masks per
    slice mode, and the images and masks of the 3D rows for the propagation modes (a whole
    volume read from its scan: every slice for each of its labels)."""
    table = index.to_pandas()
    keys = list(zip(table.dataset, table.case_id, strict=True))
    rows = table[[k in from_shards for k in keys]]
    whole = table[[k in volumes for k in keys]].groupby(["dataset", "case_id", "label"]).num_slices.first()
    slice_rows = len(rows) + int(whole.sum())
    video_rows = int((rows.slice_index >= 0).sum()) + int(whole.sum())
    slice_modes = len(set(modes) & set(SLICE_MODES))
    return slice_rows * slice_modes * 2 * side**2 // 8 + (video_rows * 4 * side**2 if set(modes) & set(VOLUME_MODES)
                                                          else 0)


def _stored_side(file: str, filesystem) -> int:
    import pyarrow.parquet as pq

    with filesystem.open_input_file(file) as f:
        first = pq.ParquetFile(f).read_row_group(0, columns=["mask"]).column(0)[0].as_py()
    return int(round(math.sqrt(len(first))))


def summary_table(table, by: Sequence[str]):
    """mean ± std and n of each metric per group (HD95: finite values; the count of inf beside it)."""
    import pandas as pd

    rows = []
    for key, part in table.groupby(list(by), sort=True):
        row = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)) | {"n": len(part)}
        for metric in METRICS:
            values = part[metric].to_numpy(float)
            finite = values[np.isfinite(values)]
            row[metric] = float(finite.mean()) if finite.size else math.nan
            row[f"{metric}_std"] = float(finite.std()) if finite.size else math.nan
            if metric == "hd95":
                row["hd95_inf"] = int((~np.isfinite(values)).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def _markdown(frame, by: Sequence[str]) -> str:
    head = [*by, "n", "Dice", "IoU", "NSD", "HD95 (mm)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in frame.iterrows():
        hd = "–" if math.isnan(row["hd95"]) else f"{row['hd95']:.2f} ± {row['hd95_std']:.2f}"
        hd += f" ({row['hd95_inf']} ∞)" if row["hd95_inf"] else ""
        cells = [str(row[k]) for k in by] + [str(row["n"])] + [
            f"{row[m]:.3f} ± {row[m + '_std']:.3f}" for m in ("dice", "iou", "nsd")] + [hd]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_reports(table, names: list[str], found: dict[str, str], shards, out_dir, cfg: DictConfig,
                  side: int, scope: dict[str, Any]) -> dict[str, Any]:
    with staged_output(out_dir) as staging:
        table.to_csv(staging / "metrics.csv", index=False)
        by = ["checkpoint", "mode", "dataset", "label", "modality"]
        overall = summary_table(table, ["checkpoint", "mode"])
        lines = [f"# Evaluation of {', '.join(names)}", "",
                 f"Shards: `{storage.name(shards)}`; NSD tolerance {cfg.tolerance_mm} mm; query threshold "
                 f"{cfg.threshold}. Mean ± std over cases (3D cases are scored as volumes); HD95 over "
                 "finite values, the number of infinite ones (one mask empty) in brackets.", "",
                 f"Cases: {scope['cases']} of {scope['of_cases']} (split `{scope['split']}`"
                 + {"val": ": cases the checkpoints' runs never trained on", "train": ": cases a run trained on",
                    "all": ""}[scope["split"]] + f"); 3D cases: {scope['volumes']}.", "",
                 "## Overall", "", _markdown(overall, ["checkpoint", "mode"]), ""]
        for dataset, part in table.groupby("dataset", sort=True):
            lines += [f"## {dataset}", "", _markdown(summary_table(part, by), by), ""]
        if len(names) == 2:
            lines += ["## Side by side (Dice)", "", _side_by_side(table, names), ""]
        gallery = write_gallery(table, found, shards, staging, cfg, side)
        if gallery:
            lines += ["## Gallery (best and worst cases per dataset, text prompts)", ""]
            lines += [f"![{g}](gallery/{g})" for g in gallery] + [""]
        (staging / "report.md").write_text("\n".join(lines))
        summary = {"checkpoints": {n: storage.name(p) for n, p in found.items()},
                   "cases": int(table["case_id"].nunique()), **{f"scope_{k}": v for k, v in scope.items()},
                   "overall": json.loads(overall.to_json(orient="records"))}
        (staging / "summary.json").write_text(json.dumps(summary, indent=1))
        # flat means per checkpoint and mode, for `dvc metrics show / diff`
        flat: dict[str, dict] = {}
        for _, row in overall.iterrows():
            means = {m: None if math.isnan(row[m]) else round(float(row[m]), 5) for m in METRICS}
            flat.setdefault(row["checkpoint"], {})[row["mode"]] = means
        (staging / "metrics.json").write_text(json.dumps(flat, indent=1))
    return summary


def _side_by_side(table, names: list[str]) -> str:
    by = ["mode", "dataset", "label"]
    first, second = (summary_table(table[table.checkpoint == n], by).set_index(by) for n in names)
    lines = [f"| mode | dataset | label | n | {names[0]} | {names[1]} | Δ |", "|---|---|---|---|---|---|---|"]
    for key in first.index.intersection(second.index):
        a, b = first.loc[key, "dice"], second.loc[key, "dice"]
        lines.append(f"| {' | '.join(map(str, key))} | {first.loc[key, 'n']} | {a:.3f} | {b:.3f} | {b - a:+.3f} |")
    return "\n".join(lines)


def write_gallery(table, found: dict[str, str], shards, out: Path, cfg: DictConfig, side: int) -> list[str]:
    """Best and worst cases per dataset (text mode, first checkpoint): image, truth and prediction
    on the case's slice with the most ground truth. Predictions are recomputed for those slices."""
    import pyarrow.dataset as pads

    from medsam3.inference import Segmenter
    from medsam3.io.write import overlay, save_overlay_figure

    count = int(cfg.gallery)
    name = next(iter(found))
    text = table[(table.checkpoint == name) & (table["mode"] == "text") & (table.gt_pixels > 0)]
    if count <= 0 or text.empty:
        return []
    segmenter = Segmenter(found[name], cfg)
    data = shard_dataset(shard_files(shards))
    (out / "gallery").mkdir()
    written = []
    for dataset, part in text.groupby("dataset", sort=True):
        ranked = part.sort_values("dice")
        picks = {"worst": ranked.head(count), "best": ranked.tail(count).iloc[::-1]}
        for kind, rows in picks.items():
            panels = []
            for _, row in rows.iterrows():
                expr = ((pads.field("dataset") == dataset) & (pads.field("case_id") == row.case_id)
                        & (pads.field("label") == row.label))
                found_rows = decode_batch(data.to_table(filter=expr).to_pydict())
                best = int(np.argmax([m.sum() for m in found_rows["mask"]]))
                image, mask = found_rows["image"][best], found_rows["mask"][best] > 0
                outputs = segmenter.run_squares(image[None], [row.prompt])
                pred = segmenter.merged_masks(outputs, (side, side), [(1.0, 1.0)])[0][0]
                panels.append((f"{row.case_id} {row.label}: truth", overlay(image, [mask])))
                panels.append((f"prediction (case Dice {row.dice:.2f})", overlay(image, [pred])))
            file = f"{dataset}_{kind}.png".replace("/", "_")
            save_overlay_figure(panels, ["mask"], out / "gallery" / file)
            written.append(file)
    return written
