"""The model replicas: the ``SegmentModel`` deployment, batched and multiplexed.

Each replica holds up to 4 checkpoints (``@serve.multiplexed``, LRU) and answers the (slice,
prompt) items of concurrent requests together (``@serve.batch``) with
``medsam3.inference.Segmenter.run_items``, the code path of ``medsam3 predict``. A LoRA adapter
(``adapters``: {name: folder}) rides on the default checkpoint: its items reach the replicas
holding that checkpoint, which switch adapters per batch group (``medsam3.adapters``: loaded on
first use, LRU-evicted beyond ``max_adapters``, the base never reloaded).
"""

import asyncio
import json
from typing import Any

from ray import serve

from medsam3.adapters import AdapterError
from medsam3.ray_local import keep_serve_replicas_on_loopback

# runs in every replica process, model or ingress (serve/ingress.py imports this module), before
# its gRPC server starts
keep_serve_replicas_on_loopback()


def served_models(checkpoints: dict[str, str], adapters: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """Every model id a request may name → (the checkpoint id replicas load, the adapter or None);
    adapters ride on the default (first) checkpoint."""
    default = next(iter(checkpoints))
    return {**{name: (name, None) for name in checkpoints}, **{name: (default, name) for name in adapters}}


def inference_cfg(settings: dict[str, Any]):
    """configs/predict.yaml with the app's ``inference`` and ``storage`` settings applied."""
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
        self.cfg = inference_cfg(settings)
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
