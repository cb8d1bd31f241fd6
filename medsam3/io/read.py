"""Decode one :class:`CaseRef` into a validated :class:`Case` (any layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medsam3.io.case import Case, CaseError, CaseRef, sha256_file
from medsam3.io.dicom import pack_layers, read_series
from medsam3.io.image2d import read_binary_mask, read_image, target_of
from medsam3.io.nifti import load_canonical, load_label_map
from medsam3.io.npz import load_npz, npz_geometry, to_canonical


def read_case(ref: CaseRef, cfg: Any) -> Case:
    """Read, decode and validate a case; any problem raises :class:`CaseError` naming the file."""
    root = Path(ref.root)
    try:
        case = _read(ref, root, cfg)
    except CaseError as exc:
        raise CaseError(_scrub(str(exc), ref)) from exc.__cause__
    return case


def _scrub(message: str, ref: CaseRef) -> str:
    """No absolute path in a message (it is written to rejected.json); for DICOM no file path
    at all, since DICOM folders are often named after the patient."""
    message = message.replace(f"{ref.root}/", f"{ref.dataset}/").replace(ref.root, ref.dataset)
    if ref.layout == "dicom":
        for name in sorted(ref.files + tuple(ref.info.get("segs", ())), key=len, reverse=True):
            message = message.replace(f"{ref.dataset}/{name}", "<file>").replace(name, "<file>")
    return message


def _read(ref: CaseRef, root: Path, cfg: Any) -> Case:
    missing = [f for f in ref.files + tuple(ref.info.get("segs", ())) if not (root / f).is_file()]
    if missing:
        raise CaseError(f"{ref.dataset}/{missing[0]}: file not found")
    case = _READERS[ref.layout](ref, root, cfg)
    if ref.layout == "dicom":  # no paths of DICOM files in any output: they may carry names
        case.sources = [{"sha256": sha256_file(root / f)} for f in ref.files + tuple(ref.info["segs"])]
    else:
        case.sources = [{"path": f"{ref.dataset}/{f}", "sha256": sha256_file(root / f)} for f in ref.files]
    _validate(case, ref)
    return case


def _nifti(ref: CaseRef, root: Path, cfg: Any) -> Case:
    image_file, label_file = ref.files
    image, affine, zooms, scale = load_canonical(root / image_file, ref.info.get("channel"))
    label, label_affine = load_label_map(root / label_file)
    if label.shape != image.shape:
        raise CaseError(f"{ref.dataset}/{label_file}: label shape {label.shape} differs from image shape {image.shape}")
    if not np.allclose(label_affine, affine, atol=1e-3, rtol=1e-4):
        raise CaseError(f"{ref.dataset}/{label_file}: label affine differs from the image's ({image_file})")
    names = {int(k): v for k, v in ref.info["labels"].items()}
    return Case(ref.case_id, ref.dataset, ref.modality, image, [label], names, zooms, affine, scale)


def _npz(ref: CaseRef, root: Path, cfg: Any) -> Case:
    data = load_npz(root / ref.files[0], allow_pickle=bool(cfg.allow_pickle))
    imgs, gts = data["imgs"], data["gts"]
    where = f"{ref.dataset}/{ref.files[0]}"
    prompts = data.get("text_prompts", {})
    names = {v: p for v, p in prompts.items()} if prompts else {int(k): v for k, v in ref.info["labels"].items()}
    if not np.issubdtype(gts.dtype, np.integer) and not np.all(gts == np.rint(gts)):
        raise CaseError(f"{where}: gts values are not integers")
    gts = gts.astype(np.uint8 if gts.max(initial=0) <= 255 else np.uint16)
    two_d = imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[-1] == 3 and gts.ndim == 2)
    spatial = imgs.shape[:2] if two_d else imgs.shape
    if gts.shape != spatial:
        raise CaseError(f"{where}: gts shape {gts.shape} differs from imgs shape {imgs.shape}")
    spacing, affine = npz_geometry(data, two_d, where)
    if two_d:
        return Case(ref.case_id, ref.dataset, ref.modality, imgs, [gts], names, spacing, None, prompts=prompts)
    return Case(ref.case_id, ref.dataset, ref.modality, to_canonical(imgs), [to_canonical(gts)], names,
                spacing, affine, prompts=prompts)


def _sam_med2d(ref: CaseRef, root: Path, cfg: Any) -> Case:
    image_file, *mask_files = ref.files
    image = read_image(root / image_file)
    masks = []
    for mask_file in mask_files:
        mask = read_binary_mask(root / mask_file)
        if mask.shape != image.shape[:2]:
            raise CaseError(
                f"{ref.dataset}/{mask_file}: mask shape {mask.shape} differs from image shape {image.shape[:2]}"
            )
        masks.append((target_of(Path(mask_file).stem, Path(image_file).stem), mask))
    layers, names = pack_layers(masks, image.shape[:2])
    case = Case(ref.case_id, ref.dataset, ref.modality, image, layers, names, (1.0, 1.0, 1.0), None)
    # Labels of the dataset that this image lacks become candidate empty pairs.
    missing = [n for n in ref.info.get("labels", []) if n not in names.values()]
    for value, name in enumerate(missing, start=max(names, default=0) + 1):
        case.label_names[value] = name
    return case


def _dicom(ref: CaseRef, root: Path, cfg: Any) -> Case:
    image, layers, names, affine, zooms = read_series(root, ref.files, ref.info["segs"])
    return Case(ref.case_id, ref.dataset, ref.modality, image, layers, names, zooms, affine)


def _validate(case: Case, ref: CaseRef) -> None:
    where = f"{ref.dataset}/{ref.files[0]}" if ref.layout != "dicom" else f"{ref.dataset}/{ref.case_id}"
    if case.image.size == 0:
        raise CaseError(f"{where}: image is empty")
    if np.issubdtype(case.image.dtype, np.floating):
        # slab by slab: a large volume never needs a full-size temporary
        for start in range(0, case.image.shape[0], 16):
            if not np.all(np.isfinite(case.image[start:start + 16])):
                raise CaseError(f"{where}: image contains NaN or infinite values")
    known = set(case.label_names)
    for layer in case.layers:
        unknown = present_values(layer) - known
        if unknown:
            raise CaseError(f"{where}: label values {sorted(unknown)} are not named in the dataset's labels")


def present_values(layer: np.ndarray, slab: int = 16) -> set[int]:
    """Non-zero values of a label map, counted slab by slab to bound memory."""
    present: set[int] = set()
    for start in range(0, layer.shape[0], slab):
        counts = np.bincount(np.ravel(layer[start:start + slab]))
        present |= {int(v) for v in np.flatnonzero(counts)}
    return present - {0}

_READERS = {"nifti": _nifti, "npz": _npz, "sam-med2d": _sam_med2d, "dicom": _dicom}
