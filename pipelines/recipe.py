"""What each Ray Train worker runs: fine-tuning of SAM3 under DeepSpeed (full, or LoRA), as a recipe.

``FinetuneRecipe`` reads the run's settings once, sets up the model (every weight trained, or
LoRA adapters: ``train.method``), tokenizer and engine (ZeRO stage ``train.zero_stage``),
restores the latest checkpoint (weights, optimizer, step, each rank's torch RNG), then ``train``
streams the worker's shard, augments each sample from its own seeded stream, steps, validates
over every rank and checkpoints. The driver (``pipelines/train.py``) starts it on every worker.
"""

from __future__ import annotations

import io
import json
import logging
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from medsam3.io import storage
from pipelines.run_folder import TRAINER_STATE
from pipelines.settings import TrainError, TrainSettings


def train_loop_per_worker(config: dict[str, Any]) -> None:
    quiet_report_log()
    recipe = FinetuneRecipe(config)
    recipe.setup()
    recipe.train()
    recipe.save_probe_outputs()


def quiet_report_log() -> logging.Logger:
    """Ray Train's log of each ``ray.train.report``, warnings and errors only: at INFO every rank
    logs every step's report ("Reporting training result ... TrainingReport(...)", about 1,000
    characters), which buries the driver's one progress line per step. Returns that logger."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)  # a logger named after context.py's path, not ray.train's
    return context.logger


class FinetuneRecipe:
    def __init__(self, config: dict[str, Any]):
        import ray.train

        self.cfg = OmegaConf.create(config["cfg"])
        self.settings = TrainSettings.from_config(self.cfg)
        storage.configure(self.cfg.get("storage"))
        self.run_dir: str = config["run_dir"]
        self.image_size = int(config["image_size"])
        self.steps_per_epoch = int(config["steps_per_epoch"])
        self.tokenizer_files: dict[str, bytes] = config["tokenizer_files"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.step = 0

    # --- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        import ray.train

        self.setup_seeds()
        model = self.setup_model()
        self.tokenizer = self.setup_tokenizer()
        self.setup_engine(model)
        self.load_checkpoint()
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if self.settings.val_every else None

    def setup_seeds(self) -> None:
        seed = self.settings.seed
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed)  # the same initial weights on every rank

    def setup_model(self):
        from medsam3.model import (
            build_model,
            checkpoint_type,
            enable_activation_checkpointing,
            partitioned_construction,
        )
        from medsam3.ops import enable_box_prompts

        enable_box_prompts()
        clips, path = self.settings.mode == "clips", self.settings.model_path
        # ZeRO-3 loads trained weights partitioned. A preset's random weights are built whole, so a
        # seed gives the same initial weights at every stage, and so is a video model assembled
        # from an image checkpoint and a random tracker (it copies whole state dicts).
        partitioned = path is not None and not (clips and checkpoint_type(path) != "sam3_video")
        with partitioned_construction(self.settings.deepspeed_config() if partitioned else None):
            if clips:  # the video model, with a training forward
                from medsam3.clip_model import Sam3VideoForClipTraining
                from medsam3.video import build_video_model

                model = build_video_model(self.settings.preset, path, Sam3VideoForClipTraining)
            else:
                model = build_model(self.settings.preset, path)
        if clips and self.settings.zero_stage == 3:
            model.register_zero3_parameters()
        detector = model.detector_model if clips else model
        if self.settings.activation_checkpointing:
            enable_activation_checkpointing(detector)
        if self.settings.method == "lora":  # adapters injected into the (checkpointed) layers in place
            from medsam3.lora import apply_lora

            model = apply_lora(model, self.settings.lora)
        return model.train()

    def setup_tokenizer(self):
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as folder:  # the driver's tokenizer, shipped as bytes to any node
            for file, data in self.tokenizer_files.items():
                Path(folder, file).write_bytes(data)
            return AutoTokenizer.from_pretrained(folder)

    def setup_engine(self, model) -> None:
        import deepspeed

        from medsam3.lora import lora_param_groups
        from medsam3.optim import inverse_sqrt_schedule, param_groups

        groups = lora_param_groups if self.settings.method == "lora" else param_groups
        optimizer = torch.optim.AdamW(groups(model, self.settings.optim))
        scheduler = inverse_sqrt_schedule(optimizer, self.settings.optim, self.settings.max_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.settings.deepspeed_config())
        self.to_engine = engine_inputs(self.engine)

    # --- checkpoints -------------------------------------------------------------------------

    def load_checkpoint(self) -> None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return
        with checkpoint.as_directory() as folder:
            self.engine.load_checkpoint(folder, tag="checkpoint")
            self.step = int(json.loads((Path(folder) / TRAINER_STATE).read_text())["step"])
            rng_file = Path(folder) / f"torch_rng_rank{self.rank}.pt"
            if rng_file.is_file():  # absent when the world size grew: keep this rank's fresh stream
                set_rng_state(torch.load(rng_file, weights_only=True))

    def save_checkpoint(self, metrics: dict[str, Any], epoch: int) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            self.engine.save_checkpoint(folder, tag="checkpoint")
            # every rank's files land in one checkpoint folder (Ray merges them)
            torch.save(rng_state(), Path(folder) / f"torch_rng_rank{self.rank}.pt")
            if self.rank == 0:
                (Path(folder) / TRAINER_STATE).write_text(json.dumps({"step": self.step, "epoch": epoch}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    # --- training ----------------------------------------------------------------------------

    def train(self) -> None:
        import ray.train

        s = self.settings
        if self.step == 0 and s.model_path and self.val_shard is not None:
            # trained weights: the held-out Dice they start from, the baseline fine-tuning must keep
            val_dice, val_samples = self.validate()
            ray.train.report({"step": 0, "max_steps": s.max_steps, "lr": 0.0, "val_dice": val_dice,
                              "val_samples": val_samples})
        started = time.perf_counter()
        first_step = self.step
        while self.step < s.max_steps:
            # The data position is (epoch, batch in epoch) = divmod(step, steps_per_epoch): a resumed
            # or restarted run skips the batches its epoch already trained on, then finishes that
            # epoch. Ray Data's streaming split hands rows to workers as they ask, so which rows make
            # up the rest of an interrupted epoch may differ from an uninterrupted run; within a
            # worker the order is a shuffle seeded by (seed, epoch), and each sample's augmentation
            # is seeded by (seed, epoch, sample).
            epoch, done = divmod(self.step, self.steps_per_epoch)
            batches = self.train_shard.iter_batches(
                batch_size=s.batch_size, batch_format="numpy", drop_last=True,
                local_shuffle_buffer_size=s.shuffle_buffer or None,
                local_shuffle_seed=int(np.random.SeedSequence([s.seed, epoch]).generate_state(1)[0]))
            waited_from = time.perf_counter()
            for index, batch in enumerate(batches):
                if index >= self.steps_per_epoch:
                    break
                if index < done:
                    continue
                metrics = self.train_step(batch, epoch, data_wait=time.perf_counter() - waited_from)
                elapsed = time.perf_counter() - started
                metrics["eta_s"] = elapsed / (self.step - first_step) * (s.max_steps - self.step)
                if self.val_shard is not None and self.step % s.val_every == 0:
                    metrics["val_dice"], metrics["val_samples"] = self.validate()
                if self.step % s.checkpoint_every == 0 or self.step >= s.max_steps:
                    self.save_checkpoint(metrics, epoch)
                else:
                    ray.train.report(metrics)
                waited_from = time.perf_counter()
                if self.step >= s.max_steps:
                    break
            if self.step < s.max_steps and self.step != (epoch + 1) * self.steps_per_epoch:
                raise TrainError(f"rank {self.rank}: epoch {epoch} ended after "
                                 f"{self.step - epoch * self.steps_per_epoch} of {self.steps_per_epoch} batches")

    def train_step(self, batch: dict[str, np.ndarray], epoch: int, data_wait: float) -> dict[str, Any]:
        from medsam3.losses import set_loss

        s = self.settings
        started = time.perf_counter()
        rows, inputs, targets, clips = self.make_batch(batch, epoch)
        augment_s = time.perf_counter() - started
        outputs = self.engine(**self.to_engine(inputs))
        detector, dice_masks = (outputs.detector if clips else outputs), np.asarray(rows["mask"])
        if clips:
            from medsam3.clip_model import tracker_dice, tracker_loss, valid_frames
            from pipelines.clip_data import SEED_KINDS

            masks, valid = clips
            detector, targets, kept = valid_frames(detector, targets, valid)
            dice_masks = dice_masks[kept]
        # non-finite outputs would already break the matching, so check them before the loss
        finite = all(torch.isfinite(t).all() for t in (detector.pred_logits, detector.pred_boxes))
        terms = set_loss(detector, targets, s.loss) if finite else None
        extra = {}
        if terms is not None and clips:
            tracked = tracker_loss(outputs, masks, valid, s.loss)
            terms = terms | tracked | {"loss": terms["loss"] + sum(tracked.values())}
            extra["tracker_dice"] = tracker_dice(outputs, masks, valid)
            extra["seed_kind"] = SEED_KINDS[int(inputs["seed_kinds"][0])]
        if terms is None or not torch.isfinite(terms["loss"]):
            where = ", ".join(f"{c}#{i}" for c, i in zip(rows["case_id"], rows["slice_index"], strict=True))
            raise TrainError(f"non-finite loss at step {self.step + 1} on samples {where}; "
                             "the last good checkpoint is kept")
        self.engine.backward(terms["loss"])
        self.engine.step()
        self.step += 1
        step_s = time.perf_counter() - started - augment_s
        seconds = time.perf_counter() - started + data_wait
        return {"step": self.step, "max_steps": s.max_steps, "epoch": epoch,
                "lr": self.scheduler.get_last_lr()[-1] if self.scheduler else 0.0,
                "samples_per_s": s.batch_size * self.world / seconds,
                "frames_per_s": s.frames_per_batch * self.world / seconds,
                "step_s": step_s, "data_wait_s": data_wait + augment_s, **memory_mb(),
                "dtype": str(detector.pred_logits.dtype).removeprefix("torch."),
                **{k: float(v) for k, v in terms.items()}, **extra,
                "train_dice": float(np.mean(merged_dice(detector, dice_masks, s.threshold))),
                **self.gather_from_ranks(batch)}

    def make_batch(self, batch: dict[str, np.ndarray], epoch: int):
        """Shard rows (or clip rows) → (augmented model rows, model inputs, detector targets, and
        in clip mode the tracker's (masks, valid frames); else None)."""
        from pipelines.train_data import augment_batch, collate

        s = self.settings
        if s.mode == "clips":
            from pipelines.clip_data import augment_clips, collate_clips, step_seed_kind

            rows, frame_rngs, clip_rngs, valid = augment_clips(batch, self.image_size, s.augment, s.seed, epoch,
                                                               s.clip_length)
            kind = step_seed_kind(s.clip_seed, s.seed, self.step + 1)
            inputs, targets, masks, valid = collate_clips(rows, self.tokenizer, frame_rngs, clip_rngs, valid,
                                                          s.box_prompt_prob, s.box_noise, s.box_noise_max_px,
                                                          s.targets, kind, s.clip_corrections)
            return rows, inputs, targets, (masks, valid)
        rows, rngs = augment_batch(batch, self.image_size, s.augment, s.seed, epoch)
        inputs, targets = collate(rows, self.tokenizer, rngs, s.box_prompt_prob, s.box_noise,
                                  s.box_noise_max_px, s.targets)
        return rows, inputs, targets, None

    def validate(self) -> tuple[float, int]:
        """Mean Dice over the validation samples of every rank (their sums are all-reduced), text
        prompts only and inference's selection rule; returns (mean, samples). Ray Train splits the
        validation rows equally, so every rank runs the same number of batches (ZeRO-3 needs that)."""
        import torch.distributed as dist

        from pipelines.train_data import collate

        s = self.settings
        total, count = 0.0, 0
        self.engine.eval()
        with torch.no_grad():
            for i, batch in enumerate(self.val_shard.iter_batches(batch_size=s.batch_size, batch_format="numpy")):
                if i >= s.val_batches:
                    break
                inputs, _ = collate(batch, self.tokenizer)
                scores = merged_dice(self.engine(**self.to_engine(inputs)), batch["mask"], s.threshold)
                total, count = total + sum(scores), count + len(scores)
        self.engine.train()
        nccl = dist.is_initialized() and dist.get_backend() == "nccl"  # NCCL reduces device tensors only
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.engine.device if nccl else "cpu")
        if dist.is_initialized():
            dist.all_reduce(sums)
        return (float(sums[0] / sums[1]) if sums[1] else float("nan")), int(sums[1])

    def gather_from_ranks(self, rows: dict[str, np.ndarray]) -> dict[str, list]:
        """For the log, in rank order: every rank's ``case_id#slice_index`` of this step (a clip's
        first slice) and every rank's peak memory so far (ranks differ: rank 0 gathers more)."""
        import torch.distributed as dist

        mine = {"samples": [f"{c}#{i}" for c, i in zip(rows["case_id"], rows["slice_index"], strict=True)],
                "rank_peak_memory_mb": [memory_mb()["peak_memory_mb"]]}
        if self.world == 1 or not dist.is_initialized():
            return mine
        every: list[dict[str, list] | None] = [None] * self.world
        dist.all_gather_object(every, mine)
        return {key: [item for rank in every for item in rank[key]] for key in mine}

    def save_probe_outputs(self) -> None:
        """A fixed probe batch through the trained engine (a collective: every rank runs it); rank 0
        keeps the outputs so an export can be checked against the engine it came from."""
        self.engine.eval()
        with torch.no_grad():
            out = self.engine(**self.to_engine(probe_inputs(self.tokenizer, self.image_size)))
        if self.rank == 0:
            buffer = io.BytesIO()
            torch.save({"pred_logits": out.pred_logits.float().cpu(), "pred_boxes": out.pred_boxes.float().cpu()},
                       buffer)
            storage.write_bytes(storage.join(self.run_dir, "probe_outputs.pt"), buffer.getvalue())


