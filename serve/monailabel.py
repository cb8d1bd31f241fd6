"""The MONAI Label protocol, so that 3D Slicer's and OHIF's MONAI Label modules (and MONAI
Label's Python client) can use the endpoint: what ``/info/`` lists, how an ``/infer`` request's
``params`` become prompts, where clicks and boxes land on the model's planes, and the
datastore / session image store. The routes are in ``serve/monailabel_routes.py`` and run on
the same ingress, limits, keys, model replicas and batching as ``/v1``.

Each served model is listed twice: ``ID`` (type ``segmentation``: text prompts, the viewer's
auto-segmentation) and ``ID-interactive`` (type ``deepgrow``: one label with foreground /
background clicks and an ROI box). Label ids are stable: the prompts a checkpoint was trained on
(``medsam3_export.json``), else its vocabulary's, sorted, numbered from 1.

Coordinates arrive as voxel indices of the uploaded file (NIfTI, NRRD; a DICOM series or NPZ:
of the RAS-canonical grid; 2D: x = column, y = row). They are mapped through the file's affine
to the canonical grid and from there to the display planes the model sees, so a click lands on
the voxel it was placed on whatever the file's orientation.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INTERACTIVE = "-interactive"
EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".dcm", ".png")
DEFAULT_EXTENSION = {"nifti": ".nii.gz", "nrrd": ".nrrd", "dicom": ".dcm", "image": ".png", "npz": ".nii.gz"}
MIME = {".nii.gz": "application/gzip", ".nii": "application/octet-stream", ".nrrd": "application/octet-stream",
        ".dcm": "application/dicom", ".png": "image/png"}
OUTPUTS = ("image", "json", "all", "dicom_seg")
DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "int32": np.int32, "float32": np.float32}


class ProtocolError(ValueError):
    """A MONAI Label request that cannot be answered; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- /info -------------------------------------------------------------------------------------

def label_ids(trained: set[str] | None, vocabulary_prompts: list[str]) -> dict[str, int]:
    """A model's labels → stable ids 1..N (trained prompts, else the vocabulary's, sorted)."""
    names = sorted(trained) if trained else sorted(set(vocabulary_prompts))
    return {name: i for i, name in enumerate(names, start=1)}


def info(models: dict[str, dict[str, int]], trackers: dict[str, bool], datastore: dict[str, Any],
         version: str) -> dict[str, Any]:
    """The body of ``GET /info/``: MONAI Label's app description with every model twice."""
    listed: dict[str, Any] = {}
    for name, labels in models.items():
        modes = ["slices", "propagate"] if trackers[name] else ["slices"]
        listed[name] = {
            "type": "segmentation", "dimension": 3, "labels": labels,
            "description": f"MedSAM3 {name}: text prompts. Segments the labels named in the option 'prompts' "
                           "(comma-separated, any text), or every label.",
            "config": {"prompts": "", "mode": modes}}
        listed[name + INTERACTIVE] = {
            "type": "deepgrow", "dimension": 3, "labels": labels,
            "description": f"MedSAM3 {name}: the segment's name is the text prompt; foreground clicks keep the "
                           "objects they touch (two or more on a slice also make a box), background clicks "
                           "remove theirs, an ROI is a box prompt and confines the answer.",
            "config": {"mode": modes}}
    merged = sorted({label for labels in models.values() for label in labels})
    return {"name": "MedSAM3", "description": "Text-prompted segmentation with SAM3 fine-tuned on medical images",
            "version": version, "labels": merged, "models": listed, "trainers": {}, "strategies": {},
            "scoring": {}, "train_stats": {}, "datastore": datastore}


def vocabulary_prompts(plans) -> list[str]:
    """The text prompts a checkpoint's vocabulary resolves its label names to."""
    return [plans.vocab.resolve(name).prompt for name in plans.vocab.names()]


def served_model(name: str, served: dict) -> tuple[str, bool]:
    """``/infer/{model}`` → (served model id, interactive?); ProtocolError 404 when unknown."""
    interactive = name.endswith(INTERACTIVE) and name.removesuffix(INTERACTIVE) in served
    model = name.removesuffix(INTERACTIVE) if interactive else name
    if model not in served:
        raise ProtocolError(404, f"unknown model {name!r}; see /info/")
    return model, interactive


# --- /infer params -----------------------------------------------------------------------------

@dataclass
class InferParams:
    """What an ``/infer`` request asks, from its ``params`` JSON."""

    prompts: list[str]
    foreground: list[list[int]] = field(default_factory=list)
    background: list[list[int]] = field(default_factory=list)
    roi: list[int] | None = None  # [i0, i1, j0, j1, k0, k1] (Slicer's ROI), each pair sorted
    mode: str = "slices"
    extension: str | None = None
    dtype: Any = np.uint8


