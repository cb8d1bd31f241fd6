"""Uploaded scans → a private temporary folder, checked, then read by ``medsam3.io.scan``.

Nothing the client sends becomes a path: the file is stored under a fixed name with a suffix
from a closed list, and a zip (one DICOM series) is extracted member by member after refusing
absolute paths, ``..`` components and symlinks. Everything is copied in chunks: the bytes a zip
member expands to are counted as they are written (headers can lie), and extraction stops with
413 when the total or the expansion ratio passes its limit.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fastapi.responses import JSONResponse

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".npz", ".png", ".jpg", ".jpeg", ".zip")


class UploadError(ValueError):
    """An upload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


def error_response(exc: Exception) -> JSONResponse:
    """The JSON answer to a refused request (an ``UploadError`` or a MONAI Label ``ProtocolError``)."""
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=getattr(exc, "headers", None))


def unreadable(name: str | None, path: Path, exc: Exception) -> UploadError:
    """A 422 for an upload the readers refused, naming the client's file (not the server's path)."""
    return UploadError(422, f"{name}: {str(exc).replace(str(path), 'upload')}")


def upload_suffix(filename: str | None) -> str:
    name = (filename or "").lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UploadError(415, f"unsupported file type {Path(name).suffix or '(none)'!r}: send PNG/JPEG, "
                           "NIfTI (.nii, .nii.gz), NRRD, NPZ, or a zip of one DICOM series")


CHUNK = 2**20


@dataclass(frozen=True)
class ZipLimits:
    """What a zipped DICOM series may expand to."""

    max_files: int = 5000
    max_bytes: int = 2 * 2**30  # all members together, uncompressed
    max_ratio: float = 100.0  # uncompressed / compressed bytes (CT series compress ~2-5x)


def store_upload(source: BinaryIO, filename: str | None, folder: Path, limits: ZipLimits = ZipLimits()) -> Path:
    """Copy the upload into ``folder``; returns the path to read (a file, or the extracted series)."""
    suffix = upload_suffix(filename)
    path = folder / f"upload{suffix}"
    with open(path, "wb") as sink:
        shutil.copyfileobj(source, sink, CHUNK)
    if suffix != ".zip":
        return path
    try:
        return extract_series(path, folder / "series", limits)
    finally:
        path.unlink(missing_ok=True)


def extract_series(archive: Path, target: Path, limits: ZipLimits) -> Path:
    """Extract a zip safely into ``target`` (see the module doc)."""
    target.mkdir()
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if not members:
                raise UploadError(422, "the zip holds no files")
            if len(members) > limits.max_files:
                raise UploadError(413, f"the zip holds {len(members)} files; at most {limits.max_files} are accepted")
            written = 0
            compressed = archive.stat().st_size  # what arrived, not what the headers claim
            for member in members:
                name = PurePosixPath(member.filename.replace("\\", "/"))
                if name.is_absolute() or member.filename.startswith(("/", "\\")) or ":" in name.parts[0]:
                    raise UploadError(422, f"zip member {member.filename!r} has an absolute path")
                if ".." in name.parts:
                    raise UploadError(422, f"zip member {member.filename!r} leaves the archive ('..')")
                if stat.S_ISLNK(member.external_attr >> 16):
                    raise UploadError(422, f"zip member {member.filename!r} is a symbolic link")
                out = target.joinpath(*name.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zipped.open(member) as source, open(out, "wb") as sink:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > limits.max_bytes or written > limits.max_ratio * max(compressed, CHUNK):
                            raise UploadError(413, f"the zip expands beyond its limits (at {written} bytes from "
                                                   f"{compressed} compressed; at most {limits.max_bytes} bytes "
                                                   f"and a ratio of {limits.max_ratio:g})")
                        sink.write(chunk)
    except zipfile.BadZipFile as exc:
        raise UploadError(422, f"not a valid zip file ({exc})") from exc
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, OSError, EOFError) as exc:
        raise UploadError(422, f"cannot extract the zip ({type(exc).__name__}: {exc})") from exc
    return target
