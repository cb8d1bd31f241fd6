"""``medsam3 train``: full fine-tuning of SAM3 with Ray Train driving DeepSpeed ZeRO-3.

The recipe, top to bottom (the canonical Ray + DeepSpeed loop):
1. driver: check the shards and the cluster, split cases into train/validation, build the
   Ray Data pipelines (augmentation runs in Ray Data), start a ``TorchTrainer``;
2. each worker: build SAM3 and its tokenizer, AdamW with per-module learning rates, and a
   DeepSpeed ZeRO-3 engine; restore the latest checkpoint if the run already has one;
3. stream the worker's shard, match and compute the losses, step; every N steps each rank saves
   its ZeRO-3 shard and all report one ``ray.train.Checkpoint``;
4. rank 0 reports every loss term, the learning rate and samples/s, and every K steps the
   validation Dice over all ranks' held-out samples (queries selected as ``predict`` does); the
   driver's node logs them to ``metrics.jsonl`` and the console, and plots the curves.
A run started again with the same RUN_DIR resumes from its latest checkpoint. RUN_DIR may be an
``s3://`` URI: Ray Train keeps checkpoints there, and the logs are uploaded at each checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from medsam3.errors import StageError
from medsam3.io import storage
from medsam3.ray_local import init_ray
from medsam3.schema import arrow_source, shard_dataset, shard_files, validate_shards
from pipelines.train_data import in_validation

TRAINER_STATE = "trainer_state.json"


class TrainError(StageError):
    """The run cannot start (bad shards, not enough resources) or was stopped (NaN loss)."""


PRECISIONS = ("auto", "fp32", "bf16")


def precision(cfg: DictConfig) -> str:
    """``train.precision`` resolved: ``auto`` is bf16 with GPUs and fp32 on CPU."""
    value = str(cfg.train.precision)
    if value not in PRECISIONS:
        raise TrainError(f"train.precision={value!r}: expected one of {', '.join(PRECISIONS)}")
    return ("bf16" if cfg.train.use_gpu else "fp32") if value == "auto" else value


def deepspeed_config(cfg: DictConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": int(cfg.train.batch_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(cfg.optim.gradient_clipping),
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                              **OmegaConf.to_container(cfg.train.zero_optimization, resolve=True)},
        "bf16": {"enabled": precision(cfg) == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --- worker ----------------------------------------------------------------------------------

def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs."""
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from medsam3.losses import set_loss
    from medsam3.model import build_model, enable_activation_checkpointing
    from medsam3.ops import enable_box_prompts
    from medsam3.optim import inverse_sqrt_schedule, param_groups
    from pipelines.train_data import collate

    cfg = OmegaConf.create(config["cfg"])
    storage.configure(cfg.get("storage"))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seed = int(cfg.train.seed)
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed)  # same initial weights on every rank
    enable_box_prompts()
    model = build_model(cfg.model.preset, cfg.model.path)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    with tempfile.TemporaryDirectory() as folder:  # the driver's tokenizer, shipped as bytes to any node
        for file, data in config["tokenizer_files"].items():
            Path(folder, file).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim))
    scheduler = inverse_sqrt_schedule(optimizer, cfg.optim, int(cfg.train.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
    )
    rng = np.random.default_rng(seed * 1000 + rank)
    step = 0
    steps_per_epoch = int(config["steps_per_epoch"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            engine.load_checkpoint(folder, tag="checkpoint")
            step = int(json.loads((Path(folder) / TRAINER_STATE).read_text())["step"])
            rng_file = Path(folder) / f"rng_rank{rank}.json"
            if rng_file.is_file():  # absent when the world size changed: keep the fresh stream
                rng.bit_generator.state = json.loads(rng_file.read_text())

    weights = OmegaConf.to_container(cfg.loss, resolve=True)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if cfg.train.val_every else None
    to_engine = engine_inputs(engine)
    batch_size = int(cfg.train.batch_size)
    while step < int(cfg.train.max_steps):
        # The data position is (epoch, batch in epoch) = divmod(step, steps_per_epoch): a resumed or
        # restarted run skips the batches its epoch already trained on, then finishes that epoch.
        # Ray Data's streaming split hands rows to workers as they ask, so which rows make up the
        # rest of an interrupted epoch may differ from an uninterrupted run; within a worker the
        # order is a shuffle seeded by (seed, epoch).
        epoch, done = divmod(step, steps_per_epoch)
        batches = train_shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=int(cfg.train.shuffle_buffer) or None,
            local_shuffle_seed=int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
        waited_from = time.perf_counter()
        for index, batch in enumerate(batches):
            if index >= steps_per_epoch:
                break
            if index < done:
                continue
            started = time.perf_counter()
            data_wait = started - waited_from
            inputs, targets = collate(batch, tokenizer, rng, float(cfg.train.box_prompt_prob),
                                      float(cfg.train.box_noise), float(cfg.train.box_noise_max_px),
                                      int(cfg.loss.max_instances) or None)
            outputs = engine(**to_engine(inputs))
            # non-finite outputs would already break the matching, so check them before the loss
            finite = all(torch.isfinite(t).all() for t in (outputs.pred_logits, outputs.pred_boxes))
            terms = set_loss(outputs, targets, weights) if finite else None
            if terms is None or not torch.isfinite(terms["loss"]):
                where = ", ".join(f"{c}#{s}" for c, s in zip(batch["case_id"], batch["slice_index"], strict=True))
                raise TrainError(f"non-finite loss at step {step + 1} on samples {where}; "
                                 "the last good checkpoint is kept")
            loss = terms["loss"]
            engine.backward(loss)
            engine.step()
            step += 1
            step_time = time.perf_counter() - started
            metrics = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[-1] if scheduler else 0.0,
                       "samples_per_s": batch_size * world / (step_time + data_wait),
                       "step_s": step_time, "data_wait_s": data_wait,
                       "dtype": str(outputs.pred_logits.dtype).removeprefix("torch."),
                       **{k: float(v) for k, v in terms.items()},
                       "train_dice": float(np.mean(merged_dice(outputs, batch["mask"], float(cfg.train.threshold)))),
                       "samples": _gather_sample_ids(batch, world)}
            if val_shard is not None and step % int(cfg.train.val_every) == 0:
                metrics["val_dice"], metrics["val_samples"] = validation_dice(engine, val_shard, tokenizer, cfg)
            if step % int(cfg.train.checkpoint_every) == 0 or step >= int(cfg.train.max_steps):
                with tempfile.TemporaryDirectory() as folder:
                    engine.save_checkpoint(folder, tag="checkpoint")
                    # every rank's files land in one checkpoint folder (Ray merges them)
                    (Path(folder) / f"rng_rank{rank}.json").write_text(json.dumps(rng.bit_generator.state))
                    if rank == 0:
                        (Path(folder) / TRAINER_STATE).write_text(json.dumps({"step": step, "epoch": epoch}))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)
            waited_from = time.perf_counter()
            if step >= int(cfg.train.max_steps):
                break
        if step < int(cfg.train.max_steps) and step != (epoch + 1) * steps_per_epoch:
            raise TrainError(f"rank {rank}: epoch {epoch} ended after {step - epoch * steps_per_epoch} of "
                             f"{steps_per_epoch} batches")
    # A fixed probe batch through the trained engine (a collective: every rank runs it); rank 0
    # keeps the outputs so an export can be checked against the engine it came from.
    engine.eval()
    with torch.no_grad():
        probe = probe_inputs(tokenizer, int(config["image_size"]))
        out = engine(**to_engine(probe))
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({"pred_logits": out.pred_logits.float().cpu(), "pred_boxes": out.pred_boxes.float().cpu()}, buffer)
        storage.write_bytes(storage.join(config["run_dir"], "probe_outputs.pt"), buffer.getvalue())


def engine_inputs(engine):
    """A function moving a batch of model inputs to the engine's device, floating-point ones in
    its parameters' dtype (bf16 engines take bf16 pixels and boxes; ids and masks stay integer)."""
    import torch

    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32

    def move(inputs: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(engine.device, dtype) if v.is_floating_point() else v.to(engine.device)
                for k, v in inputs.items()}

    return move


def _gather_sample_ids(batch, world: int) -> list[str]:
    """Every rank's ``case_id#slice_index`` of this step, in rank order (for the log)."""
    import torch.distributed as dist

    mine = [f"{c}#{s}" for c, s in zip(batch["case_id"], batch["slice_index"], strict=True)]
    if world == 1 or not dist.is_initialized():
        return mine
    every: list[list[str] | None] = [None] * world
    dist.all_gather_object(every, mine)
    return [sample for rank in every for sample in rank]


def probe_inputs(tokenizer, size: int) -> dict[str, Any]:
    """A deterministic batch (a smooth synthetic image, two prompts) for comparing models."""
    import torch

    from medsam3.model import tokenize

    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    image = torch.stack([xx, yy, (xx * yy)]).clamp(-1, 1)
    tokens = tokenize(tokenizer, ["liver", "left kidney"])
    return {"pixel_values": image[None].repeat(2, 1, 1, 1), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"]}


def merged_dice(outputs, masks: np.ndarray, threshold: float) -> list[float]:
    """Dice of each sample's prediction made as inference makes it (``select_queries``): the masks
    of the queries whose score × presence exceeds ``threshold``, merged; empty when none passes."""
    import torch
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


def validation_dice(engine, shard, tokenizer, cfg: DictConfig) -> tuple[float, int]:
    """Mean Dice over the validation samples of every rank (their sums are all-reduced), text
    prompts only and inference's selection rule; returns (mean, samples). Ray Train splits the
    validation rows equally, so every rank runs the same number of batches (ZeRO-3 needs that)."""
    import torch
    import torch.distributed as dist

    from pipelines.train_data import collate

    total, count = 0.0, 0
    to_engine = engine_inputs(engine)
    engine.eval()
    with torch.no_grad():
        for i, batch in enumerate(shard.iter_batches(batch_size=int(cfg.train.batch_size), batch_format="numpy")):
            if i >= int(cfg.train.val_batches):
                break
            inputs, _ = collate(batch, tokenizer, np.random.default_rng(0))
            scores = merged_dice(engine(**to_engine(inputs)), batch["mask"], float(cfg.train.threshold))
            total, count = total + sum(scores), count + len(scores)
    engine.train()
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"  # NCCL reduces device tensors only
    sums = torch.tensor([total, count], dtype=torch.float64, device=engine.device if nccl else "cpu")
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (float(sums[0] / sums[1]) if sums[1] else float("nan")), int(sums[1])


def log_metrics(log_dir: Path, metrics: dict[str, Any]) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(metrics) + "\n")
    shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in metrics.items() if k != "samples")
    print(shown, flush=True)


