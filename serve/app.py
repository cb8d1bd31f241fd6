"""The Ray Serve application: a FastAPI ingress and batched, multiplexed SAM3 model replicas.

    client ──HTTP──► SegmentAPI (FastAPI ingress: limits, upload → scan → SliceItems, responses)
                        │  one call per (slice, prompt) item, routed by model id
                        ▼
                     SegmentModel replicas (@serve.multiplexed checkpoints, @serve.batch: items of
                     concurrent requests go through the model together; autoscaled)

A LoRA adapter (``adapters``: {name: folder}) rides on the default checkpoint: its requests are
routed to the replicas holding that checkpoint, which switch adapters per batch group
(``medsam3.adapters``: loaded on first use, LRU-evicted beyond ``max_adapters``, the base never
reloaded).

Both sides use ``medsam3.inference`` (Preprocessor on the ingress, Segmenter.run_items on the
replicas), the same code path as ``medsam3 predict`` and ``evaluate``. ``build_app`` is the
application builder that ``configs/serve.yaml`` (``serve run`` / ``serve deploy`` / KubeRay's
RayService) and ``medsam3 serve`` both use.
"""

# no `from __future__ import annotations`: FastAPI must see the real types of the
# ingress methods, which Serve rewraps (string annotations would not resolve there)

import asyncio
import json
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, Header, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from omegaconf import OmegaConf
from ray import serve
from ray.serve.handle import DeploymentHandle

from medsam3.adapters import AdapterError
from medsam3.ray_local import keep_serve_replicas_on_loopback
from serve.encode import planes_shape, preview_planes, rle_planes
from serve.guard import IngressGuard
from serve.limits import Budget
from serve.uploads import UploadError, ZipLimits, store_upload, unreadable

keep_serve_replicas_on_loopback()  # runs in every replica process, before its gRPC server starts
STATIC = Path(__file__).resolve().parent / "static"
FORMATS = {"json": "application/json", "nifti": "application/gzip", "dicom-seg": "application/dicom",
           "png": "image/png"}
logger = logging.getLogger("ray.serve")
ACCEPT = {"application/json": "json", "application/gzip": "nifti", "application/x-nifti": "nifti",
          "application/dicom": "dicom-seg", "image/png": "png"}


def served_models(checkpoints: dict[str, str], adapters: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """Every model id a request may name → (the checkpoint id replicas load, the adapter or None);
    adapters ride on the default (first) checkpoint."""
    default = next(iter(checkpoints))
    return {**{name: (name, None) for name in checkpoints}, **{name: (default, name) for name in adapters}}


def _inference_cfg(settings: dict[str, Any]):
    from medsam3.inference import inference_config

    overrides = [f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}"
                 for k, v in (settings.get("inference") or {}).items()]
    # s3:// checkpoints: the storage settings (endpoint) reach every replica through its config
    overrides += [f"storage.{k}={v}" for k, v in (settings.get("storage") or {}).items() if v is not None]
    return inference_config(overrides)


