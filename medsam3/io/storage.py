"""Local paths and ``s3://`` URIs behind one small interface.

Every stage takes either. Files go through fsspec (s3fs for S3); Ray Data and Ray Train get a
pyarrow filesystem for the same location. An S3-compatible store (MinIO, Ceph, moto) is chosen
with the ``storage.endpoint_url`` config key (``configs/storage.yaml``); credentials come only
from the standard AWS environment variables or profile.

S3 has no rename, so a folder is published by uploading it beside its target first (the slow
part, which can fail without harm), then copying it into place server-side with its marker file
(e.g. ``manifest.json``) last: readers never see a marker next to a half-written folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from filelock import FileLock

ENDPOINT_ENV = "MEDSAM3_S3_ENDPOINT_URL"  # carries the config key to Ray workers and subprocesses
_options: dict[str, Any] = {"endpoint_url": None, "region": None, "cache_dir": "~/.cache/medsam3"}


class StorageError(OSError):
    """A remote location is missing, unreadable or not writable."""


def configure(options: Mapping[str, Any] | None) -> None:
    """Set this process's S3 options (the ``storage`` config section); workers call it too."""
    if not options:
        return
    for key in _options:
        if options.get(key) is not None:
            _options[key] = str(options[key])
    if _options["endpoint_url"]:
        os.environ[ENDPOINT_ENV] = _options["endpoint_url"]


def settings() -> dict[str, Any]:
    """The options in force, for passing to workers (``configure(settings())`` there)."""
    endpoint = _options["endpoint_url"] or os.environ.get(ENDPOINT_ENV)
    return {**_options, "endpoint_url": endpoint}


def is_remote(path: str | os.PathLike) -> bool:
    """True for ``s3://`` (and other fsspec protocols), False for local paths and ``file://``."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI."""
    text = os.fspath(base)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.fspath(Path(text, *parts))