# Files the driver keeps beside the checkpoints (a remote run's local working copy holds these).
RUN_FILES = ("train_config.yaml", "prompts.json", "metrics.jsonl", "curves.csv", "curves.png")


def _is_run_file(relative: str) -> bool:
    return relative in RUN_FILES or relative.startswith("tokenizer/")


def _metrics_logger(log_dir: Path, run_dir: str):
    """A Ray Train callback (it runs in the controller, on the driver's node): rank 0's metrics
    to ``metrics.jsonl`` and the console; a remote run's files are uploaded at each checkpoint."""
    from ray.train import UserCallback

    settings = storage.settings()  # the controller is another process: it gets the driver's settings

    class MetricsLogger(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            log_metrics(log_dir, metrics[0])
            if checkpoint is not None and storage.is_remote(run_dir):
                storage.configure(settings)
                sync_run_files(log_dir, run_dir)

    return MetricsLogger()


def sync_run_files(log_dir: Path, run_dir: str) -> None:
    """Upload the driver's run files (logs, curves, tokenizer) to a remote run folder."""
    fs, inner = storage.filesystem(run_dir)
    for file in [*(log_dir / f for f in RUN_FILES), *sorted((log_dir / "tokenizer").glob("*"))]:
        if file.is_file():
            fs.put_file(os.fspath(file), f"{inner}/{file.relative_to(log_dir).as_posix()}")


def working_dir(run_dir: str) -> Path:
    """Where the driver writes the run's own files: RUN_DIR itself, or for an ``s3://`` run a
    local copy of those files (fetched from the run when it is resumed)."""
    if not storage.is_remote(run_dir):
        return Path(run_dir)
    local = storage.cache_folder("runs", run_dir)
    remote = [f for f in storage.listing(run_dir) if _is_run_file(f)]
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    if remote:
        storage.download(run_dir, local, remote)
    return local


# --- driver ----------------------------------------------------------------------------------

def run_train(shards: str | os.PathLike, run_dir: str | os.PathLike, cfg: DictConfig, address: str | None = None):
    """Train (or resume) a run; returns Ray Train's ``Result``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.train_data import eval_transform, swap_sides, train_transform

    manifest = validate_shards(shards)  # before any worker starts
    precision(cfg)  # a bad value stops here
    cfg.storage = storage.settings()  # workers get the settings in force here (config or environment)
    run_dir = os.fspath(run_dir) if storage.is_remote(run_dir) else os.fspath(Path(run_dir).absolute())
    log_dir = working_dir(run_dir)
    if not ray.is_initialized():
        # a local Ray gets a logical CPU for the data pipeline beside the training workers
        local_cpus = None if address else max(os.cpu_count() or 1, _cpus_needed(cfg))
        init_ray(address, num_cpus=local_cpus, include_dashboard=False, logging_level="WARNING",
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not cfg.train.use_gpu else None)
    _check_resources(cfg)
    from medsam3.inference import checkpoint_image_size
    from medsam3.model import build_tokenizer, preset

    size = preset(cfg.model.preset)["image_size"] if cfg.model.path is None else checkpoint_image_size(cfg.model.path)
    fraction, seed = float(cfg.train.val_fraction), int(cfg.train.seed)
    steps_per_epoch = _steps_per_epoch(shards, cfg)
    # Files in a seeded order mix datasets and cases along the stream; each epoch then shuffles
    # it further in the workers' seeded buffers. The order is the same in every run with this seed.
    files = shard_files(shards)
    paths, filesystem = arrow_source([files[i] for i in np.random.default_rng(seed).permutation(len(files))])
    rows = ray.data.read_parquet(paths, filesystem=filesystem)
    train = rows.filter(lambda r: not in_validation(r["dataset"], r["case_id"], fraction, seed))
    datasets = {"train": train.map(train_transform, fn_kwargs={"size": size, "cfg": dict(cfg.train)})}
    if cfg.train.val_every:
        val = rows.filter(lambda r: in_validation(r["dataset"], r["case_id"], fraction, seed))
        datasets["val"] = val.map(eval_transform, fn_kwargs={"size": size})
    log_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, log_dir / "train_config.yaml")
    # the prompts the model is trained on (flips swap sides), so inference can flag unseen ones
    shard_prompts = _prompts(shards)
    trained = set(shard_prompts)
    if float(cfg.train.flip_prob) > 0:
        trained |= {swap_sides(p) for p in trained}
    prompts_file = log_dir / "prompts.json"
    seen = set(json.loads(prompts_file.read_text())) if prompts_file.is_file() else set()
    prompts_file.write_text(json.dumps(sorted(trained | seen), indent=1))
    tokenizer_dir = log_dir / "tokenizer"
    if not tokenizer_dir.is_dir():  # a resumed run keeps the tokenizer it started with
        prompts = sorted({c["label"] for c in manifest["counts"]} | set(shard_prompts))
        build_tokenizer(cfg.model.path, cfg.model.bpe_path, prompts, log_dir).save_pretrained(tokenizer_dir)
    if storage.is_remote(run_dir):
        sync_run_files(log_dir, run_dir)
    # Ray Train writes checkpoints to <storage_path>/<name>: RUN_DIR's parent, on its filesystem
    storage_fs, storage_path = storage.arrow_filesystem(storage.parent(run_dir))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": run_dir,
                           "tokenizer_files": {f.name: f.read_bytes() for f in tokenizer_dir.iterdir() if f.is_file()},
                           "image_size": size, "steps_per_epoch": steps_per_epoch},
        scaling_config=ray.train.ScalingConfig(
            num_workers=int(cfg.train.num_workers), use_gpu=bool(cfg.train.use_gpu),
            resources_per_worker={"CPU": float(cfg.train.cpus_per_worker)},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.run_name or storage.name(run_dir),
            storage_path=storage_path,
            storage_filesystem=storage_fs if storage.is_remote(run_dir) else None,
            callbacks=[_metrics_logger(log_dir, run_dir)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=int(cfg.train.num_to_keep)),
            failure_config=ray.train.FailureConfig(max_failures=int(cfg.train.max_failures)),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # retries (FailureConfig) exhausted
        raise TrainError(f"training failed: {exc}") from exc
    finally:
        plot_curves(log_dir)
        if storage.is_remote(run_dir):
            sync_run_files(log_dir, run_dir)
    return result


def _steps_per_epoch(shards, cfg: DictConfig) -> int:
    """Ray Train splits each epoch equally: every worker gets ⌊rows / workers⌋ rows."""
    table = shard_dataset(shard_files(shards)).to_table(columns=["dataset", "case_id"])
    fraction, seed = float(cfg.train.val_fraction), int(cfg.train.seed)
    rows = sum(not in_validation(d, c, fraction, seed)
               for d, c in zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
    workers, batch = int(cfg.train.num_workers), int(cfg.train.batch_size)
    steps = rows // workers // batch
    if steps == 0:
        raise TrainError(f"{rows} training row(s) cannot give each of {workers} worker(s) a batch of {batch}")
    return steps


def _prompts(shards) -> list[str]:
    table = shard_dataset(shard_files(shards)).to_table(columns=["prompt"])
    return sorted(set(table.column(0).to_pylist()))


def _check_resources(cfg: DictConfig) -> None:
    import ray

    available = ray.cluster_resources()
    workers = int(cfg.train.num_workers)
    if cfg.train.use_gpu and available.get("GPU", 0) < workers:
        gpus = available.get("GPU", 0)
        raise TrainError(f"train.num_workers={workers} with GPUs, but the cluster has {gpus:g} GPU(s)")
    if available.get("CPU", 0) < _cpus_needed(cfg):
        raise TrainError(f"train.num_workers={workers} × train.cpus_per_worker={cfg.train.cpus_per_worker} "
                         f"plus 1 CPU for the data pipeline, but the cluster has {available.get('CPU', 0):g} CPU(s)")


def _cpus_needed(cfg: DictConfig) -> float:
    return int(cfg.train.num_workers) * float(cfg.train.cpus_per_worker) + 1


def plot_curves(run_dir: Path) -> Path | None:
    """metrics.jsonl → curves.png (loss terms, lr, validation Dice)."""
    log = Path(run_dir) / "metrics.jsonl"
    if not log.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    # the same curves as CSV for `dvc plots show` (one row per step; last record of a redone step)
    by_step = {r["step"]: r for r in records}
    columns = ["step", "loss", "train_dice", "val_dice", "lr", "samples_per_s"]
    lines = [",".join(columns)] + [",".join(str(by_step[k].get(c, "")) for c in columns) for k in sorted(by_step)]
    (Path(run_dir) / "curves.csv").write_text("\n".join(lines) + "\n")
    steps = [r["step"] for r in records]
    terms = [k for k in records[-1] if k not in ("step", "epoch", "lr", "samples_per_s", "val_dice", "train_dice",
                                                 "step_s", "data_wait_s", "samples")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in terms:
        axes[0].plot(steps, [r.get(key, math.nan) for r in records], label=key)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[0].set_title("loss terms")
    axes[1].plot(steps, [r["lr"] for r in records])
    axes[1].set_title("learning rate (heads)")
    val = [(r["step"], r["val_dice"]) for r in records if "val_dice" in r]
    if val:
        axes[2].plot(*zip(*val, strict=True), marker="o")
    axes[2].set_title("validation Dice")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


# --- export ----------------------------------------------------------------------------------

def latest_checkpoint(run_dir: str | os.PathLike) -> str:
    """The newest complete checkpoint folder of a run (by its step), local or remote."""
    found = []
    for file in storage.listing(run_dir):
        parts = file.split("/")
        if len(parts) == 2 and parts[0].startswith("checkpoint_") and parts[1] == TRAINER_STATE:
            step = json.loads(storage.read_text(storage.join(run_dir, file)))["step"]
            found.append((step, storage.join(run_dir, parts[0])))
    if not found:
        raise TrainError(f"{run_dir}: no checkpoint with {TRAINER_STATE}; not a medsam3 training run")
    return max(found)[1]


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Consolidate the latest ZeRO-3 checkpoint into a Hugging Face directory
    (config.json, model.safetensors, tokenizer files) that ``Sam3Model.from_pretrained`` loads.
    Either side may be an ``s3://`` URI."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer

    from medsam3.model import build_model

    checkpoint = latest_checkpoint(run_dir)
    with tempfile.TemporaryDirectory(prefix="medsam3-export-") as tmp:
        # a remote run: fetch the newest checkpoint and the run's own files
        local_run = Path(tmp, "run") if storage.is_remote(run_dir) else Path(run_dir)
        local_checkpoint = Path(checkpoint) if not storage.is_remote(run_dir) else local_run / storage.name(checkpoint)
        if storage.is_remote(run_dir):
            wanted = [f for f in storage.listing(run_dir)
                      if f.startswith(f"{storage.name(checkpoint)}/") or _is_run_file(f)]
            storage.download(run_dir, local_run, wanted)
        cfg = OmegaConf.load(local_run / "train_config.yaml")
        model = build_model(cfg.model.preset, cfg.model.path)
        state = get_fp32_state_dict_from_zero_checkpoint(str(local_checkpoint), tag="checkpoint")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
            raise TrainError(f"{checkpoint}: weights do not fit the model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        prompts = local_run / "prompts.json"
        with storage.staged_output(out_dir, last=["model.safetensors"]) as staging:
            model.save_pretrained(staging)
            AutoTokenizer.from_pretrained(local_run / "tokenizer").save_pretrained(staging)
            (staging / "medsam3_export.json").write_text(json.dumps(
                {"run": storage.name(run_dir), "checkpoint": storage.name(checkpoint),
                 "step": json.loads((local_checkpoint / TRAINER_STATE).read_text())["step"],
                 "prompts": json.loads(prompts.read_text()) if prompts.is_file() else None}, indent=1))
    return os.fspath(out_dir)