def _points(value: Any, key: str) -> list[list[int]]:
    if value in (None, ""):
        return []
    try:
        points = [[int(round(float(c))) for c in point] for point in value]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(422, f"params.{key}: a list of [i, j, k] voxel indices is expected") from exc
    if any(len(p) not in (2, 3) for p in points):
        raise ProtocolError(422, f"params.{key}: each point is [i, j, k] (or [x, y] on a 2D image)")
    return points


def _names(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(v).strip() for v in items if str(v).strip()]


def parse_params(text: str | None, labels: dict[str, int], interactive: bool, max_prompts: int) -> InferParams:
    """The request's ``params`` JSON → :class:`InferParams` (ProtocolError 422 naming the problem).

    Text prompts: ``label`` (the interactive model's segment), or ``labels`` / ``prompts`` (a list
    or comma-separated text; the viewer's option field); default every label of the model."""
    params = json_object(text)
    if interactive:
        prompts = _names([params.get("label", "")])
        if len(prompts) != 1:
            raise ProtocolError(422, "params.label: the interactive model segments one label (the segment's name)")
    else:
        prompts = _names(params.get("labels")) or _names(params.get("prompts")) or list(labels)
    if not prompts:
        raise ProtocolError(422, "the model has no labels: name the text prompts in params.labels")
    if len(prompts) > max_prompts:
        every = "" if _names(params.get("labels")) or _names(params.get("prompts")) else \
            " (the model's labels, asked by default): name the ones to segment in params.labels or the option prompts"
        raise ProtocolError(422, f"{len(prompts)} labels: at most {max_prompts} per request{every}")
    roi = params.get("roi") or None
    if roi is not None:
        try:
            roi = [int(round(float(v))) for v in roi]
        except (TypeError, ValueError) as exc:
            raise ProtocolError(422, "params.roi: [i0, i1, j0, j1, k0, k1] voxel indices are expected") from exc
        if len(roi) not in (4, 6):
            raise ProtocolError(422, "params.roi: [i0, i1, j0, j1, k0, k1] voxel indices are expected")
        roi = [v for a, b in zip(roi[::2], roi[1::2], strict=True) for v in sorted((a, b))]
    extension = params.get("result_extension") or None
    if extension is not None and extension not in EXTENSIONS:
        raise ProtocolError(422, f"params.result_extension {extension!r} is not one of {', '.join(EXTENSIONS)}")
    dtype = str(params.get("result_dtype") or "uint8")
    if dtype not in DTYPES:
        raise ProtocolError(422, f"params.result_dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    mode = str(params.get("mode") or "slices")
    return InferParams(prompts, _points(params.get("foreground"), "foreground"),
                       _points(params.get("background"), "background"), roi, mode, extension, DTYPES[dtype])


def json_object(text: str | None) -> dict[str, Any]:
    """A form field holding a JSON object (ProtocolError 422 otherwise)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise ProtocolError(422, f"params is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ProtocolError(422, "params must be a JSON object")
    return value


# --- coordinates ---------------------------------------------------------------------------------

class VoxelFrame:
    """Voxel indices of the uploaded file → the RAS-canonical grid → display planes (the model's
    view: ``medsam3.transforms.display_slice`` along ``axis``)."""

    def __init__(self, scan, axis: int):
        self.is_3d = scan.is_3d
        self.shape = scan.case.image.shape if scan.is_3d else scan.case.image.shape[:2]
        self.axis = axis
        self.to_canonical = None
        if scan.is_3d and scan.source_affine is not None:
            self.to_canonical = np.linalg.inv(scan.case.affine) @ scan.source_affine

    def canonical(self, points: list[list[int]], what: str) -> np.ndarray:
        """(N, 3) canonical voxel indices ((N, 2) row, column on a 2D image); ProtocolError 422
        for a point outside the image."""
        if not points:
            return np.zeros((0, len(self.shape)), int)
        if not self.is_3d:
            found = np.array([[p[1], p[0]] for p in points])  # [x, y] → (row, column)
        else:
            if any(len(p) != 3 for p in points):
                raise ProtocolError(422, f"{what}: a volume needs [i, j, k] points")
            found = np.asarray(points, float)
            if self.to_canonical is not None:
                found = (self.to_canonical @ np.c_[found, np.ones(len(found))].T).T[:, :3]
            found = np.rint(found).astype(int)
        outside = [points[n] for n, p in enumerate(found) if np.any(p < 0) or np.any(p >= self.shape)]
        if outside:
            raise ProtocolError(422, f"{what}: point {outside[0]} is outside the image of shape {list(self.shape)}")
        return found

    def plane_xy(self, point: np.ndarray) -> tuple[int, int, int]:
        """A canonical voxel → (column, row, slice) on the display planes (2D: slice 0)."""
        if not self.is_3d:
            return int(point[1]), int(point[0]), 0
        a, b = [i for i in range(3) if i != self.axis]
        return self.shape[a] - 1 - int(point[a]), self.shape[b] - 1 - int(point[b]), int(point[self.axis])

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[list[float], range]:
        """Canonical voxel bounds (inclusive) → the display box x0,y0,x1,y1 and the slice range."""
        corners = [self.plane_xy(lo), self.plane_xy(hi)]
        xs, ys, zs = zip(*corners, strict=True)
        return [min(xs), min(ys), max(xs) + 1, max(ys) + 1], range(min(zs), max(zs) + 1)

    def roi_bounds(self, roi: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Slicer's ROI [i0, i1, j0, j1, k0, k1] → canonical (lo, hi) inclusive corners."""
        if not self.is_3d:
            corners = self.canonical([[roi[0], roi[2]], [roi[1], roi[3]]], "params.roi")
        else:
            if len(roi) != 6:
                raise ProtocolError(422, "params.roi: a volume needs [i0, i1, j0, j1, k0, k1]")
            corners = self.canonical([[roi[0], roi[2], roi[4]], [roi[1], roi[3], roi[5]]], "params.roi")
        return corners.min(0), corners.max(0)


def box_text(box: list[float], z: int | None) -> str:
    """A box in ``medsam3.inference.box_from_text``'s notation (``@z=N``: on slice N only)."""
    text = ",".join(f"{v:g}" for v in box)
    return text if z is None else f"{text}@z={z}"


@dataclass
class Placement:
    """Where a request's ROI and clicks land on one decoded scan (computed once per request)."""

    boxes: list[str | None]  # every prompt's box text (medsam3.inference.box_from_text)
    bounds: tuple[np.ndarray, np.ndarray] | None  # the ROI's canonical corners (inclusive)
    foreground: np.ndarray  # canonical voxels of the clicks
    background: np.ndarray
    clicks: list | None = None  # every prompt's tracker seed ([[x, y, label], ...], z), or None


def place(params: InferParams, scan, axis: int) -> Placement:
    """The box of every prompt (an ROI, or the extreme points of two or more foreground clicks on
    one slice), the ROI's canonical bounds and the clicks' canonical voxels.

    An ROI is a box prompt on every slice it spans (``slices``), or seeds propagation from its
    middle slice (``propagate``). Clicks make a box on their own slice (the first slice with two);
    with ``propagate`` on a volume they seed the tracker as points instead, on the slice with the
    most foreground clicks (with that slice's background clicks)."""
    frame = VoxelFrame(scan, axis)
    bounds = frame.roi_bounds(params.roi) if params.roi else None
    foreground = frame.canonical(params.foreground, "params.foreground")
    background = frame.canonical(params.background, "params.background")
    box: str | None = None
    if bounds is not None:
        xy, zs = frame.box(*bounds)
        box = box_text(xy, zs[len(zs) // 2] if params.mode == "propagate" and frame.is_3d else None)
    elif params.mode == "propagate" and frame.is_3d and len(foreground):
        planes = [(frame.plane_xy(p), label) for points, label in ((foreground, 1), (background, 0)) for p in points]
        counts = [xyz[2] for xyz, label in planes if label == 1]
        z = max(sorted(set(counts)), key=counts.count)
        seed = [[x + 0.5, y + 0.5, label] for (x, y, k), label in planes if k == z]  # the voxel's centre
        return Placement([None] * len(params.prompts), None, foreground, background, [(seed, z)] * len(params.prompts))
    else:
        on_plane: dict[int, list] = {}
        for point in foreground:
            on_plane.setdefault(frame.plane_xy(point)[2], []).append(point)
        for z, points in sorted(on_plane.items()):
            if len(points) >= 2:
                xy, _ = frame.box(np.min(points, 0), np.max(points, 0))
                box = box_text(xy, z if frame.is_3d else None)
                break
    return Placement([box] * len(params.prompts), bounds, foreground, background)


def refine(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """A prompt's mask after the clicks and the ROI: outside the ROI is cleared; with foreground
    clicks only the connected objects they touch are kept; objects a background click touches go."""
    from scipy import ndimage

    if placement.bounds is not None:
        confined = np.zeros_like(mask)
        window = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(*placement.bounds, strict=True))
        confined[window] = mask[window]
        mask = confined
    foreground, background = placement.foreground, placement.background
    if not len(foreground) and not len(background):
        return mask
    objects, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    keep = {int(objects[tuple(p)]) for p in foreground} - {0} if len(foreground) else set(np.unique(objects)) - {0}
    keep -= {int(objects[tuple(p)]) for p in background}
    return np.isin(objects, sorted(keep))


# --- answers ------------------------------------------------------------------------------------

def label_values(labels: dict[str, int], prompts: list[str], interactive: bool) -> tuple[dict[str, int], list[int]]:
    """(``label_names`` of the answer, the value of each prompt in the label map).

    A segmentation model answers with the ids of ``/info`` and lists all its labels (3D Slicer
    maps value v to the v-th name in id order), free-text prompts taking the next ids in request
    order; the interactive model answers one label as value 1, as MONAI Label's deepgrow does."""
    if interactive:
        return {prompts[0]: 1}, [1]
    names = dict(labels)
    for prompt in prompts:
        names.setdefault(prompt, len(names) + 1)
    return names, [names[p] for p in prompts]


def result_extension(params: InferParams, output: str | None, kind: str) -> str:
    """The answer file's format: asked (``result_extension``, ``output=dicom_seg``) or the
    input's own (DICOM → DICOM-SEG); ProtocolError 422 when it does not fit the input."""
    extension = ".dcm" if output == "dicom_seg" else params.extension or DEFAULT_EXTENSION[kind]
    if extension == ".dcm" and kind != "dicom":
        raise ProtocolError(422, "a DICOM-SEG answer needs a DICOM series as input")
    if (extension == ".png") != (kind == "image"):
        raise ProtocolError(422, f"result_extension {extension}: a 2D image answers as .png, a volume as "
                                 ".nii.gz, .nii, .nrrd (or .dcm for a DICOM series)")
    return extension


def write_result(scan, masks: list[np.ndarray], prompts: list[str], values: list[int], extension: str,
                 dtype: Any, path: Path) -> Path:
    """The label map in the input's geometry (NIfTI, NRRD, PNG) or a DICOM-SEG of the masks."""
    from PIL import Image

    from medsam3.io.write import label_map, source_label_image, write_dicom_seg, write_label_image

    if extension == ".dcm":
        return write_dicom_seg(masks, prompts, scan.case.affine, scan.dicom_files, path)
    if extension == ".png":
        Image.fromarray(label_map(masks, values)).save(path)
        return path
    image = source_label_image(masks, scan.case.affine, scan.source_affine, values, dtype)
    return write_label_image(image, path)


# --- the image store (datastore and sessions) ---------------------------------------------------

def namespace(authorization: str | None, auth_on: bool) -> str:
    """Whose images: one namespace per API key (its digest), one shared when auth is off."""
    if not auth_on:
        return "open"
    return hashlib.sha256((authorization or "").partition(" ")[2].strip().encode()).hexdigest()[:24]


class ImageStore:
    """Uploaded images kept between requests, on disk: ``root/NAMESPACE/KIND/DIGEST/`` holding
    ``meta.json`` and the checked upload (a file, or a DICOM series folder). Ids never become
    paths (the folder is a digest of the id); entries are moved in atomically; entries unused
    for ``ttl_s`` go. Each namespace (an API key) holds at most ``key_bytes`` and makes room by
    dropping its own least recently used images, never another key's; when the whole store
    (``max_bytes``) is full of other keys' images, an upload is refused (507).
    With several ingress replicas, ``root`` must be a filesystem they share."""

    KINDS = ("datastore", "session")

    def __init__(self, root: str | os.PathLike, max_bytes: int, ttl_s: float, key_bytes: int | None = None):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.key_bytes = min(int(key_bytes or max_bytes), self.max_bytes)
        self.ttl_s = float(ttl_s)
        self.incoming = self.root / ".incoming"  # uploads being checked (same filesystem: moved in)
        self.incoming.mkdir(parents=True, exist_ok=True)

    def _folder(self, space: str, kind: str, image_id: str) -> Path:
        return self.root / space / kind / hashlib.sha256(image_id.encode()).hexdigest()[:32]

    def put(self, space: str, kind: str, image_id: str, upload: Path, meta: dict[str, Any],
            ttl_s: float | None = None) -> dict[str, Any]:
        """Move a checked upload (file or folder) in as ``image_id``, replacing an older one."""
        size = sum(f.stat().st_size for f in upload.rglob("*") if f.is_file()) if upload.is_dir() else \
            upload.stat().st_size
        if size > self.key_bytes:
            raise ProtocolError(413, f"the image ({size} bytes) is larger than a key's share of the store "
                                     f"({self.key_bytes} bytes)")
        target = self._folder(space, kind, image_id)
        self.make_room(space, size, replacing=target)
        now = time.time()
        meta = {**meta, "id": image_id, "name": upload.name, "bytes": size, "created": now, "last_access": now,
                "ttl_s": float(ttl_s or self.ttl_s)}
        staging = self.root / space / ".staging" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        shutil.move(os.fspath(upload), staging / upload.name)
        _write_meta(staging, meta)
        target.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if target.exists():
            old = target.with_name(target.name + f".old-{uuid.uuid4().hex}")
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return meta

    def get(self, space: str, kind: str, image_id: str) -> tuple[Path, dict[str, Any]] | None:
        """(the stored upload, its meta) or None; marks it used."""
        folder = self._folder(space, kind, image_id)
        meta = self._meta(folder)
        if meta is None or self._expired(meta, time.time()):
            return None
        meta["last_access"] = time.time()
        _write_meta(folder, meta)
        return folder / meta["name"], meta

    def remove(self, space: str, kind: str, image_id: str) -> dict[str, Any] | None:
        folder = self._folder(space, kind, image_id)
        meta = self._meta(folder)
        if meta is not None:
            shutil.rmtree(folder, ignore_errors=True)
        return meta

    def entries(self, space: str, kind: str) -> list[dict[str, Any]]:
        now = time.time()
        found = [self._meta(folder) for folder in _listdir(self.root / space / kind)]
        return sorted((m for m in found if m is not None and not self._expired(m, now)), key=lambda m: m["id"])

    def make_room(self, space: str, size: int, replacing: Path | None = None) -> None:
        """Drop expired entries, then ``space``'s own least recently used until ``size`` more
        bytes fit in its share and in the store; 507 when other keys' images fill the store."""
        now = time.time()
        live = []  # (last access, bytes, namespace, folder)
        # other requests add and remove entries meanwhile: every listing tolerates vanished folders
        for owner in (entry for entry in _listdir(self.root) if not entry.name.startswith(".")):
            for folder in (f for kind in self.KINDS for f in _listdir(owner / kind) if f != replacing):
                meta = self._meta(folder)
                if meta is None:
                    continue
                if self._expired(meta, now):
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    live.append((float(meta["last_access"]), int(meta["bytes"]), owner.name, folder))
        total = sum(entry[1] for entry in live)
        own = sorted(entry for entry in live if entry[2] == space)
        held = sum(entry[1] for entry in own)
        for _, bytes_, _, folder in own:
            if held + size <= self.key_bytes and total + size <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            held, total = held - bytes_, total - bytes_
        if total + size > self.max_bytes:
            raise ProtocolError(507, f"the image store is full with other keys' images ({total} of {self.max_bytes} "
                                     f"bytes); they go after {self.ttl_s:.0f} s unused")

    @staticmethod
    def _meta(folder: Path) -> dict[str, Any] | None:
        try:
            return json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _expired(meta: dict[str, Any], now: float) -> bool:
        return now - float(meta["last_access"]) > float(meta["ttl_s"])


def _listdir(folder: Path) -> list[Path]:
    try:
        return [entry for entry in folder.iterdir() if entry.is_dir() and ".old-" not in entry.name]
    except OSError:
        return []


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Atomically (readers in other requests never see half a file)."""
    part = folder / f".meta-{uuid.uuid4().hex}"
    part.write_text(json.dumps(meta))
    os.replace(part, folder / "meta.json")


def session_info(meta: dict[str, Any]) -> dict[str, Any]:
    """MONAI Label's session description (no server paths)."""
    return {"name": meta["id"], "image": meta["name"], "meta": meta.get("params", {}),
            "create_ts": int(meta["created"]), "last_access_ts": int(meta["last_access"]),
            "expiry": int(meta["ttl_s"]), "expiry_ts": int(meta["last_access"] + meta["ttl_s"])}


def multipart(params: dict[str, Any], filename: str, content: bytes, mime: str) -> tuple[bytes, str]:
    """MONAI Label's ``output=all`` answer: a ``params`` JSON field and the result file."""
    from urllib3 import encode_multipart_formdata

    body, content_type = encode_multipart_formdata(
        [("params", json.dumps(params)), ("image", (filename, content, mime))])
    return body, content_type


def copy_to(source, path: Path) -> None:
    """An uploaded part into ``path`` in chunks."""
    with open(path, "wb") as sink:
        shutil.copyfileobj(source, sink, 2**20)
