"""Uploaded scans → a private temporary folder, checked, then read by ``medsam3.io.scan``.

Nothing the client sends becomes a path: the file is stored under a fixed name with a suffix
from a closed list, and a zip (one DICOM series) is extracted member by member after refusing
absolute paths, ``..`` components and symlinks.
"""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

SUFFIXES = (".nii.gz", ".nii", ".npz", ".png", ".jpg", ".jpeg", ".zip")


class UploadError(ValueError):
    """An upload that cannot be accepted; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def upload_suffix(filename: str | None) -> str:
    name = (filename or "").lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise UploadError(415, f"unsupported file type {Path(name).suffix or '(none)'!r}: send PNG/JPEG, "
                           "NIfTI (.nii, .nii.gz), NPZ, or a zip of one DICOM series")


def store_upload(data: bytes, filename: str | None, folder: Path, max_files: int = 5000) -> Path:
    """Write the upload into ``folder``; returns the path to read (a file, or the extracted series)."""
    suffix = upload_suffix(filename)
    if suffix != ".zip":
        path = folder / f"upload{suffix}"
        path.write_bytes(data)
        return path
    archive = folder / "upload.zip"
    archive.write_bytes(data)
    target = folder / "series"
    target.mkdir()
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = [m for m in zipped.infolist() if not m.is_dir()]
            if not members:
                raise UploadError(422, "the zip holds no files")
            if len(members) > max_files:
                raise UploadError(413, f"the zip holds {len(members)} files; at most {max_files} are accepted")
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
                    sink.write(source.read())
    except zipfile.BadZipFile as exc:
        raise UploadError(422, f"not a valid zip file ({exc})") from exc
    finally:
        archive.unlink(missing_ok=True)
    return target
