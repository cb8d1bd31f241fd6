"""The Ray Serve application: a FastAPI ingress and batched, multiplexed SAM3 model replicas.

    client ──HTTP──► SegmentAPI (FastAPI ingress: limits, upload → scan → SliceItems, responses)
                        │  one call per (slice, prompt) item, routed by model id
                        ▼
                     SegmentModel replicas (@serve.multiplexed checkpoints, @serve.batch: items of
                     concurrent requests go through the model together; autoscaled)

The ingress serves two route sets, FastAPI routers on one replica state (``serve/ingress.py``):
the endpoint's own API (``serve/v1_routes.py``) and the MONAI Label protocol
(``serve/monailabel_routes.py``). The model replicas are ``serve/model.py``. ``build_app`` is
the application builder that ``configs/serve.yaml`` (``serve run`` / ``serve deploy`` / KubeRay's
RayService) and ``medsam3 serve`` both use.
"""

from typing import Any

from fastapi import FastAPI
from omegaconf import OmegaConf
from ray import serve

from serve import monailabel_routes, v1_routes
from serve.guard import IngressGuard
from serve.ingress import Ingress
from serve.model import SegmentModel

api = FastAPI(title="MedSAM3", description="Prompt-driven segmentation of medical images with SAM3 "
              "fine-tuned on medical data. POST a scan and text prompts to /v1/segment.")
api.add_middleware(IngressGuard)  # API keys and the body limit, before any body is read
api.include_router(v1_routes.router)
api.include_router(monailabel_routes.router)


@serve.deployment(name="SegmentAPI", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class SegmentAPI(Ingress):
    """One ingress replica: ``api``'s routes, each given this replica's state (``Replica``)."""


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