def name(path: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return os.fspath(path).rstrip("/").rsplit("/", 1)[-1]


def split_name(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` → (NAME, PATH); a bare path or URI → ("", PATH)."""
    if "=" in spec.split("://", 1)[0]:
        label, _, path = spec.partition("=")
        return label, path
    return "", spec


def parent(path: str | os.PathLike) -> str:
    text = os.fspath(path).rstrip("/")
    return text.rsplit("/", 1)[0] if is_remote(text) else os.fspath(Path(text).absolute().parent)


def filesystem(path: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a local path or a URI."""
    text = os.fspath(path)
    if not is_remote(text):
        return fsspec.filesystem("file"), os.fspath(Path(text).absolute())
    protocol = text.split("://", 1)[0]
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        opts = settings()
        client: dict[str, Any] = {}
        if opts["endpoint_url"]:
            client["endpoint_url"] = opts["endpoint_url"]
        if opts["region"]:
            client["region_name"] = opts["region"]
        # a fresh instance per process state: cached instances would keep a stale endpoint
        kwargs = {"client_kwargs": client, "skip_instance_cache": True}
    fs, inner = fsspec.core.url_to_fs(text, **kwargs)
    return fs, inner


def arrow_filesystem(path: str | os.PathLike):
    """(pyarrow filesystem, path within it): what Ray Data's readers/writers and Ray Train's
    ``storage_filesystem`` take."""
    import pyarrow.fs as pafs

    text = os.fspath(path)
    if not is_remote(text):
        return pafs.LocalFileSystem(), os.fspath(Path(text).absolute())
    if not text.startswith(("s3://", "s3a://")):
        fs, inner = filesystem(text)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
    opts = settings()
    endpoint = opts["endpoint_url"]
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint, region=opts["region"] or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        scheme=endpoint.split("://", 1)[0] if endpoint else "https",
        # moto/MinIO style endpoints address buckets by path
        force_virtual_addressing=False,
    )
    return s3, text.split("://", 1)[1].rstrip("/")


def is_file(path: str | os.PathLike) -> bool:
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def read_text(path: str | os.PathLike) -> str:
    fs, inner = filesystem(path)
    try:
        with fs.open(inner, "r") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path} does not exist") from exc


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    fs, inner = filesystem(path)
    if not is_remote(path):
        Path(inner).parent.mkdir(parents=True, exist_ok=True)
    with fs.open(inner, "wb") as f:
        f.write(data)


def listing(path: str | os.PathLike) -> dict[str, tuple[int, str]]:
    """{relative path: (size, version tag)} of every file under a folder (empty if none)."""
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        return {}
    found = fs.find(inner, detail=True)
    root = inner.rstrip("/") + "/"
    out = {}
    for key, info in found.items():
        if info.get("type") == "directory" or key.rstrip("/") == inner.rstrip("/") or key.endswith("/"):
            continue  # directory markers (S3 keys ending in "/") are not files
        tag = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or "")
        out[key[len(root):] if key.startswith(root) else Path(key).name] = (int(info.get("size") or 0), tag)
    return out


def download(uri: str, local: str | os.PathLike, files: Iterable[str] | None = None) -> Path:
    """Copy a remote folder (or the listed files of it) to ``local``."""
    fs, inner = filesystem(uri)
    local = Path(local)
    names = sorted(files) if files is not None else sorted(listing(uri))
    if not names and not fs.exists(inner):
        raise StorageError(f"{uri} does not exist")
    for rel in names:
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{inner.rstrip('/')}/{rel}", os.fspath(target))
    return local


def upload(local: str | os.PathLike, uri: str) -> None:
    """Copy every file of a local folder under ``uri`` (keeping relative paths)."""
    fs, inner = filesystem(uri)
    local = Path(local)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(os.fspath(file), f"{inner.rstrip('/')}/{file.relative_to(local).as_posix()}")


def fetch_missing(uri: str, mirror: str | os.PathLike, files: Iterable[str | os.PathLike]) -> None:
    """Fetch those of ``files`` (paths inside ``mirror``, a local copy of ``uri``) that this
    machine lacks: a task on another node than the one that made the copy."""
    fs, inner = filesystem(uri)
    for file in map(Path, files):
        if file.exists():
            continue
        rel = file.relative_to(mirror).as_posix()
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_name(f".{file.name}.{uuid.uuid4().hex[:8]}")
        fs.get_file(f"{inner.rstrip('/')}/{rel}", os.fspath(partial))
        partial.rename(file)


def cache_folder(kind: str, uri: str) -> Path:
    """This machine's folder for local copies of ``uri`` (under ``storage.cache_dir``)."""
    return Path(settings()["cache_dir"]).expanduser() / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]


def local_copy(path: str | os.PathLike) -> Path:
    """A local path for reading ``path``: itself, absolute, when local (Ray tasks run in the
    workers' working directory, a joined cluster's rather than ours); for a URI (a folder or one
    file), a copy in the cache (``storage.cache_dir``), fetched again when the remote sizes or ETags
    change."""
    if not is_remote(path):
        return Path(path).absolute()
    uri = os.fspath(path).rstrip("/")
    fs, inner = filesystem(uri)
    cache = cache_folder("remote", uri)
    single = fs.isfile(inner)
    if single:
        info = fs.info(inner)
        remote = {name(uri): (int(info.get("size") or 0), str(info.get("ETag") or info.get("LastModified") or ""))}
    else:
        remote = listing(uri)
        if not remote:
            raise StorageError(f"{uri} does not exist or is empty")
    marker = cache / "listing.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # one download per node: actors and replicas sharing a node wait for the first one's copy
    with FileLock(os.fspath(cache.parent / f"{cache.name}.lock")):
        cached = json.loads(marker.read_text()) if marker.is_file() else None
        if cached != json.loads(json.dumps(remote)):
            staging = cache.parent / f".{cache.name}.{uuid.uuid4().hex[:8]}"
            if single:
                (staging / "files").mkdir(parents=True)
                fs.get_file(inner, os.fspath(staging / "files" / name(uri)))
            else:
                download(uri, staging / "files", remote)
            (staging / "listing.json").write_text(json.dumps(remote))
            shutil.rmtree(cache, ignore_errors=True)
            staging.rename(cache)
    return cache / "files" / name(uri) if single else cache / "files"


def replace_folder(staging: str, target: str, last: Iterable[str] = ("manifest.json",)) -> None:
    """Put the finished folder ``staging`` in place of ``target`` (both on one filesystem).

    Local: two renames. Remote: server-side copies of every file, files named in ``last`` after
    the rest, then the target's stale files are removed, then ``staging``.
    """
    if not is_remote(target):
        staging_path, target_path = Path(staging), Path(target)
        old = None
        if target_path.exists():
            old = target_path.parent / f".{target_path.name}.old-{uuid.uuid4().hex[:8]}"
            target_path.rename(old)
        staging_path.rename(target_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    fs, src = filesystem(staging)
    _, dst = filesystem(target)
    new, old, markers = sorted(listing(staging)), set(listing(target)), set(last)
    for marker in sorted(old & markers):
        fs.rm_file(f"{dst}/{marker}")  # the old folder stops looking complete first
    for rel in [r for r in new if r not in markers] + [r for r in new if r in markers]:
        fs.copy(f"{src}/{rel}", f"{dst}/{rel}")
    for rel in sorted(old - set(new)):  # stale files
        fs.rm_file(f"{dst}/{rel}")
    fs.rm(src, recursive=True)


def remove(path: str | os.PathLike) -> None:
    """Delete a folder or file if it exists."""
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


@contextmanager
def staged_output(out: str | os.PathLike, last: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty local folder; on success it replaces ``out`` (a local path or URI), on any
    error nothing at ``out`` changes."""
    out = os.fspath(out)
    if is_remote(out):
        with tempfile.TemporaryDirectory(prefix="medsam3-out-") as tmp:
            yield Path(tmp)
            staging = join(parent(out), f".{name(out)}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                upload(tmp, staging)
                replace_folder(staging, out, last)
            except BaseException:
                remove(staging)
                raise
        return
    target = Path(out).absolute()
    staging_path = target.parent / f".{target.name}.partial"
    if staging_path.exists():
        shutil.rmtree(staging_path)
    staging_path.mkdir(parents=True)
    try:
        yield staging_path
    except BaseException:
        shutil.rmtree(staging_path, ignore_errors=True)
        raise
    replace_folder(os.fspath(staging_path), os.fspath(target))