@serve.deployment(name="SegmentModel", max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class SegmentModel:
    """One replica: up to 4 checkpoints loaded (LRU), the default one with its adapters (up to
    ``max_adapters`` loaded), items answered in batches."""

    def __init__(self, checkpoints: dict[str, str], settings: dict[str, Any], adapters: dict[str, str]):
        self.checkpoints = checkpoints
        self.adapters = adapters
        self.served = served_models(checkpoints, adapters)
        self.max_adapters = int(settings.get("max_adapters", 8))
        self.cfg = _inference_cfg(settings)
        self.failures = 0

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``user_config`` of the Serve config: batching can be retuned without a restart."""
        self.run_batch.set_max_batch_size(int(user_config.get("max_batch_size", 16)))
        self.run_batch.set_batch_wait_timeout_s(float(user_config.get("batch_wait_timeout_s", 0.02)))

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_segmenter(self, model_id: str):
        """The Segmenter of checkpoint ``model_id`` (the multiplexed id: requests for an adapter
        carry its base's id, so they reach replicas that hold the base)."""
        from medsam3.inference import Segmenter

        adapters = self.adapters if model_id == next(iter(self.checkpoints)) else None
        return Segmenter(self.checkpoints[model_id], self.cfg, adapters=adapters, max_adapters=self.max_adapters)

    async def run(self, model_id: str, item):
        answer = await self.run_batch(model_id, item)
        if isinstance(answer, Exception):  # this item's adapter failed (see run_batch)
            raise answer
        return answer

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def run_batch(self, model_ids: list[str], items: list) -> list:
        answers: list = [None] * len(items)
        for model_id in dict.fromkeys(model_ids):  # one group per (checkpoint, adapter)
            picked = [i for i, m in enumerate(model_ids) if m == model_id]
            base, adapter = self.served[model_id]
            segmenter = await self.get_segmenter(base)
            try:  # off the event loop, so requests keep queueing into the next batch meanwhile
                done = await asyncio.to_thread(segmenter.run_items, [items[i] for i in picked], adapter)
            except AdapterError as exc:  # one adapter's folder went bad: its items fail, the batch's others stand
                done = [exc] * len(picked)
            except Exception:
                self.failures += 1
                raise
            self.failures = 0
            for i, answer in zip(picked, done, strict=True):
                answers[i] = answer
        return answers

    async def propagate(self, model_id: str, case, prompts: list[str], boxes: list[str | None],
                        clicks: list | None = None) -> list:
        """A whole volume propagated with the checkpoint's tracker (not batched: a volume is one
        sequential video), off the event loop; ``clicks``: see ``Segmenter.segment``."""
        base, adapter = self.served[model_id]
        segmenter = await self.get_segmenter(base)
        return await asyncio.to_thread(segmenter.segment, case, prompts, boxes, False, "propagate", adapter, clicks)

    def check_health(self) -> None:
        """Serve replaces a replica whose model calls keep failing (e.g. a broken GPU)."""
        if self.failures >= 3:
            raise RuntimeError(f"{self.failures} model calls in a row failed")


api = FastAPI(title="MedSAM3", description="Prompt-driven segmentation of medical images with SAM3 "
              "fine-tuned on medical data. POST a scan and text prompts to /v1/segment.")
api.add_middleware(IngressGuard)  # API keys and the body limit, before any body is read
# Peak bytes a volume request holds per voxel, besides one byte per prompt: benchmarks/serve_memory.py
# measured 4.0-4.2 (int16 CT) and 8.0 (float32) with one prompt, +0.6-0.9 per further prompt.
BYTES_PER_VOXEL = 8


@serve.deployment(name="SegmentAPI", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class SegmentAPI:
    def __init__(self, model: DeploymentHandle, checkpoints: dict[str, str], settings: dict[str, Any],
                 adapters: dict[str, str]):
        from medsam3.inference import (
            Preprocessor,
            adapter_plans,
            adapter_prompts,
            checkpoint_image_size,
            trained_prompts,
        )
        from medsam3.plans import checkpoint_plans
        from medsam3.video import checkpoint_type

        self.model = model
        self.checkpoints = checkpoints
        self.default = next(iter(checkpoints))
        self.settings = settings
        self.cfg = _inference_cfg(settings)
        sizes = {checkpoint_image_size(path) for path in checkpoints.values()}
        # items travel at the model's input size when every checkpoint shares it (smaller messages);
        # each checkpoint's pixels are made with its own preprocessing plans
        size = sizes.pop() if len(sizes) == 1 else None
        self.preps = {name: Preprocessor(checkpoint_plans(path, self.cfg.prepare), size)
                      for name, path in checkpoints.items()}
        self.trained = {name: trained_prompts(path) for name, path in checkpoints.items()}
        self.trackers = {name: checkpoint_type(path) == "sam3_video" for name, path in checkpoints.items()}
        # an adapter answers with its base's modes, and its own pixels when it carries other plans
        self.adapters = adapters
        self.served = served_models(checkpoints, adapters)
        base_prep = self.preps[self.default]
        for name, path in adapters.items():
            plans = adapter_plans(path, base_prep.plans, self.cfg.prepare)
            self.preps[name] = base_prep if plans is base_prep.plans else Preprocessor(plans, size)
            self.trackers[name] = self.trackers[self.default]
            self.trained[name] = adapter_prompts(path, self.trained[self.default])
        from serve.monailabel import ImageStore, label_ids, vocabulary_prompts

        # MONAI Label (serve/monailabel.py): stable label ids per model, and the uploaded-image store
        self.labels = {name: label_ids(self.trained[name], vocabulary_prompts(self.preps[name].plans))
                       for name in self.served}
        viewer = settings.get("monailabel") or {}
        self.store = ImageStore(viewer.get("store_dir") or Path(tempfile.gettempdir()) / "medsam3-monailabel",
                                max_bytes=int(float(viewer.get("max_store_mb", 4096)) * 2**20),
                                ttl_s=float(viewer.get("ttl_s", 3600)))
        IngressGuard.configure(settings)
        if IngressGuard.keys is None:
            logger.warning("MedSAM3 endpoint: authentication is OFF, anyone who can reach it may send scans to "
                           "/v1/* and the MONAI Label routes; set settings.auth.api_keys_file or api_keys_env "
                           "to require API keys")
        self.max_voxels = int(float(settings.get("max_voxels", 512 * 512 * 1000)))
        self.max_side = int(settings.get("max_side", 4096))
        self.max_prompts = int(settings.get("max_prompts", 16))
        self.zip_limits = ZipLimits(max_bytes=int(float(settings.get("max_unzipped_mb", 2048)) * 2**20),
                                    max_ratio=float(settings.get("max_zip_ratio", 100)))
        # the decoded scans and masks of all requests in flight; a request waits until its share fits
        self.decoded = Budget(int(float(settings.get("max_decoded_mb", 6144)) * 2**20))

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return (STATIC / "index.html").read_text()

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        try:  # a model replica is up and answers
            await asyncio.wait_for(self.model.check_health.remote(), timeout=10)
        except Exception as exc:
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ready", "models": list(self.served)})

    @api.get("/v1/models")
    def models(self) -> dict:
        """Checkpoints, then adapters (``base``: the checkpoint id an adapter rides on)."""
        listed = []
        for name, (base, adapter) in self.served.items():
            entry = {"id": name, "checkpoint": Path(self.checkpoints[base]).name}
            if adapter is not None:
                entry |= {"base": base, "adapter": Path(self.adapters[adapter]).name}
            listed.append(entry | {"trained_prompts": sorted(self.trained[name] or []),
                                   "modes": ["slices", "propagate"] if self.trackers[name] else ["slices"]})
        return {"default": self.default, "models": listed}

    @api.post("/v1/segment")
    async def segment(
        self,
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
            return await self._segment(request, file, prompt, box or [], format, model or multiplexed, preview,
                                       mode)
        except UploadError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except AdapterError as exc:  # raised in a model replica: the adapter, not the request, is at fault
            return JSONResponse({"detail": str(exc)}, status_code=503)

    async def _segment(self, request, file, prompts, boxes, fmt, model_id, preview, mode) -> Response:
        from medsam3.inference import prompt_request

        model_id = model_id or self.default
        if model_id not in self.served:
            return JSONResponse({"detail": f"unknown model {model_id!r}; see /v1/models"}, status_code=404)
        fmt = fmt or ACCEPT.get(request.headers.get("accept", "").split(",")[0].strip(), "json")
        if fmt not in FORMATS:
            raise UploadError(422, f"format {fmt!r} is not one of {', '.join(FORMATS)}")
        try:
            checked = prompt_request(prompts, boxes, self.max_prompts)
        except ValueError as exc:
            raise UploadError(422, str(exc)) from exc
        self._check_mode(mode, model_id, checked)
        # the body has streamed to a spooled temporary file (IngressGuard cut it at the limit)
        with tempfile.TemporaryDirectory(prefix="medsam3-") as private:
            path = await asyncio.to_thread(store_upload, file.file, file.filename, Path(private), self.zip_limits)
            if fmt == "dicom-seg" and not path.is_dir():  # a zip was extracted into a folder
                raise UploadError(422, "format dicom-seg needs a DICOM series (a zip) as input")
            return await self._segment_scan(
                path, file.filename, len(checked.prompts), model_id, mode, lambda scan: (checked, boxes, None),
                lambda scan, results, _: self._respond(scan, results, fmt, preview, Path(private), model_id))

    def _check_mode(self, mode: str, model_id: str, checked=None) -> None:
        from medsam3.inference import MODES

        if mode not in MODES:
            raise UploadError(422, f"mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "propagate" and not self.trackers[model_id]:
            raise UploadError(422, f"model {model_id!r} has no tracker (an image model): mode propagate needs a "
                                   "video checkpoint; see /v1/models")
        if mode == "propagate" and checked is not None:
            try:
                checked.require_seeds()
            except ValueError as exc:
                raise UploadError(422, str(exc)) from exc

    async def _segment_scan(self, path: Path, name: str | None, prompts: int, model_id: str, mode: str, ask,
                            answer) -> Response:
        """The one way from a stored upload to an answer (/v1 and MONAI Label): the header's shape
        against the limits, then, holding the request's share of the decoded-memory budget, the
        decoded scan, ``ask(scan)`` → (checked prompts, box texts, context), the model's masks, and
        ``answer(scan, results, context)`` → the response (in a thread)."""
        from medsam3.io.case import CaseError
        from medsam3.io.scan import declared_shape, read_scan

        try:
            voxels = self._check_size(await asyncio.to_thread(declared_shape, path))
            async with self.decoded.hold(voxels * (BYTES_PER_VOXEL + prompts)):
                scan = await asyncio.to_thread(read_scan, path, self.cfg.modality, self.cfg.channel, False)
                self._check_size(scan.case.image.shape if scan.is_3d else scan.case.image.shape[:2])
                checked, boxes, context = ask(scan)
                if mode == "propagate" and scan.is_3d:
                    results = await self._propagate(scan.case, checked, boxes, model_id)
                else:
                    results = await self._run(scan.case, checked, model_id)
                return await asyncio.to_thread(answer, scan, results, context)
        except CaseError as exc:
            raise unreadable(name, path, exc) from exc

    def _check_size(self, shape: tuple[int, ...]) -> int:
        """The voxels of a spatial shape, or 413 when it passes ``max_side`` / ``max_voxels``."""
        voxels = int(np.prod(shape, dtype=np.float64))
        if max(shape, default=0) > self.max_side or voxels > self.max_voxels:
            raise UploadError(413, f"image of shape {list(shape)} exceeds the limits "
                                   f"(side ≤ {self.max_side}, voxels ≤ {self.max_voxels})")
        return voxels

    async def _propagate(self, case, checked, boxes, model_id):
        depth = self.preps[model_id].num_slices(case)
        outside = [z for z in checked.slices if z is not None and z >= depth]
        if outside:
            raise UploadError(422, f"seed slice z={outside[0]} is outside the volume's {depth} slices")
        handle = self.model.options(multiplexed_model_id=self.served[model_id][0])
        clicks = [None if c is None else (c, z) for c, z in zip(checked.clicks, checked.slices, strict=True)]
        return await handle.propagate.remote(model_id, case, checked.prompts, list(boxes), clicks)

    async def _run(self, case, checked, model_id):
        prep = self.preps[model_id]
        intensity = prep.intensity(case)
        results = prep.results(case, checked.prompts, checked.boxes, self.trained[model_id])
        handle = self.model.options(multiplexed_model_id=self.served[model_id][0])  # the replicas with its base
        count, chunk = prep.num_slices(case), max(1, int(self.cfg.batch_size))
        for start in range(0, count, chunk):  # a volume streams through in chunks of slices
            items = await asyncio.to_thread(prep.items, case, checked.prompts, checked.boxes,
                                            range(start, min(start + chunk, count)), intensity, False,
                                            checked.slices)
            answers = await asyncio.gather(*[handle.run.remote(model_id, item) for item in items])
            prep.fill(case, results, items, answers)
        return results

    def _respond(self, scan, results, fmt: str, preview: bool, folder: Path, model_id: str) -> Response:
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
            path = overlay_figure(scan, results, self.preps[model_id], self.cfg, folder / "overlay.png")
            return Response(path.read_bytes(), media_type=FORMATS[fmt])
        summary = summarize(scan, results, self.checkpoints[self.served[model_id][0]], float(self.cfg.threshold))
        axis = self.preps[model_id].axis
        body = {"model": model_id, "shape": planes_shape(scan, axis), "masks": []}
        for entry, result in zip(summary["prompts"], results, strict=True):
            entry.pop("instances", None)  # serve does not compute per-query masks
            body["masks"].append({**entry, "rle": rle_planes(result.mask, scan.is_3d, axis)})
        if preview:
            body["preview"] = preview_planes(scan, self.preps[model_id], results[0].prompt)
        return JSONResponse(body)

    # --- MONAI Label protocol (3D Slicer, OHIF, MONAI Label's client): serve/monailabel.py ------------

    @api.get("/info/", tags=["MONAI Label"])
    def ml_info(self, authorization: Annotated[str | None, Header()] = None) -> dict:
        """The app, its models (each checkpoint and adapter: text and interactive) and their labels."""
        from medsam3 import __version__
        from serve.monailabel import info

        return info(self.labels, self.trackers, self._datastore_status(authorization), __version__)

    @api.post("/infer/{model}", tags=["MONAI Label"])
    async def ml_infer(
        self,
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
            model_id, interactive = served_model(model, self.served)
            asked = parse_params(params, self.labels[model_id], interactive, self.max_prompts)
            self._check_mode(asked.mode, model_id)
            with tempfile.TemporaryDirectory(prefix="medsam3-") as private:
                path, name = await self._ml_source(file, session_id, image, authorization, Path(private))
                extension = result_extension(asked, output, scan_kind(path))
                return await self._segment_scan(
                    path, name, len(asked.prompts), model_id, asked.mode,
                    lambda scan: self._ml_prompts(scan, asked, model_id),
                    lambda scan, results, placement: self._ml_answer(
                        scan, results, placement, asked, model, model_id, interactive, output, extension,
                        Path(private)))
        except (ProtocolError, UploadError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        except AdapterError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503)

    async def _ml_source(self, file, session_id: str, image: str, authorization, private: Path) -> tuple[Path, str]:
        from serve.monailabel import ProtocolError

        space = self._space(authorization)
        for kind, key in (("session", session_id), ("datastore", None if file is not None else image)):
            if key:
                found = await asyncio.to_thread(self.store.get, space, kind, key)
                if found is None:
                    raise ProtocolError(404, f"{kind} image {key!r} not found (expired or never uploaded)")
                return found[0], key
        if file is None:
            raise ProtocolError(422, "send a file, an image id (datastore) or a session_id")
        path = await asyncio.to_thread(store_upload, file.file, file.filename, private, self.zip_limits)
        return path, file.filename

    def _ml_prompts(self, scan, asked, model_id: str):
        """The decoded scan's prompts: boxes from the ROI / clicks in the model's planes (and the
        placement, which the answer refines the masks with)."""
        from medsam3.inference import prompt_request
        from serve.monailabel import ProtocolError, place

        placement = place(asked, scan, self.preps[model_id].axis)
        try:
            return (prompt_request(asked.prompts, placement.boxes, self.max_prompts, placement.clicks),
                    placement.boxes, placement)
        except ValueError as exc:
            raise ProtocolError(422, str(exc)) from exc

    def _ml_answer(self, scan, results, placement, asked, requested: str, model_id: str, interactive: bool,
                   output, extension: str, folder: Path) -> Response:
        import dataclasses
        import uuid

        from pipelines.predict import summarize
        from serve.monailabel import MIME, label_values, multipart, refine, write_result

        results = [dataclasses.replace(r, mask=refine(r.mask, placement)) for r in results]
        masks = [r.mask for r in results]
        names, values = label_values(self.labels[model_id], asked.prompts, interactive)
        summary = summarize(scan, results, self.checkpoints[self.served[model_id][0]], float(self.cfg.threshold))
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

    def _space(self, authorization: str | None) -> str:
        from serve.monailabel import namespace

        return namespace(authorization, IngressGuard.keys is not None)

    def _datastore_status(self, authorization: str | None) -> dict:
        entries = self.store.entries(self._space(authorization), "datastore")
        return {"total": len(entries), "completed": 0, "label_tags": {}, "train": 0}

    async def _checked_upload(self, files: list[UploadFile], private: Path) -> Path:
        """One file (a zip: a DICOM series), or several (the files of a DICOM series), stored and
        their declared shape checked against the limits before anything is kept."""
        from medsam3.io.case import CaseError
        from medsam3.io.scan import declared_shape
        from serve.monailabel import copy_to

        if len(files) == 1:
            path = await asyncio.to_thread(store_upload, files[0].file, files[0].filename, private, self.zip_limits)
        else:
            path = private / "series"
            path.mkdir()
            for n, upload in enumerate(files):  # names are ours: nothing the client sends becomes a path
                await asyncio.to_thread(copy_to, upload.file, path / f"{n:05d}.dcm")
        try:
            self._check_size(await asyncio.to_thread(declared_shape, path))
        except CaseError as exc:
            raise unreadable(files[0].filename if len(files) == 1 else f"{len(files)} files", path, exc) from exc
        return path

    @api.put("/datastore/", tags=["MONAI Label"])
    async def ml_put_image(
        self,
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
            with tempfile.TemporaryDirectory(prefix="medsam3-", dir=self.store.incoming) as private:
                path = await self._checked_upload([file], Path(private))
                await asyncio.to_thread(self.store.put, self._space(authorization), "datastore", image_id, path,
                                        {"params": json_object(params)})
        except (ProtocolError, UploadError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return JSONResponse({"image": image_id})

    @api.get("/datastore/", tags=["MONAI Label"])
    def ml_datastore(self, output: str | None = None, authorization: Annotated[str | None, Header()] = None) -> dict:
        """The caller's images (``output=all|json``), or their count."""
        if output not in ("all", "json"):
            return self._datastore_status(authorization)
        entries = self.store.entries(self._space(authorization), "datastore")
        return {"name": "MedSAM3", "objects": {m["id"]: {"image": {"ext": "".join(Path(m["name"]).suffixes),
                                                                    "info": {"bytes": m["bytes"],
                                                                             "ts": int(m["created"])}},
                                                          "labels": {}} for m in entries}}

    @api.get("/datastore/image", tags=["MONAI Label"])
    def ml_get_image(self, image: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        found = self.store.get(self._space(authorization), "datastore", image)
        if found is None:
            return JSONResponse({"detail": f"image {image!r} not found"}, status_code=404)
        return self._stored_file(*found)

    @api.delete("/datastore/image", tags=["MONAI Label"])
    def ml_remove_image(self, id: str, authorization: Annotated[str | None, Header()] = None) -> JSONResponse:
        if self.store.remove(self._space(authorization), "datastore", id) is None:
            return JSONResponse({"detail": f"image {id!r} not found"}, status_code=404)
        return JSONResponse({})

    @api.put("/session/", tags=["MONAI Label"])
    async def ml_create_session(
        self,
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
            with tempfile.TemporaryDirectory(prefix="medsam3-", dir=self.store.incoming) as private:
                path = await self._checked_upload(files, Path(private))
                meta = await asyncio.to_thread(self.store.put, self._space(authorization), "session", session_id,
                                               path, {}, ttl)
        except (ProtocolError, UploadError) as exc:
            return JSONResponse({"detail": str(exc)}, status_code=exc.status)
        return JSONResponse({"session_id": session_id, "session_info": session_info(meta)})

    @api.get("/session/{session_id}", tags=["MONAI Label"])
    def ml_get_session(self, session_id: str, image: bool = False,
                       authorization: Annotated[str | None, Header()] = None) -> Response:
        from serve.monailabel import session_info

        found = self.store.get(self._space(authorization), "session", session_id)
        if found is None:
            return JSONResponse({"detail": f"session {session_id!r} not found"}, status_code=404)
        return self._stored_file(*found) if image else JSONResponse(session_info(found[1]))

    @api.delete("/session/{session_id}", tags=["MONAI Label"])
    def ml_remove_session(self, session_id: str, authorization: Annotated[str | None, Header()] = None) -> Response:
        from serve.monailabel import session_info

        meta = self.store.remove(self._space(authorization), "session", session_id)
        if meta is None:
            return JSONResponse({"detail": f"session {session_id!r} not found"}, status_code=404)
        return JSONResponse(session_info(meta))

    @staticmethod
    def _stored_file(path: Path, meta: dict) -> Response:
        if path.is_dir():
            return JSONResponse({"detail": f"{meta['id']!r} is a DICOM series: it is not sent back"}, status_code=422)
        return Response(path.read_bytes(), media_type="application/octet-stream",
                        headers={"content-disposition": f'attachment; filename="{path.name}"'})

    @api.get("/auth/", tags=["MONAI Label"])
    def ml_auth(self) -> dict:
        """Whether a key is needed (3D Slicer then asks for one: the password field)."""
        return {"enabled": IngressGuard.keys is not None, "client_id": "medsam3"}

    @api.post("/auth/token", tags=["MONAI Label"])
    def ml_token(self, username: Annotated[str, Form()] = "", password: Annotated[str, Form()] = "") -> JSONResponse:
        """MONAI Label's login: the password is an API key; the token is that key."""
        if IngressGuard.keys is not None and not IngressGuard.keys.allows(f"Bearer {password}"):
            return JSONResponse({"detail": "the password must be a valid API key"}, status_code=401)
        return JSONResponse({"access_token": password, "token_type": "bearer"})

    @api.get("/auth/token/valid", tags=["MONAI Label"])
    def ml_token_valid(self) -> dict:
        return {}  # IngressGuard has checked the key


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder. ``args``: ``checkpoints`` ({id: directory}, the first is the
    default), ``adapters`` ({id: LoRA adapter directory} on the default checkpoint), ``settings``
    (upload limits, ``max_adapters``; ``inference`` overrides of configs/predict.yaml) and, from
    ``medsam3 serve``, ``deployment_options`` ({deployment name: options}) taken from the Serve
    config's ``deployments`` section (``serve run`` applies that section itself)."""
    from medsam3.adapters import check_adapters
    from medsam3.model import check_checkpoint

    checkpoints = {str(k): str(v) for k, v in dict(args.get("checkpoints") or {}).items()}
    adapters = {str(k): str(v) for k, v in dict(args.get("adapters") or {}).items()}
    if not checkpoints:
        raise ValueError("serve needs at least one checkpoint (args.checkpoints)")
    clash = sorted(set(adapters) & set(checkpoints))
    if clash:
        raise ValueError(f"adapter and checkpoint ids must differ: {', '.join(clash)} named twice")
    for path in checkpoints.values():
        check_checkpoint(path)
    check_adapters(adapters, next(iter(checkpoints.values())))  # a bad folder stops here, not in a replica
    settings = OmegaConf.to_container(OmegaConf.create(args.get("settings") or {}), resolve=True)
    options = args.get("deployment_options") or {}
    model = SegmentModel.options(**options.get("SegmentModel", {}))
    ingress = SegmentAPI.options(**options.get("SegmentAPI", {}))
    return ingress.bind(model.bind(checkpoints, settings, adapters), checkpoints, settings, adapters)
