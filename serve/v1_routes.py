"""The endpoint's own HTTP API: ``POST /v1/segment``, ``GET /v1/models``, the health checks and
the web page (``serve/static/index.html``).

A scan and text prompts (and boxes) come in as a form; the masks go back as JSON (COCO RLE per
display plane, optionally with PNG previews for the page), NIfTI labels, DICOM SEG or a PNG
overlay.
"""

import asyncio
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Header, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response

from medsam3.adapters import AdapterError
from serve.encode import planes_shape, preview_planes, rle_planes
from serve.guard import IngressGuard
from serve.ingress import Ingress, Replica
from serve.uploads import UploadError, error_response, store_upload

STATIC = Path(__file__).resolve().parent / "static"
FORMATS = {"json": "application/json", "nifti": "application/gzip", "dicom-seg": "application/dicom",
           "png": "image/png"}
ACCEPT = {"application/json": "json", "application/gzip": "nifti", "application/x-nifti": "nifti",
          "application/dicom": "dicom-seg", "image/png": "png"}

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page() -> str:
    return (STATIC / "index.html").read_text()


@router.get("/healthz")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(ingress: Replica) -> JSONResponse:
    try:  # a model replica is up and answers
        await asyncio.wait_for(ingress.model.check_health.remote(), timeout=10)
    except Exception as exc:
        return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, status_code=503)
    # the model ids are what /v1/models keeps behind the key
    listed = {} if IngressGuard.keys is not None else {"models": list(ingress.served)}
    return JSONResponse({"status": "ready", **listed})


@router.get("/v1/models")
def models(ingress: Replica) -> dict:
    """Checkpoints, then adapters (``base``: the checkpoint id an adapter rides on)."""
    listed = []
    for name, (base, adapter) in ingress.served.items():
        entry = {"id": name, "checkpoint": Path(ingress.checkpoints[base]).name}
        if adapter is not None:
            entry |= {"base": base, "adapter": Path(ingress.adapters[adapter]).name}
        listed.append(entry | {"trained_prompts": sorted(ingress.trained[name] or []),
                               "modes": ["slices", "propagate"] if ingress.trackers[name] else ["slices"]})
    return {"default": ingress.default, "models": listed}


@router.post("/v1/segment")
async def segment(
    ingress: Replica,
    request: Request,
    file: Annotated[UploadFile, File(description="PNG/JPEG, NIfTI (.nii/.nii.gz), NPZ, or a zip of one "
                                                 "DICOM series")],
    prompt: Annotated[list[str], Form(description="text prompt; repeat the field for several")],
    box: Annotated[list[str] | None, Form(description="x0,y0,x1,y1 in input pixels, in prompt order; "
                                                      "x0,y0,x1,y1@z=N: on slice N (propagate: its seed)")] = None,
    mode: Annotated[str, Form(description="volumes: slices (each on its own) or propagate (the "
                                          "checkpoint's tracker; see /v1/models)")] = "slices",
    format: Annotated[str | None, Form(description="json (default), nifti, dicom-seg or png")] = None,
    model: Annotated[str | None, Form(description="checkpoint or adapter id, see /v1/models (or the "
                                                  "serve_multiplexed_model_id header)")] = None,
    preview: Annotated[bool, Form(description="json only: add the slices as PNG (for the web page)")] = False,
    multiplexed: Annotated[str | None, Header(alias="serve_multiplexed_model_id",
                                              convert_underscores=False)] = None,
) -> Response:
    try:
        return await _segment(ingress, request, file, prompt, box or [], format, model or multiplexed, preview,
                              mode)
    except UploadError as exc:
        return error_response(exc)
    except AdapterError as exc:  # raised in a model replica: the adapter, not the request, is at fault
        return JSONResponse({"detail": str(exc)}, status_code=503)


async def _segment(ingress: Ingress, request, file, prompts, boxes, fmt, model_id, preview, mode) -> Response:
    from medsam3.inference import prompt_request

    model_id = model_id or ingress.default
    if model_id not in ingress.served:
        return JSONResponse({"detail": f"unknown model {model_id!r}; see /v1/models"}, status_code=404)
    fmt = fmt or ACCEPT.get(request.headers.get("accept", "").split(",")[0].strip(), "json")
    if fmt not in FORMATS:
        raise UploadError(422, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    try:
        checked = prompt_request(prompts, boxes, ingress.max_prompts)
    except ValueError as exc:
        raise UploadError(422, str(exc)) from exc
    ingress.check_mode(mode, model_id, checked)
    # the body has streamed to a spooled temporary file (IngressGuard cut it at the limit)
    with tempfile.TemporaryDirectory(prefix="medsam3-") as private:
        path = await asyncio.to_thread(store_upload, file.file, file.filename, Path(private), ingress.zip_limits)
        if fmt == "dicom-seg" and not path.is_dir():  # a zip was extracted into a folder
            raise UploadError(422, "format dicom-seg needs a DICOM series (a zip) as input")
        return await ingress.segment_scan(
            path, file.filename, len(checked.prompts), model_id, mode, lambda scan: (checked, boxes, None),
            lambda scan, results, _: _respond(ingress, scan, results, fmt, preview, Path(private), model_id))


def _respond(ingress: Ingress, scan, results, fmt: str, preview: bool, folder: Path, model_id: str) -> Response:
    from medsam3.io.write import write_dicom_seg, write_nifti_labels
    from pipelines.predict import overlay_figure, summarize

    if fmt == "nifti":
        path = write_nifti_labels([r.mask for r in results], scan.case.affine if scan.is_3d else np.eye(4),
                                  folder / "labels.nii.gz", scan.source_affine)
        return Response(path.read_bytes(), media_type=FORMATS[fmt],
                        headers={"content-disposition": 'attachment; filename="labels.nii.gz"'})
    if fmt == "dicom-seg":
        path = write_dicom_seg([r.mask for r in results], [r.prompt for r in results], scan.case.affine,
                               scan.dicom_files, folder / "segmentation.dcm")
        return Response(path.read_bytes(), media_type=FORMATS[fmt],
                        headers={"content-disposition": 'attachment; filename="segmentation.dcm"'})
    if fmt == "png":
        path = overlay_figure(scan, results, ingress.preps[model_id], ingress.cfg, folder / "overlay.png")
        return Response(path.read_bytes(), media_type=FORMATS[fmt])
    checkpoint = ingress.checkpoints[ingress.served[model_id][0]]
    summary = summarize(scan, results, checkpoint, float(ingress.cfg.threshold))
    axis = ingress.preps[model_id].axis
    body = {"model": model_id, "shape": planes_shape(scan, axis), "masks": []}
    for entry, result in zip(summary["prompts"], results, strict=True):
        entry.pop("instances", None)  # serve does not compute per-query masks
        body["masks"].append({**entry, "rle": rle_planes(result.mask, scan.is_3d, axis)})
    if preview:
        body["preview"] = preview_planes(scan, ingress.preps[model_id], results[0].prompt)
    return JSONResponse(body)
