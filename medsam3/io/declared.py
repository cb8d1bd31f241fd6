"""What a scan will decode to, read from its headers alone (no pixel is decoded): what a server
checks against its limits before it spends memory on an upload.

Every format ``medsam3.io.scan.read_scan`` accepts is covered, and every byte the reader will
hold counts: every axis, the stored type's item size, colour samples, a DICOM series' bits
allocated and frames. What the readers cannot use is refused here, before decoding: a 4D volume
without ``channel`` (with it, one channel is read through nibabel's proxy), more than four axes,
and arrays that are not numbers (NIfTI RGB or complex types, NumPy void, structured, object or
string arrays).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from medsam3.io.case import CaseError
from medsam3.io.dicom import scan_series
from medsam3.io.image2d import CONVERTED_TO_RGB
from medsam3.io.nifti import check_channel, squeezed
from medsam3.io.nrrd_file import nrrd_layout
from medsam3.io.scan import scan_kind

NUMERIC = "biuf"  # numpy dtype kinds a scan may hold: bool, signed, unsigned, float
NPZ_LOADED = ("imgs", "gts", "spacing")  # the arrays medsam3.io.npz.load_npz decodes (text_prompts aside)
DICOM_VOLUME_ITEMSIZE = 4  # read_series builds a float32 volume beside the files' own pixels


class Declared(NamedTuple):
    """A scan's declared size: its spatial shape and the bytes the reader will decode."""

    shape: tuple[int, ...]  # (rows, columns) of a 2D image; the stored axes of a volume
    decoded_bytes: int  # every array the reader holds at once, at its stored type

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64))


def declared(path: str | os.PathLike, channel: int | None = None) -> Declared:
    """The declared size of a scan (``channel``: the volume channel the reader will take from a
    4D NIfTI). :class:`CaseError` naming the file when a header is unreadable or declares what
    the readers refuse."""
    path = Path(path)
    kind = scan_kind(path)
    if kind == "dicom":
        return _dicom(path)
    try:
        return {"image": _image, "nifti": lambda p: _nifti(p, channel), "nrrd": _nrrd, "npz": _npz}[kind](path)
    except CaseError:
        raise
    except Exception as exc:
        raise CaseError(f"{path.name}: cannot read the {kind} header ({type(exc).__name__}: {exc})") from exc


def _image(path: Path) -> Declared:
    # the format plugins read the header only; Image.open would also run Pillow's own
    # decompression-bomb check, which refuses huge images without saying their size
    from PIL import BmpImagePlugin, ImageMode, JpegImagePlugin, PngImagePlugin, TiffImagePlugin

    for plugin in (PngImagePlugin.PngImageFile, JpegImagePlugin.JpegImageFile, TiffImagePlugin.TiffImageFile,
                   BmpImagePlugin.BmpImageFile):
        try:
            with plugin(os.fspath(path)) as image:
                (width, height), mode = image.size, image.mode
        except (SyntaxError, OSError, ValueError, TypeError, KeyError, IndexError):
            continue
        described = ImageMode.getmode(mode)
        per_pixel = np.dtype(described.typestr).itemsize * len(described.bands)
        if mode in CONVERTED_TO_RGB:  # the reader converts these to an RGB copy
            per_pixel += 3
        return Declared((int(height), int(width)), int(height) * int(width) * per_pixel)
    raise CaseError(f"{path.name}: not a PNG, JPEG, TIFF or BMP image")


def _nifti(path: Path, channel: int | None) -> Declared:
    header = nib.load(os.fspath(path)).header
    shape = tuple(int(n) for n in header.get_data_shape())
    dtype = header.get_data_dtype()
    if dtype.kind not in NUMERIC or dtype.fields is not None:
        raise CaseError(f"{path.name}: NIfTI data type {dtype} is not a number type (RGB and complex volumes "
                        "are not read)")
    shape = squeezed(shape)
    if len(shape) > 4:
        raise CaseError(f"{path.name}: a {len(shape)}D NIfTI {list(shape)}; a 3D volume (or 4D with channel=N) "
                        "is expected")
    if len(shape) == 4:
        check_channel(path.name, shape, channel)
        shape = shape[:3]  # one channel, read through the proxy
    return Declared(shape, int(np.prod(shape, dtype=np.float64)) * dtype.itemsize)


def _nrrd(path: Path) -> Declared:
    shape, dtype = nrrd_layout(path)
    return Declared(shape, int(np.prod(shape, dtype=np.float64)) * dtype.itemsize)


def _npz(path: Path) -> Declared:
    """``imgs``' spatial shape from the .npy headers inside the archive, and the bytes of the
    arrays the reader loads; an array that is not numbers, or larger than ``imgs`` (a mask must
    have its shape), is refused."""
    arrays: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(stream)
            arrays[member.removesuffix(".npy")] = (tuple(int(n) for n in shape), np.dtype(dtype))
    if "imgs" not in arrays:
        raise CaseError(f"{path.name}: NPZ lacks ['imgs'] (has {sorted(arrays)})")

    def size(name: str) -> int:
        shape, dtype = arrays[name]
        return int(np.prod(shape, dtype=np.float64)) * dtype.itemsize

    for name, (shape, dtype) in arrays.items():
        if name != "text_prompts" and (dtype.kind not in NUMERIC or dtype.fields is not None):
            raise CaseError(f"{path.name}: array {name!r} has dtype {dtype}; numbers are expected")
        if size(name) > size("imgs"):
            raise CaseError(f"{path.name}: array {name!r} of shape {list(shape)} ({dtype}) is larger than imgs "
                            f"{list(arrays['imgs'][0])} ({arrays['imgs'][1]})")
    imgs = arrays["imgs"][0]
    spatial = imgs[:2] if len(imgs) == 2 or (len(imgs) == 3 and imgs[-1] == 3) else imgs
    loaded = sum(size(name) for name in (*NPZ_LOADED, "text_prompts") if name in arrays)
    return Declared(spatial, loaded)


def _dicom(path: Path) -> Declared:
    groups, _ = scan_series(path)
    if len(groups) != 1:
        raise CaseError(f"{path.name}: expected one DICOM image series, found {len(groups)}")
    group = next(iter(groups.values()))
    if group.samples != 1:
        raise CaseError(f"{path.name}: a colour DICOM series ({group.samples} samples per pixel); greyscale "
                        "images are expected")
    shape = (group.rows, group.columns, group.frames)
    stored = -(-group.bits // 8)  # the files' own pixel arrays, as pydicom decodes them
    return Declared(shape, int(np.prod(shape, dtype=np.float64)) * (stored + DICOM_VOLUME_ITEMSIZE))