def memory_mb() -> dict[str, float]:
    """This worker's memory after the step (``memory_mb``: what it holds between steps, model and
    optimizer state above all) and its peak so far (``peak_memory_mb``, setup included): the GPU's
    allocated memory, or on CPU the process's resident set."""
    if torch.cuda.is_available():
        return {"memory_mb": torch.cuda.memory_allocated() / 2**20,
                "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20}
    import resource

    import psutil

    return {"memory_mb": psutil.Process().memory_info().rss / 2**20,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB on Linux


def rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU generator and, on a GPU worker, its device's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def engine_inputs(engine):
    """A function moving a batch of model inputs to the engine's device, floating-point ones in
    its parameters' dtype (bf16 engines take bf16 pixels and boxes; ids and masks stay integer)."""
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    def move(inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(engine.device, dtype) if v.is_floating_point() else v.to(engine.device)
                for k, v in inputs.items()}

    return move


def probe_inputs(tokenizer, size: int) -> dict[str, Any]:
    """A deterministic batch (a smooth synthetic image, two prompts) for comparing models."""
    from medsam3.model import tokenize

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([xx, yy, (xx * yy)]).clamp(-1, 1)
    tokens = tokenize(tokenizer, ["liver", "left kidney"])
    return {"pixel_values": image[None].repeat(2, 1, 1, 1), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"]}


def merged_dice(outputs, masks: np.ndarray, threshold: float) -> list[float]:
    """Dice of each sample's prediction made as inference makes it (``select_queries``): the masks
    of the queries whose score × presence exceeds ``threshold``, merged; empty when none passes."""
    import torch.nn.functional as F

    from medsam3.inference import select_queries

    with torch.no_grad():
        _, keep = select_queries(outputs.pred_logits.float(), outputs.presence_logits.float(), threshold)
        pred = F.interpolate(outputs.pred_masks.float(), size=masks[0].shape, mode="bilinear") > 0
        merged = (pred & keep[:, :, None, None]).any(1).cpu().numpy()
    scores = []
    for p, gt in zip(merged, masks, strict=True):
        gt = np.asarray(gt) > 0
        total = p.sum() + gt.sum()
        scores.append(1.0 if total == 0 else float(2 * (p & gt).sum() / total))
    return scores
