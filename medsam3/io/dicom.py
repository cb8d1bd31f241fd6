"""DICOM series with DICOM-SEG masks, read with pydicom and highdicom.

Series are grouped by SeriesInstanceUID whatever the file names or folder depth; highdicom sorts
the frames along the slice normal and applies RescaleSlope/RescaleIntercept (HU for CT). SEG
segments are resampled onto the image volume's grid by highdicom; their labels name the masks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom

from medsam3.io.case import CaseError

_HEADER_TAGS = ["SeriesInstanceUID", "Modality", "SOPClassUID", "ReferencedSeriesSequence", "SegmentSequence"]


@dataclass
class SeriesGroup:
    """Files of one image series and the SEG objects that reference it (paths relative to root)."""

    series_uid: str
    modality: str
    files: list[str] = field(default_factory=list)
    segs: list[str] = field(default_factory=list)
    segment_labels: list[str] = field(default_factory=list)
    # declared by the headers (largest of each, frames of all files): a volume's size before decoding
    rows: int = 0
    columns: int = 0
    frames: int = 0
    samples: int = 1  # SamplesPerPixel
    bits: int = 0  # BitsAllocated


def scan_series(root: str | os.PathLike) -> tuple[dict[str, SeriesGroup], list[tuple[str, str]]]:
    """Group every DICOM file under ``root`` by series; returns (groups, orphan SEGs as (file, UID)).

    Files that are not DICOM (or have no SeriesInstanceUID, like a DICOMDIR) are ignored.
    """
    root = Path(root)
    groups: dict[str, SeriesGroup] = {}
    segs: list[tuple[str, str, list[str]]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        uid = ds.get("SeriesInstanceUID")
        if uid is None:
            continue
        if ds.get("Modality") == "SEG":
            refs = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])]
            labels = [str(s.SegmentLabel) for s in ds.get("SegmentSequence", [])]
            segs.append((rel, str(uid), refs[0] if refs else "", labels))
            continue
        group = groups.setdefault(str(uid), SeriesGroup(str(uid), str(ds.get("Modality", ""))))
        group.files.append(rel)
        group.rows = max(group.rows, int(ds.get("Rows", 0) or 0))
        group.columns = max(group.columns, int(ds.get("Columns", 0) or 0))
        group.frames += int(ds.get("NumberOfFrames", 1) or 1)
        group.samples = max(group.samples, int(ds.get("SamplesPerPixel", 1) or 1))
        group.bits = max(group.bits, int(ds.get("BitsAllocated", 0) or 0))
    orphans = []
    for rel, uid, ref, labels in segs:
        if ref in groups:
            groups[ref].segs.append(rel)
            groups[ref].segment_labels.extend(labels)
        else:
            orphans.append((rel, uid))
    return groups, orphans


def hashed_case_id(series_uid: str, salt: str) -> str:
    """Case id of a DICOM series: a salted hash, so no UID reaches the shards."""
    return "dcm-" + hashlib.sha256(f"{salt}\0{series_uid}".encode()).hexdigest()[:20]


def read_series(root: str | os.PathLike, files: Iterable[str], seg_files: Iterable[str]):
    """Decode a series and its SEG masks.

    Returns ``(image, layers, label_names, affine, zooms)`` with the image in RAS+ canonical
    orientation (float32, rescaled values) and one label layer per group of non-overlapping
    segments.
    """
    root = Path(root)
    files = list(files)
    try:
        datasets = [pydicom.dcmread(root / f) for f in files]
        volume = hd.get_volume_from_series(datasets, dtype=np.float32)
    except Exception as exc:
        raise CaseError(
            f"DICOM series ({len(files)} files): cannot build a volume "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    image_nii = nib.as_closest_canonical(volume.to_nibabel())
    image = np.asanyarray(image_nii.dataobj)
    zooms = tuple(float(z) for z in image_nii.header.get_zooms()[:3])

    masks: list[tuple[str, np.ndarray]] = []
    for seg_file in seg_files:
        try:
            seg = hd.seg.segread(root / seg_file)
            for number in seg.segment_numbers:
                label = str(seg.get_segment_description(number).segment_label)
                seg_volume = seg.get_volume(segment_numbers=[number], combine_segments=False)
                on_grid = seg_volume.match_geometry(volume)
                mask_nii = nib.as_closest_canonical(on_grid.squeeze_channel().to_nibabel())
                masks.append((label, np.asanyarray(mask_nii.dataobj) > 0))
        except CaseError:
            raise
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            raise CaseError(f"a DICOM-SEG of the series cannot be mapped onto it ({problem})") from exc
    layers, names = pack_layers(masks, image.shape)
    return image, layers, names, image_nii.affine, zooms


def pack_layers(masks: list[tuple[str, np.ndarray]], shape: tuple[int, ...]):
    """Pack binary masks into as few label maps as possible; a name keeps one value.

    Masks sharing a name are merged (instances of one target). A mask overlapping what a layer
    already holds goes to the next layer, so overlapping structures both survive.
    """
    values: dict[str, int] = {}
    layers: list[np.ndarray] = []
    for name, mask in masks:
        value = values.setdefault(name, len(values) + 1)
        if mask.shape != tuple(shape):
            raise CaseError(f"mask {name!r} has shape {mask.shape}, image has {tuple(shape)}")
        for layer in layers:
            occupied = (layer != 0) & (layer != value)
            if not np.any(occupied & mask):
                layer[mask] = value
                break
        else:
            dtype = np.uint8 if len(masks) < 255 else np.uint16
            layer = np.zeros(shape, dtype)
            layer[mask] = value
            layers.append(layer)
    return layers, {v: k for k, v in values.items()}


