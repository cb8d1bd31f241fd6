"""NRRD volumes (what 3D Slicer sends and reads back), through pynrrd.

An uploaded NRRD is untrusted, so before pynrrd decodes it: a detached header (``data file``,
which would make the reader open a path the sender chose) is refused, the declared sizes are
checked by the caller from the header alone (:func:`nrrd_layout`), and a compressed payload is
inflated once into a counter that stops at the declared size (pynrrd inflates without bound).
Geometry: ``space directions`` / ``space origin`` in the file's ``space`` (LPS or RAS) become a
RAS affine, the same convention as NIfTI.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from medsam3.io.case import CaseError

CHUNK = 2**20
# pynrrd's type names → numpy (only the scalar types a scan or label map can have)
TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16, "int32": np.int32,
         "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64, "float": np.float32, "double": np.float64}
SPACES = {"left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1), "right-anterior-superior": (1, 1, 1),
          "ras": (1, 1, 1), "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


def read_checked_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The header of an attached-data NRRD file and the byte offset of its data; CaseError names
    the file and the problem."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            offset = fh.tell()
    except (nrrd.NRRDError, ValueError, UnicodeDecodeError, StopIteration, OSError) as exc:
        raise CaseError(f"{path.name}: not a readable NRRD header ({type(exc).__name__}: {exc})") from exc
    if "data file" in header or "datafile" in header:
        raise CaseError(f"{path.name}: a detached NRRD header (data file) is not accepted: send one .nrrd file")
    if str(header.get("type")) not in TYPES:
        raise CaseError(f"{path.name}: NRRD type {header.get('type')!r} is not a scalar image type")
    return header, offset


def nrrd_layout(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """The declared spatial shape and stored type (header only: nothing is decoded)."""
    header, _ = read_checked_header(path)
    return _spatial_sizes(header, Path(path).name), np.dtype(TYPES[header["type"]])


def _spatial_sizes(header: dict, name: str) -> tuple[int, ...]:
    sizes = tuple(int(n) for n in np.atleast_1d(header["sizes"]))
    if len(sizes) != 3:
        raise CaseError(f"{name}: a {len(sizes)}D NRRD; a 3D volume is expected")
    return sizes


def _check_payload(path: Path, header: dict, offset: int) -> None:
    """The data holds no more than the header declares (a compressed one is inflated into a counter)."""
    expected = int(np.prod(np.atleast_1d(header["sizes"]), dtype=np.int64)) * np.dtype(TYPES[header["type"]]).itemsize
    allowed = expected + max(int(header.get("byte skip", 0)), 0)
    encoding = str(header.get("encoding", "raw")).lower()
    if encoding in ("raw", "txt", "text", "ascii"):
        return  # pynrrd reads at most the declared bytes (raw) or the file's own text
    if encoding not in ("gzip", "gz"):
        raise CaseError(f"{path.name}: NRRD encoding {encoding!r} is not supported (raw, gzip or ascii)")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)
    inflated = 0
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(CHUNK)
            while data and not inflater.eof:
                inflated += len(inflater.decompress(data, CHUNK))  # at most CHUNK bytes held at once
                if inflated > allowed:
                    raise CaseError(f"{path.name}: the compressed NRRD data inflates beyond the {expected} bytes "
                                    "its header declares")
                data = inflater.unconsumed_tail or fh.read(CHUNK)
    except (zlib.error, OSError) as exc:
        raise CaseError(f"{path.name}: corrupt gzip NRRD data ({exc})") from exc


def nrrd_affine(header: dict, name: str = "") -> np.ndarray:
    """The voxel → RAS (mm) affine of a NRRD header (identity spacing when it has no space)."""
    affine = np.eye(4)
    if "space directions" not in header:
        spacings = header.get("spacings")
        if spacings is not None:
            affine[:3, :3] = np.diag(np.nan_to_num(np.asarray(spacings, float)[:3], nan=1.0))
        return affine
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in SPACES:
        raise CaseError(f"{name}: NRRD space {space!r} is not supported (LPS, RAS or LAS)")
    directions = np.asarray(header["space directions"], float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise CaseError(f"{name}: NRRD space directions {directions.tolist()} are not three spatial axes")
    origin = np.asarray(header.get("space origin", np.zeros(3)), float)
    flip = np.diag(SPACES[space])
    affine[:3, :3] = flip @ directions.T  # pynrrd: one row per axis
    affine[:3, 3] = flip @ np.nan_to_num(origin)
    return affine


def load_nrrd(path: str | os.PathLike) -> nib.Nifti1Image:
    """A checked NRRD volume as an image in its file's voxel order with its RAS affine."""
    path = Path(path)
    header, offset = read_checked_header(path)
    _spatial_sizes(header, path.name)
    _check_payload(path, header, offset)
    try:
        data, header = nrrd.read(os.fspath(path), index_order="F")
    except Exception as exc:  # pynrrd raises many types for truncated / corrupt files
        raise CaseError(f"{path.name}: cannot read the NRRD data ({type(exc).__name__}: {exc})") from exc
    return nib.Nifti1Image(np.asarray(data), nrrd_affine(header, path.name))


def write_nrrd(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """An image (a label map) as a gzip NRRD in LPS space, as Slicer writes them."""
    lps = np.diag([-1.0, -1.0, 1.0]) @ image.affine[:3, :]
    header = {"space": "left-posterior-superior", "space directions": lps[:, :3].T, "space origin": lps[:, 3],
              "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(os.fspath(path), np.asanyarray(image.dataobj), header, index_order="F")
    return Path(path)
