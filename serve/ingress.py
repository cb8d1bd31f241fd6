"""What the ingress's routes share: the served models' preprocessing and prompts, the limits, the
MONAI Label image store, and the one way from a stored upload to the model's masks.

``Ingress`` is the state of one ingress replica (``serve/app.py`` deploys it as ``SegmentAPI``);
both route sets (``serve/v1_routes.py``, ``serve/monailabel_routes.py``) receive it as the
``Replica`` dependency. Pixels are made here with ``medsam3.inference.Preprocessor`` and
segmented by the ``SegmentModel`` replicas (``serve/model.py``), the code path of
``medsam3 predict`` and ``evaluate``.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import Depends
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.guard import IngressGuard
from serve.limits import Budget, BudgetTimeout, retry_after
from serve.model import inference_cfg, served_models
from serve.uploads import UploadError, ZipLimits, unreadable

if TYPE_CHECKING:
    from medsam3.io.declared import Declared

logger = logging.getLogger("ray.serve")
# Peak bytes a volume request holds per voxel, besides one byte per prompt: benchmarks/serve_memory.py
# measures about twice the decoded array (int16 CT: 4, float32: 8) with one prompt, under one more per
# further prompt; a request holds twice its decoded bytes, at least this many per voxel.
BYTES_PER_VOXEL = 8


def reserved_bytes(size: Declared, prompts: int) -> int:
    """What a request for a scan of this declared size holds of ``max_decoded_mb`` while it
    runs: its decoded arrays and their working copies (twice the declared bytes, at least the
    per-voxel cost measured for CT) and one byte per voxel and prompt for the masks."""
    return max(2 * size.decoded_bytes, size.voxels * BYTES_PER_VOXEL) + size.voxels * prompts


class Ingress:
    """One ingress replica's state: what the routes read, and the path they share to the model."""

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
        self.cfg = inference_cfg(settings)
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
                                ttl_s=float(viewer.get("ttl_s", 3600)),
                                key_bytes=int(float(viewer.get("max_store_mb_per_key", 1024)) * 2**20))
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
        self.decoded_wait_s = float(settings.get("decoded_wait_s", 60))

    def check_mode(self, mode: str, model_id: str, checked=None) -> None:
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

    async def segment_scan(self, path: Path, name: str | None, prompts: int, model_id: str, mode: str, ask,
                            answer) -> Response:
        """The one way from a stored upload to an answer (/v1 and MONAI Label): the header's shape
        against the limits, then, holding the request's share of the decoded-memory budget, the
        decoded scan, ``ask(scan)`` → (checked prompts, box texts, context), the model's masks, and
        ``answer(scan, results, context)`` → the response (in a thread)."""
        from medsam3.io.case import CaseError
        from medsam3.io.declared import declared
        from medsam3.io.scan import read_scan

        try:
            held = self.check_size(await asyncio.to_thread(declared, path, self.cfg.channel), prompts)
            async with self.decoded_share(held):
                scan = await asyncio.to_thread(read_scan, path, self.cfg.modality, self.cfg.channel, False)
                self.check_shape(scan.case.image.shape if scan.is_3d else scan.case.image.shape[:2])
                checked, boxes, context = ask(scan)
                if mode == "propagate" and scan.is_3d:
                    results = await self._propagate(scan.case, checked, boxes, model_id)
                else:
                    results = await self._run(scan.case, checked, model_id)
                return await asyncio.to_thread(answer, scan, results, context)
        except CaseError as exc:
            raise unreadable(name, path, exc) from exc

    @asynccontextmanager
    async def decoded_share(self, held: int):
        """Hold ``held`` bytes of the decoded-memory budget while a request decodes and runs;
        503 with Retry-After when other requests keep it full past ``decoded_wait_s``."""
        try:
            async with self.decoded.hold(held, self.decoded_wait_s):
                yield
        except BudgetTimeout as exc:
            retry = retry_after(self.decoded_wait_s)
            raise UploadError(503, f"the server is decoding as many scans as it can hold; retry in {retry} s",
                              {"Retry-After": retry}) from exc

    def check_size(self, size: Declared, prompts: int = 1) -> int:
        """The bytes a request for a scan of this declared size holds while it runs, or 413 when
        its shape passes ``max_side`` / ``max_voxels`` or the bytes pass the whole decoded-memory
        budget (``max_decoded_mb``)."""
        self.check_shape(size.shape)
        held = reserved_bytes(size, prompts)
        if held > self.decoded.total:
            raise UploadError(413, f"image of shape {list(size.shape)} decodes to {size.decoded_bytes / 2**20:.0f} MB "
                                   f"and needs {held / 2**20:.0f} MB with its {prompts} prompt(s), over the "
                                   f"decoded-memory budget of {self.decoded.total / 2**20:.0f} MB (max_decoded_mb)")
        return held

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """413 when a spatial shape passes ``max_side`` / ``max_voxels``."""
        voxels = int(np.prod(shape, dtype=np.float64))
        if max(shape, default=0) > self.max_side or voxels > self.max_voxels:
            raise UploadError(413, f"image of shape {list(shape)} exceeds the limits "
                                   f"(side ≤ {self.max_side}, voxels ≤ {self.max_voxels})")

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


async def replica() -> Ingress:
    """The ingress replica answering this request."""
    return serve.get_replica_context().servable_object


# a route's parameter of this type receives the replica's state (not part of the request)
Replica = Annotated[Ingress, Depends(replica)]
