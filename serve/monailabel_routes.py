"""The MONAI Label routes (``/info/``, ``/infer/{model}``, ``/datastore/``, ``/session/``,
``/auth/``), so that 3D Slicer's and OHIF's MONAI Label modules and MONAI Label's client can use
the endpoint. The protocol (params, label ids, placement of clicks and boxes, the image store) is
in ``serve/monailabel.py``; the routes run on the same ingress, limits, keys, model replicas and
batching as ``/v1`` (``serve/ingress.py``).
"""

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, UploadFile
from fastapi.responses import JSONResponse, Response

from medsam3.adapters import AdapterError
from serve.guard import IngressGuard
from serve.ingress import Ingress, Replica
from serve.uploads import UploadError, error_response, store_upload, unreadable

router = APIRouter(tags=["MONAI Label"])


@router.get("/info/")
def ml_info(ingress: Replica, authorization: Annotated[str | None, Header()] = None) -> dict:
    """The app, its models (each checkpoint and adapter: text and interactive) and their labels."""
    from medsam3 import __version__
    from serve.monailabel import info

    return info(ingress.labels, ingress.trackers, _datastore_status(ingress, authorization), __version__)


@router.post("/infer/{model}")
async def ml_infer(
    ingress: Replica,
    model: str,
    image: str = "",
    session_id: str = "",
    output: str | None = None,
    params: Annotated[str, Form(description="JSON: labels / label, foreground, background, roi, "
                                            "result_extension, result_dtype, mode")] = "{}",
    file: Annotated[UploadFile | None, File(description="NIfTI, NRRD or a zip of one DICOM series")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """Segment an uploaded file, a session's image or a datastore image (in that order)."""
    from medsam3.io.scan import scan_kind
    from serve.monailabel import OUTPUTS, ProtocolError, parse_params, result_extension, served_model

    try:
        if output is not None and output not in OUTPUTS:
            raise ProtocolError(422, f"output {output!r} is not one of {', '.join(OUTPUTS)}")
        model_id, interactive = served_model(model, ingress.served)
        asked = parse_params(params, ingress.labels[model_id], interactive, ingress.max_prompts)
        ingress.check_mode(asked.mode, model_id)
        with tempfile.TemporaryDirectory(prefix="medsam3-") as private:
            path, name = await _source(ingress, file, session_id, image, authorization, Path(private))
            extension = result_extension(asked, output, scan_kind(path))
            return await ingress.segment_scan(
                path, name, len(asked.prompts), model_id, asked.mode,
                lambda scan: _prompts(ingress, scan, asked, model_id),
                lambda scan, results, placement: _answer(
                    ingress, scan, results, placement, asked, model, model_id, interactive, output, extension,
                    Path(private)))
    except (ProtocolError, UploadError) as exc:
        return error_response(exc)
    except AdapterError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)


async def _source(ingress: Ingress, file, session_id: str, image: str, authorization,
                  private: Path) -> tuple[Path, str]:
    from serve.monailabel import ProtocolError

    space = _space(authorization)
    for kind, key in (("session", session_id), ("datastore", None if file is not None else image)):
        if key:
            found = await asyncio.to_thread(ingress.store.get, space, kind, key)
            if found is None:
                raise ProtocolError(404, f"{kind} image {key!r} not found (expired or never uploaded)")
            return found[0], key
    if file is None:
        raise ProtocolError(422, "send a file, an image id (datastore) or a session_id")
    path = await asyncio.to_thread(store_upload, file.file, file.filename, private, ingress.zip_limits)
    return path, file.filename


def _prompts(ingress: Ingress, scan, asked, model_id: str):
    """The decoded scan's prompts: boxes from the ROI / clicks in the model's planes (and the
    placement, which the answer refines the masks with)."""
    from medsam3.inference import prompt_request
    from serve.monailabel import ProtocolError, place

    placement = place(asked, scan, ingress.preps[model_id].axis)
    try:
        return (prompt_request(asked.prompts, placement.boxes, ingress.max_prompts, placement.clicks),
                placement.boxes, placement)
    except ValueError as exc:
        raise ProtocolError(422, str(exc)) from exc


def _answer(ingress: Ingress, scan, results, placement, asked, requested: str, model_id: str, interactive: bool,
            output, extension: str, folder: Path) -> Response:
    import dataclasses
    import uuid

    from pipelines.predict import summarize
    from serve.monailabel import MIME, label_values, multipart, refine, write_result

    results = [dataclasses.replace(r, mask=refine(r.mask, placement)) for r in results]
    masks = [r.mask for r in results]
    names, values = label_values(ingress.labels[model_id], asked.prompts, interactive)
    summary = summarize(scan, results, ingress.checkpoints[ingress.served[model_id][0]], float(ingress.cfg.threshold))
    labels = [{"label": entry.pop("prompt"), "id": value, **entry}  # the map's value, not predict's i+1
              for entry, value in zip(summary["prompts"], values, strict=True)]
    for entry in labels:
        entry.pop("label_value")
    body = {"model": requested, "mode": asked.mode, "label_names": names, "labels": labels}
    if output == "json":
        return JSONResponse(body)
    path = write_result(scan, masks, asked.prompts, values, extension, asked.dtype,
                        folder / f"medsam3-{uuid.uuid4().hex[:12]}{extension}")
    if output in ("image", "dicom_seg"):
        return Response(path.read_bytes(), media_type=MIME[extension],
                        headers={"content-disposition": f'attachment; filename="{path.name}"'})
    content, content_type = multipart(body, path.name, path.read_bytes(), MIME[extension])
    return Response(content, media_type=content_type)


def _space(authorization: str | None) -> str:
    from serve.monailabel import namespace

    return namespace(authorization, IngressGuard.keys is not None)


def _datastore_status(ingress: Ingress, authorization: str | None) -> dict:
    entries = ingress.store.entries(_space(authorization), "datastore")
    return {"total": len(entries), "completed": 0, "label_tags": {}, "train": 0}


async def _checked_upload(ingress: Ingress, files: list[UploadFile], private: Path) -> Path:
    """One file (a zip: a DICOM series), or several (the files of a DICOM series), stored and
    their declared shape checked against the limits before anything is kept."""
    from medsam3.io.case import CaseError
    from medsam3.io.declared import declared
    from serve.monailabel import copy_to

    if len(files) == 1:
        path = await asyncio.to_thread(store_upload, files[0].file, files[0].filename, private, ingress.zip_limits)
    else:
        path = private / "series"
        path.mkdir()
        for n, upload in enumerate(files):  # names are ours: nothing the client sends becomes a path
            await asyncio.to_thread(copy_to, upload.file, path / f"{n:05d}.dcm")
    try:
        ingress.check_size(await asyncio.to_thread(declared, path, ingress.cfg.channel))
    except CaseError as exc:
        raise unreadable(files[0].filename if len(files) == 1 else f"{len(files)} files", path, exc) from exc
    return path


@router.put("/datastore/")
async def ml_put_image(
    ingress: Replica,
    file: Annotated[UploadFile, File(description="NIfTI, NRRD or a zip of one DICOM series")],
    image: str | None = None,
    params: Annotated[str, Form()] = "{}",
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Keep an image for later /infer?image=ID calls (id: ``image``, else the file's name)."""
    from serve.monailabel import ProtocolError, json_object

    image_id = (image or "").strip() or Path(file.filename or "").name.split(".")[0]
    try:
        if not image_id or len(image_id) > 256:
            raise ProtocolError(422, "an image id of 1-256 characters is needed (?image=ID)")
        with tempfile.TemporaryDirectory(prefix="medsam3-", dir=ingress.store.incoming) as private:
            path = await _checked_upload(ingress, [file], Path(private))
            await asyncio.to_thread(ingress.store.put, _space(authorization), "datastore", image_id, path,
                                    {"params": json_object(params)})
    except (ProtocolError, UploadError) as exc:
        return error_response(exc)
    return JSONResponse({"image": image_id})


@router.get("/datastore/")
def ml_datastore(ingress: Replica, output: str | None = None,
                 authorization: Annotated[str | None, Header()] = None) -> dict:
    """The caller's images (``output=all|json``), or their count."""
    if output not in ("all", "json"):
        return _datastore_status(ingress, authorization)
    entries = ingress.store.entries(_space(authorization), "datastore")
    return {"name": "MedSAM3", "objects": {m["id"]: {"image": {"ext": "".join(Path(m["name"]).suffixes),
                                                                "info": {"bytes": m["bytes"],
                                                                         "ts": int(m["created"])}},
                                                      "labels": {}} for m in entries}}


@router.get("/datastore/image")
def ml_get_image(ingress: Replica, image: str, authorization: Annotated[str | None, Header()] = None) -> Response:
    found = ingress.store.get(_space(authorization), "datastore", image)
    if found is None:
        return JSONResponse({"detail": f"image {image!r} not found"}, status_code=404)
    return _stored_file(*found)


@router.delete("/datastore/image")
def ml_remove_image(ingress: Replica, id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
    if ingress.store.remove(_space(authorization), "datastore", id) is None:
        return JSONResponse({"detail": f"image {id!r} not found"}, status_code=404)
    return JSONResponse({})


@router.put("/session/")
async def ml_create_session(
    ingress: Replica,
    files: Annotated[list[UploadFile], File(description="one NIfTI / NRRD / zip, or a DICOM series' files")],
    uncompress: bool = False,  # MONAI Label's flag; a zip is always extracted (as one DICOM series)
    expiry: int = 0,
    authorization: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """An image kept for ``expiry`` seconds (default ``ttl_s``) under a new session id."""
    import uuid

    from serve.monailabel import ProtocolError, session_info

    session_id = uuid.uuid4().hex
    ttl = min(float(expiry), 86400.0) if expiry > 0 else None
    try:
        with tempfile.TemporaryDirectory(prefix="medsam3-", dir=ingress.store.incoming) as private:
            path = await _checked_upload(ingress, files, Path(private))
            meta = await asyncio.to_thread(ingress.store.put, _space(authorization), "session", session_id,
                                           path, {}, ttl)
    except (ProtocolError, UploadError) as exc:
        return error_response(exc)
    return JSONResponse({"session_id": session_id, "session_info": session_info(meta)})


@router.get("/session/{session_id}")
def ml_get_session(ingress: Replica, session_id: str, image: bool = False,
                   authorization: Annotated[str | None, Header()] = None) -> Response:
    from serve.monailabel import session_info

    found = ingress.store.get(_space(authorization), "session", session_id)
    if found is None:
        return JSONResponse({"detail": f"session {session_id!r} not found"}, status_code=404)
    return _stored_file(*found) if image else JSONResponse(session_info(found[1]))


@router.delete("/session/{session_id}")
def ml_remove_session(ingress: Replica, session_id: str,
                      authorization: Annotated[str | None, Header()] = None) -> Response:
    from serve.monailabel import session_info

    meta = ingress.store.remove(_space(authorization), "session", session_id)
    if meta is None:
        return JSONResponse({"detail": f"session {session_id!r} not found"}, status_code=404)
    return JSONResponse(session_info(meta))


def _stored_file(path: Path, meta: dict) -> Response:
    if path.is_dir():
        return JSONResponse({"detail": f"{meta['id']!r} is a DICOM series: it is not sent back"}, status_code=422)
    return Response(path.read_bytes(), media_type="application/octet-stream",
                    headers={"content-disposition": f'attachment; filename="{path.name}"'})


@router.get("/auth/")
def ml_auth() -> dict:
    """Whether a key is needed (3D Slicer then asks for one: the password field)."""
    return {"enabled": IngressGuard.keys is not None, "client_id": "medsam3"}


@router.post("/auth/token")
def ml_token(username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "") -> JSONResponse:
    """MONAI Label's login: the password is an API key; the token is that key."""
    if IngressGuard.keys is not None and not IngressGuard.keys.allows(f"Bearer {password}"):
        return JSONResponse({"detail": "the password must be a valid API key"}, status_code=401)
    return JSONResponse({"access_token": password, "token_type": "bearer"})


@router.get("/auth/token/valid")
def ml_token_valid() -> dict:
    return {}  # IngressGuard has checked the key
