"""Read one scan to segment (no labels): a PNG/JPEG, a NIfTI or NRRD file, an NPZ file or a DICOM series folder.

``predict`` and ``serve`` use it; the arrays follow the reader contract of ``medsam3.io.case``
(3D volumes RAS+ canonical), so inference cuts slices exactly as ``prepare`` does. The scan
keeps what writing a result in the input's own terms needs: the original affine (NIfTI, NRRD), the
source DICOM datasets (DICOM-SEG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medsam3.io.case import Case, CaseError
from medsam3.io.dicom import read_series, scan_series
from medsam3.io.image2d import read_image
from medsam3.io.nifti import canonical, load_canonical
from medsam3.io.npz import load_npz, npz_geometry, to_canonical
from medsam3.io.nrrd_file import load_nrrd
from medsam3.transforms import normalize_modality

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
KINDS = ("image", "nifti", "nrrd", "npz", "dicom")


@dataclass
class Scan:
    """A decoded scan and where it came from."""

    case: Case
    kind: str  # one of KINDS
    name: str  # file or folder name, for output file names
    source_affine: np.ndarray | None = None  # NIfTI, NRRD: the file's own affine (before canonical reorientation)
    dicom_files: list[Path] = field(default_factory=list)

    @property
    def is_3d(self) -> bool:
        return self.case.is_3d


def scan_kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith(".nrrd"):
        return "nrrd"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(IMAGE_SUFFIXES):
        return "image"
    raise CaseError(f"{path.name}: unsupported input (expected PNG/JPEG, .nii/.nii.gz, .nrrd, .npz or a DICOM series "
                    "folder)")


def read_scan(path: str | os.PathLike, modality: str | None = None, channel: int | None = None,
              allow_pickle: bool = False) -> Scan:
    """Decode a scan; any problem raises :class:`CaseError` naming the file and what is wrong.

    ``modality`` overrides what the file says (DICOM Modality, an NPZ name prefix such as
    ``CT_``). A NIfTI or NRRD file carries no modality: with none given, values below -500 mark
    it as CT in Hounsfield units (it is then windowed like CT in ``prepare``), otherwise UNKNOWN.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(f"{path}: no such file or folder")
    kind = scan_kind(path)
    stem = path.name.removesuffix(".gz").removesuffix(".seg.nrrd").rsplit(".", 1)[0] if kind != "dicom" else path.name
    forced = normalize_modality(modality) if modality else None
    if kind == "image":
        image = read_image(path)
        case = Case(stem, "predict", forced or "UNKNOWN", image, [], {}, (1.0, 1.0, 1.0), None)
        return Scan(case, kind, stem)
    if kind == "nifti":
        image, affine, zooms, scale = load_canonical(path, channel)
        try:
            source_affine = nib.load(os.fspath(path)).affine
        except Exception as exc:
            raise CaseError(f"{path.name}: cannot read the NIfTI header ({exc})") from exc
        case = Case(stem, "predict", forced or _ct_or_unknown(image, scale), image, [], {}, zooms, affine, scale)
        return Scan(case, kind, stem, source_affine=source_affine)
    if kind == "nrrd":
        volume = load_nrrd(path)
        image, affine, zooms = canonical(np.asanyarray(volume.dataobj), volume.affine, path, channel)
        case = Case(stem, "predict", forced or _ct_or_unknown(image, (1.0, 0.0)), image, [], {}, zooms, affine)
        return Scan(case, kind, stem, source_affine=volume.affine)
    if kind == "npz":
        data = load_npz(path, allow_pickle=allow_pickle, require_masks=False)
        imgs = data["imgs"]
        prefix = normalize_modality(stem.split("_")[0])
        found = forced or (prefix if prefix in ("CT", "MR", "PET", "US", "XR") else "UNKNOWN")
        two_d = imgs.ndim == 2 or (imgs.ndim == 3 and imgs.shape[-1] == 3)
        spacing, affine = npz_geometry(data, two_d, path.name)
        image = imgs if two_d else to_canonical(imgs)
        return Scan(Case(stem, "predict", found, image, [], {}, spacing, affine), kind, stem)
    groups, _ = scan_series(path)
    if len(groups) != 1:
        raise CaseError(f"{path.name}: expected one DICOM image series, found {len(groups)}")
    group = next(iter(groups.values()))
    try:
        image, _, _, affine, zooms = read_series(path, group.files, [])
    except CaseError as exc:
        raise CaseError(f"{path.name}: {exc}") from exc
    case = Case(stem, "predict", forced or normalize_modality(group.modality), image, [], {}, zooms, affine)
    return Scan(case, kind, stem, dicom_files=[path / f for f in group.files])


def _ct_or_unknown(image: np.ndarray, scale: tuple[float, float]) -> str:
    """A volume file carries no modality: values below -500 mark CT in Hounsfield units."""
    low = float(np.min(image[..., :: max(1, image.shape[2] // 16)])) * scale[0] + scale[1]
    return "CT" if low < -500 else "UNKNOWN"


def describe(scan: Scan) -> dict[str, Any]:
    """Shape, spacing and modality of a scan, for summaries."""
    return {"name": scan.name, "kind": scan.kind, "shape": list(scan.case.image.shape),
            "spacing_mm": [round(float(s), 4) for s in scan.case.spacing], "modality": scan.case.modality}
