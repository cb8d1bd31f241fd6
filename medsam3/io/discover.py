"""Find the cases of a dataset folder (or a folder of dataset folders) and check their labels.

Discovery is cheap (file names, JSON, DICOM headers); decoding happens later, per case, in
:func:`medsam3.io.read.read_case`. Unknown label names fail here, before any work starts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydicom.misc import is_dicom

from medsam3.io.case import CaseRef
from medsam3.io.dicom import hashed_case_id, scan_series
from medsam3.io.image2d import pair_masks, target_of
from medsam3.transforms import normalize_modality
from medsam3.vocab import UnknownLabelError, Vocabulary

LAYOUTS = ("nifti", "dicom", "npz", "sam-med2d")


class DiscoveryError(ValueError):
    """The input holds no dataset this project can read, or its labels are unknown."""


def detect_layout(folder: Path) -> str | None:
    """The layout of a dataset folder judged from its top level, or None (DICOM is not judged here)."""
    if (folder / "dataset.json").is_file():
        return "nifti"
    if (folder / "images").is_dir() and ((folder / "masks").is_dir() or (folder / "image2label_train.json").is_file()):
        return "sam-med2d"
    if any(folder.glob("*.npz")):
        return "npz"
    return None


def has_dicom(folder: Path) -> bool:
    return any(p.is_file() and is_dicom(p) for p in folder.rglob("*"))


def find_datasets(root: Path, layout: str = "auto") -> list[tuple[Path, str]]:
    """(folder, layout) of every dataset under ``root``: root itself, or its direct subfolders."""
    if not root.is_dir():
        raise DiscoveryError(f"input {root} is not a folder")
    if layout != "auto":
        if layout not in LAYOUTS:
            raise DiscoveryError(f"layout={layout!r} is not one of auto, {', '.join(LAYOUTS)}")
        return [(root, layout)]
    own = detect_layout(root)
    if own:
        return [(root, own)]
    subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = [(p, kind) for p in subs if (kind := detect_layout(p))]
    if not found:
        # A DICOM tree (patients/studies/series in any depth) is one dataset.
        return [(root, "dicom")] if has_dicom(root) else []
    found += [(p, "dicom") for p in subs if detect_layout(p) is None and has_dicom(p)]
    return sorted(found)


def discover(root: str | Path, cfg: Any, vocab: Vocabulary) -> tuple[list[CaseRef], list[dict[str, str]]]:
    """All cases under ``root`` in a stable order, plus cases rejected at discovery."""
    root = Path(root)
    datasets = find_datasets(root, cfg.layout)
    if not datasets:
        raise DiscoveryError(
            f"no dataset found in {root}: expected dataset.json + imagesTr/ (NIfTI), images/ + masks/ "
            "(SAM-Med2D), *.npz, or DICOM files — in the folder itself or in its subfolders"
        )
    refs: list[CaseRef] = []
    rejected: list[dict[str, str]] = []
    unknown: dict[str, set[str]] = {}
    for folder, layout in datasets:
        name = cfg.dataset or folder.name
        try:
            found, bad = _DISCOVERERS[layout](folder, name, cfg, vocab)
        except UnknownLabelError as exc:
            unknown.setdefault(name, set()).update(exc.names)
            continue
        refs += found
        rejected += bad
    if unknown:
        names = set().union(*unknown.values())
        raise UnknownLabelError(names, "dataset " + ", ".join(sorted(unknown)))
    seen: dict[tuple[str, str], CaseRef] = {}
    for ref in refs:
        key = (ref.dataset, ref.case_id)
        if key in seen:
            raise DiscoveryError(
                f"dataset {ref.dataset}: two cases named {ref.case_id!r} ({seen[key].files[0]}, {ref.files[0]})"
            )
        seen[key] = ref
    return sorted(refs, key=lambda r: (r.dataset, r.case_id)), rejected


# --- one function per layout: (folder, dataset name, cfg, vocab) → (refs, rejected) ----------

def _nifti(folder: Path, name: str, cfg: Any, vocab: Vocabulary):
    try:
        spec = json.loads((folder / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DiscoveryError(f"{folder.name}/dataset.json: cannot parse ({exc})") from exc
    name = cfg.dataset or spec.get("name") or name
    labels = _msd_labels(spec, folder)
    channel = cfg.channel
    modalities = spec.get("modality") or spec.get("channel_names") or {}
    modality = normalize_modality(cfg.modality or modalities.get(str(channel or 0)))
    vocab.check(labels.values(), modality, where=f"{folder.name}/dataset.json")
    pairs = []
    if isinstance(spec.get("training"), list) and spec["training"] and isinstance(spec["training"][0], dict):
        for entry in spec["training"]:
            pairs.append((entry["image"].removeprefix("./"), entry["label"].removeprefix("./")))
        file_channel = channel  # MSD: several channels live in one 4D file
    else:  # nnU-Net v2: imagesTr/<case>_<XXXX><ending>, labelsTr/<case><ending>
        ending = spec.get("file_ending", ".nii.gz")
        for label in sorted((folder / "labelsTr").glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            pairs.append((f"imagesTr/{case}_{(channel or 0):04d}{ending}", f"labelsTr/{label.name}"))
        file_channel = None
    refs = []
    for image, label in sorted(pairs):
        case_id = re.sub(r"(_\d{4})?\.nii(\.gz)?$", "", Path(image).name)
        refs.append(CaseRef(name, "nifti", case_id, str(folder), (image, label), modality,
                            {"labels": labels, "channel": file_channel}))
    return refs, []


def _msd_labels(spec: dict, folder: Path) -> dict[int, str]:
    raw = spec.get("labels") or {}
    if not raw:
        raise DiscoveryError(f"{folder.name}/dataset.json has no 'labels'")
    if all(isinstance(v, int) for v in raw.values()):  # nnU-Net v2: name → value
        pairs = {v: k for k, v in raw.items()}
    else:  # MSD: "value" → name
        try:
            pairs = {int(k): str(v) for k, v in raw.items()}
        except ValueError as exc:
            raise DiscoveryError(f"{folder.name}/dataset.json: labels must map values to names ({exc})") from exc
    return {v: n for v, n in sorted(pairs.items()) if v != 0}


def _npz(folder: Path, name: str, cfg: Any, vocab: Vocabulary):
    labels = {1: str(cfg.npz_label)} | {int(k): str(v) for k, v in (cfg.npz_labels or {}).items()}
    refs = []
    for path in sorted(folder.rglob("*.npz")):
        rel = path.relative_to(folder).as_posix()
        prefix = normalize_modality(path.stem.split("_")[0])
        modality = normalize_modality(cfg.modality) if cfg.modality else (prefix if prefix in _KNOWN else "UNKNOWN")
        refs.append(CaseRef(name, "npz", path.stem, str(folder), (rel,), modality, {"labels": labels}))
    for modality in sorted({r.modality for r in refs}):
        vocab.check(labels.values(), modality, where=f"{folder.name} (npz_label / npz_labels)")
    return refs, []


_KNOWN = {"CT", "MR", "US", "PET", "XR", "MG", "ENDO", "DERM", "FUNDUS", "OCT", "PATH"}


def _sam_med2d(folder: Path, name: str, cfg: Any, vocab: Vocabulary):
    pairs = pair_masks(folder)
    modality = normalize_modality(cfg.modality)
    targets = {target_of(Path(m).stem, Path(img).stem) for img, masks in pairs.items() for m in masks}
    vocab.check(targets, modality, where=f"{folder.name}/masks")
    names = sorted(targets)
    refs, rejected = [], []
    for image, masks in sorted(pairs.items()):
        if not masks:
            rejected.append({"dataset": name, "case": image, "reason": f"{image}: no mask files for this image"})
            continue
        refs.append(CaseRef(name, "sam-med2d", Path(image).stem, str(folder), (image, *masks), modality,
                            {"labels": names}))
    return refs, rejected


def _dicom(folder: Path, name: str, cfg: Any, vocab: Vocabulary):
    groups, orphans = scan_series(folder)
    refs, rejected = [], []
    unknown: set[str] = set()
    for uid, group in sorted(groups.items(), key=lambda kv: kv[1].files[0]):
        case_id = hashed_case_id(uid, str(cfg.salt))
        if not group.segs:
            reason = f"no DICOM-SEG references this series ({len(group.files)} files)"
            rejected.append({"dataset": name, "case": case_id, "reason": reason, "where": group.files[0]})
            continue
        modality = normalize_modality(cfg.modality or group.modality)
        unknown |= {n for n in group.segment_labels if vocab.lookup(n, modality) is None}
        refs.append(CaseRef(name, "dicom", case_id, str(folder), tuple(sorted(group.files)), modality,
                            {"segs": sorted(group.segs)}))
    for seg, uid in orphans:
        reason = "DICOM-SEG references a series that is not in the input"
        rejected.append({"dataset": name, "case": hashed_case_id(uid, str(cfg.salt)), "reason": reason, "where": seg})
    if unknown:
        raise UnknownLabelError(unknown, f"{folder.name} (DICOM-SEG segment labels)")
    return refs, rejected


_DISCOVERERS = {"nifti": _nifti, "npz": _npz, "sam-med2d": _sam_med2d, "dicom": _dicom}
