"""Benchmark of ``medsam3 train`` (run: ``python benchmarks/train.py``).

Prints, on the tiny SAM3 and the synthetic phantom (prepared at 256²), measured in one run:
(a) steady-state samples/s through Ray Train + DeepSpeed ZeRO-3 with 2 workers;
(b) samples/s of the same model, loss, optimizer and batches in one plain PyTorch process;
the per-sample time ratio (a)/(b) (target ≤ 1.5×), and the fraction of (a)'s step time spent
waiting for data (target < 10 %).
With ``--clips``: the same for ``train.mode=clips`` (clips/s) with the tiny video model on the
real CT lesion volumes of ../shared/data (prepared at 224², lesion slices; clips of 4 slices).
With ``--stages``: one run per ZeRO stage (``train.zero_stage`` 0-3) of the ``medium`` preset
(107M parameters, so that model state dominates a worker's memory) on the same batches: per-sample
time against stage 3's, the memory rank 0 holds between steps (median over steps 5+) and its
peak (setup included; resident set on CPU, allocated memory on a GPU).
With ``--full``: the full-size SAM3 (the ``sam3_336`` preset: every weight of the released model,
random values saved to a folder and fine-tuned from it as from released weights, fed 336² images
so that activations fit a 24 GB machine) on 2 ranks with bf16 and activation checkpointing:
``medsam3 train`` (2 Ray Train workers, ZeRO-3), then the same engine in 2 plain DeepSpeed
processes at stages 3, 2 and 1: seconds per step, every rank's peak memory against the
model-state arithmetic of docs/cluster.md, and the runs that do not fit.
The figures are also written as JSON (``--json``, default ``benchmarks/results/train.json``; one
section per mode, a run replaces only its own).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

SECTIONS = {
    "images": {
        "title": "medsam3 train: Ray Train + DeepSpeed ZeRO-3 against one plain process (images)",
        "measures": "Steady-state samples per second of the tiny SAM3 trained through Ray Train + DeepSpeed ZeRO-3 "
                    "with 2 workers against the same model, loss, optimizer and batches in one plain PyTorch "
                    "process, and the share of step time spent waiting for data.",
        "run": "python benchmarks/train.py",
    },
    "clips": {
        "title": "medsam3 train, train.mode=clips: ZeRO-3 against one plain process (3D clips)",
        "measures": "The same comparison for clip training: the tiny video model on clips of 4 lesion slices of the "
                    "real CT lesion volumes, clips per second, and the share of step time spent waiting for data.",
        "run": "python benchmarks/train.py --clips",
    },
    "stages": {
        "title": "ZeRO stages 0-3 (train.zero_stage)",
        "measures": "Per-sample time and rank 0's memory of the same training (the medium preset, 107M parameters, "
                    "same batches) at each DeepSpeed ZeRO stage, and the loss each reaches.",
        "run": "python benchmarks/train.py --stages",
    },
    "full": {
        "title": "The full-size SAM3 trained on CPU (ZeRO stages 3, 2, 1)",
        "measures": "Seconds per step and every rank's peak memory of the full-size model (sam3_336 preset: the "
                    "released model's weights in shape, random values, 336² input) trained on 2 ranks with bf16 "
                    "and activation checkpointing, by `medsam3 train` (2 Ray Train workers) and by the same engine "
                    "in 2 plain DeepSpeed processes, against the model state that docs/cluster.md's arithmetic "
                    "gives a rank.",
        "run": "python benchmarks/train.py --full",
    },
}

# DeepSpeed buffers sized for a 24 GB machine (elements; DeepSpeed's defaults in brackets): the
# optimizer steps 10^8 parameters at a time [10^9: a rank's fp32 gradient copy of 1.7 GB at once],
# gradients are reduced in buckets of 5·10^7 [5·10^8: a 1 GB bucket], and at most 10^8 gathered
# parameters stay live [10^9: the whole model, gathered on every rank].
TIGHT_BUFFERS = {"sub_group_size": 100_000_000, "reduce_bucket_size": 50_000_000,
                 "stage3_max_live_parameters": 100_000_000, "stage3_max_reuse_distance": 100_000_000}

# Bytes of model state per parameter under mixed-precision AdamW: bf16 weights (2) and gradients
# (2), fp32 master weights and two moments (12); ZeRO stage s divides the terms it shards.
STATE_BYTES = {3: lambda n: 16 / n, 2: lambda n: 2 + 14 / n, 1: lambda n: 4 + 12 / n}


def optimizer_step(loss, model, optimizer, scheduler, cfg) -> None:
    """Backward, clipping and the optimizer and schedule steps, as DeepSpeed does them."""
    import torch

    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg.optim.gradient_clipping))
    optimizer.step()
    scheduler.step()


def plain_samples_per_s(shards: Path, run_dir: Path, cfg, steps: int) -> float:
    """The same per-worker batches, model, loss and optimizer in this process (no Ray, no DeepSpeed)."""
    import pyarrow.dataset as pads
    import torch
    from transformers import AutoTokenizer

    from medsam3.losses import set_loss
    from medsam3.model import build_model, enable_activation_checkpointing
    from medsam3.ops import enable_box_prompts
    from medsam3.optim import inverse_sqrt_schedule, param_groups
    from medsam3.schema import shard_files
    from pipelines.settings import TrainSettings
    from pipelines.train_data import Augmentation, collate, sample_rng, stack_rows, train_transform

    enable_box_prompts()
    torch.manual_seed(0)
    model = build_model(cfg.model.preset)
    if cfg.train.activation_checkpointing:  # the same recomputation as the ZeRO-3 run
        enable_activation_checkpointing(model)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim))
    scheduler = inverse_sqrt_schedule(optimizer, cfg.optim, int(cfg.train.max_steps))
    settings = TrainSettings.from_config(cfg)
    rows = pads.dataset(shard_files(shards), format="parquet").to_table().to_pylist()
    rng = np.random.default_rng(0)
    size, batch = 224, int(cfg.train.batch_size)
    augment = Augmentation.from_config(cfg.train)
    times = []
    for step in range(steps):
        chosen = [rows[i] for i in rng.integers(len(rows), size=batch)]
        rngs = [sample_rng(0, step, row) for row in chosen]
        picked = [train_transform(row, size, augment, r) for row, r in zip(chosen, rngs, strict=True)]
        numpy_batch = stack_rows(picked)
        started = time.perf_counter()
        inputs, targets = collate(numpy_batch, tokenizer, rngs, float(cfg.train.box_prompt_prob),
                                  targets_from=settings.targets)
        optimizer_step(set_loss(model(**inputs), targets, settings.loss)["loss"], model, optimizer, scheduler, cfg)
        if step >= 4:
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def plain_clips_per_s(shards: Path, run_dir: Path, cfg, steps: int) -> float:
    """Clip mode's per-worker batches, model, losses and optimizer in this process."""
    import pyarrow.dataset as pads
    import torch
    from transformers import AutoTokenizer

    from medsam3.clip_model import Sam3VideoForClipTraining, tracker_loss, valid_frames
    from medsam3.losses import set_loss
    from medsam3.model import enable_activation_checkpointing
    from medsam3.ops import enable_box_prompts
    from medsam3.optim import inverse_sqrt_schedule, param_groups
    from medsam3.schema import shard_files
    from medsam3.video import build_video_model
    from pipelines.clip_data import CLIP_KEYS, augment_clips, collate_clips, make_clips, step_seed_kind
    from pipelines.settings import TrainSettings
    from pipelines.train_data import Augmentation

    enable_box_prompts()
    torch.manual_seed(0)
    model = build_video_model(cfg.model.preset, None, Sam3VideoForClipTraining).train()
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model.detector_model)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim))
    scheduler = inverse_sqrt_schedule(optimizer, cfg.optim, int(cfg.train.max_steps))
    settings = TrainSettings.from_config(cfg)
    table = pads.dataset(shard_files(shards), format="parquet").to_table().to_pandas()
    length, batch = int(cfg.train.clip_length), int(cfg.train.batch_size)
    clips = []
    for _, group in table.groupby(list(CLIP_KEYS)):
        made = make_clips({c: group[c].to_numpy() for c in group.columns}, length)
        clips += [{k: v[i] for k, v in made.items()} for i in range(len(made["prompt"]))]
    rng = np.random.default_rng(0)
    augment = Augmentation.from_config(cfg.train)
    t = cfg.train
    times = []
    for step in range(steps):
        chosen = [clips[i] for i in rng.integers(len(clips), size=batch)]
        numpy_batch = {k: np.array([c[k] for c in chosen], dtype=object) for k in chosen[0]}
        rows, frame_rngs, clip_rngs, valid = augment_clips(numpy_batch, 224, augment, 0, step, length)
        started = time.perf_counter()
        inputs, targets, masks, valid = collate_clips(rows, tokenizer, frame_rngs, clip_rngs, valid,
                                                      float(t.box_prompt_prob), float(t.box_noise),
                                                      float(t.box_noise_max_px), settings.targets,
                                                      step_seed_kind(settings.clip_seed, 0, step + 1))
        outputs = model(**inputs)
        loss = set_loss(*valid_frames(outputs.detector, targets, valid)[:2], settings.loss)["loss"]
        optimizer_step(loss + sum(tracker_loss(outputs, masks, valid, settings.loss).values()), model, optimizer,
                       scheduler, cfg)
        if step >= 4:
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--clips", action="store_true", help="train.mode=clips on the real CT lesion volumes")
    parser.add_argument("--stages", action="store_true", help="ZeRO stages 0-3 compared (medium preset)")
    parser.add_argument("--full", action="store_true", help="the full-size model (sam3_336), ZeRO stages 3, 2, 1")
    parser.add_argument("--json", default=None, help="where the figures go (default: benchmarks/results/train.json)")
    parser.add_argument("overrides", nargs="*", help="train config overrides for both runs, e.g. "
                        "train.zero_optimization.stage3_param_persistence_threshold=1e7")
    args = parser.parse_args()

    import ray

    from medsam3.config import load_config
    from medsam3.phantom import write_phantom_dataset
    from pipelines.train import run_train, train_environment
    from preprocessing.prepare import run_prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from medsam3.ray_local import init_ray

        # --full: two ranks of the full-size model fill this machine. Ray's default kills workers at
        # 95 % of its memory (the kernel's OOM killer is the real limit), and glibc's per-thread
        # malloc arenas keep freed memory in a process of many threads
        memory_limit = {"RAY_memory_usage_threshold": "0.99", "MALLOC_ARENA_MAX": "2"} if args.full else {}
        init_ray(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 env={**train_environment(use_gpu=False), **memory_limit})
        clip_mode = []
        if args.full:
            write_phantom_dataset(tmp / "phantom", 2, (96, 96, 16))
            run_prepare(tmp / "phantom", tmp / "shards", load_config("prepare", ["image_size=336"]))
            full_size(tmp, args.steps, args.overrides, args.json)
            return
        if args.stages:
            write_phantom_dataset(tmp / "phantom", 3, (96, 96, 32))
            run_prepare(tmp / "phantom", tmp / "shards", load_config("prepare", ["image_size=224"]))
            compare_stages(tmp, args.steps, args.overrides, args.json)
            return
        if args.clips:
            run_prepare(ROOT.parent / "shared" / "data" / "medsam2-recist-ct", tmp / "shards",
                        load_config("prepare", ["image_size=224", "modality=CT", "empty_fraction=0"]))
            clip_mode = ["model.preset=tiny_video", "train.mode=clips", "train.clip_length=4", "train.batch_size=1"]
        else:
            write_phantom_dataset(tmp / "phantom", 3, (96, 96, 32))
            run_prepare(tmp / "phantom", tmp / "shards", load_config("prepare", ["image_size=256"]))
        cfg = load_config("train", [f"train.max_steps={args.steps}", "train.checkpoint_every=100000",
                                    "train.val_every=0", "train.val_fraction=0", *clip_mode, *args.overrides])
        run_train(tmp / "shards", tmp / "run", cfg)
        ray.shutdown()
        log = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][4:]
        workers, batch = int(cfg.train.num_workers), int(cfg.train.batch_size)
        ray_rate = statistics.median(m["samples_per_s"] for m in log)
        wait = sum(m["data_wait_s"] for m in log) / sum(m["data_wait_s"] + m["step_s"] for m in log)
        plain = plain_clips_per_s if args.clips else plain_samples_per_s
        plain_rate = plain(tmp / "shards", tmp / "run", cfg, args.steps)
        unit = f"clips of {cfg.train.clip_length} slices" if args.clips else "samples"
        what = "tiny video SAM3, real CT lesion clips" if args.clips else "tiny SAM3"
        print(f"\ntrain throughput, {what} at 224², batch {batch} per worker, steady state (steps 5-{args.steps}):")
        print(f"  (a) Ray Train + DeepSpeed ZeRO-3, {workers} workers: {ray_rate:6.2f} {unit}/s")
        print(f"  (b) one plain PyTorch process:                {plain_rate:6.2f} {unit}/s")
        print(f"  per-sample time (a)/(b): {plain_rate / ray_rate:.2f}x   (target <= 1.5x)")
        print(f"  data wait in (a): {100 * wait:.1f} % of step time   (target < 10 %)")

        section = "clips" if args.clips else "images"
        unit = "clips/s" if args.clips else "samples/s"
        setup = (f"{what} at 224², {workers} workers × 1 CPU, batch {batch} per worker"
                 + (f", clips of {cfg.train.clip_length} slices" if args.clips else "")
                 + f", steady state (median of steps 5-{args.steps})"
                 + (f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""))
        record.write_section(
            args.json or record.default_path(__file__), __file__, SECTIONS, section,
            tables=[record.table(setup, ["measure", "figure"], [
                [f"Ray Train + DeepSpeed ZeRO-3, {workers} workers", f"{ray_rate:.2f} {unit}"],
                ["the same model, loss, optimizer and batches in one plain PyTorch process",
                 f"{plain_rate:.2f} {unit}"],
                ["per-sample time, ZeRO-3 / plain", f"{plain_rate / ray_rate:.2f}×"],
                ["step time spent waiting for data (ZeRO-3 run)", f"{100 * wait:.1f} %"]])],
            targets=[record.target("per-sample time, ZeRO-3 / plain", round(plain_rate / ray_rate, 2), "<= 1.5"),
                     record.target("step time waiting for data (%)", round(100 * wait, 1), "< 10")])


def compare_stages(tmp: Path, steps: int, overrides: list[str], json_path: str | None = None) -> None:
    """One run per ZeRO stage on the same batches; a table of per-sample time and peak memory."""
    from medsam3.config import load_config
    from pipelines.train import run_train

    rows = []
    for stage in (3, 2, 1, 0):
        cfg = load_config("train", ["model.preset=medium", f"train.zero_stage={stage}", f"train.max_steps={steps}",
                                    "train.checkpoint_every=100000", "train.val_every=0", "train.val_fraction=0",
                                    *overrides])
        run_train(tmp / "shards", tmp / f"stage{stage}", cfg)
        log = [json.loads(line) for line in (tmp / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()]
        rate = statistics.median(m["samples_per_s"] for m in log[4:])
        held = statistics.median(m["memory_mb"] for m in log[4:])
        rows.append((stage, rate, held, max(m["peak_memory_mb"] for m in log), log[-1]["loss"]))
    stage3 = rows[0][1]
    workers, batch = int(cfg.train.num_workers), int(cfg.train.batch_size)
    print(f"\nZeRO stages, medium SAM3 (107M parameters) at 224², {workers} CPU workers, batch {batch} per worker, "
          f"steps 5-{steps}:")
    print("  stage | samples/s | per-sample time vs stage 3 | rank 0 holds between steps | rank 0 peak, setup "
          "included | loss at the last step")
    for stage, rate, held, peak, loss in rows:
        print(f"  {stage:5d} | {rate:9.2f} | {stage3 / rate:25.2f}x | {held:23,.0f} MB | {peak:25,.0f} MB | {loss:.3f}")

    record.write_section(
        json_path or record.default_path(__file__), __file__, SECTIONS, "stages",
        tables=[record.table(
            f"medium SAM3 (107M parameters) at 224², phantom shards, {workers} CPU workers × batch {batch}, "
            f"{steps} steps (rates: median of steps 5-{steps})",
            ["stage", "samples/s", "per-sample time vs stage 3", "rank 0 holds between steps",
             "rank 0 peak, setup included", "loss at the last step"],
            [[stage, f"{rate:.2f}", f"{stage3 / rate:.2f}×", f"{held:,.0f} MB", f"{peak:,.0f} MB", f"{loss:.3f}"]
             for stage, rate, held, peak, loss in rows])])


def full_config(model: Path, stage: int, steps: int, overrides: list[str]):
    """The --full run's train config at ZeRO ``stage``, fine-tuning the weights in ``model``."""
    from medsam3.config import load_config

    return load_config("train", [
        f"model.path={model}", "loss.objective=detr", f"train.zero_stage={stage}", "train.precision=bf16",
        "train.activation_checkpointing=true", "train.batch_size=1", f"train.max_steps={steps}",
        "train.checkpoint_every=100000", "train.val_every=0", "train.val_fraction=0", "train.max_failures=0",
        "optim.warmup_steps=1", "optim.cooldown_steps=1",
        *[f"train.zero_optimization.{k}={v}" for k, v in TIGHT_BUFFERS.items()], *overrides])


def worker_peaks(stop, peaks: dict[int, float]) -> None:
    """Sample the resident set of every Ray Train worker until ``stop`` is set (MB, the highest
    seen per process): a worker the kernel kills reports nothing itself."""
    import psutil

    while not stop.wait(1.0):
        for proc in psutil.process_iter(["pid", "cmdline", "memory_info"]):
            if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []) and proc.info["memory_info"]:
                rss = proc.info["memory_info"].rss / 2**20
                peaks[proc.info["pid"]] = max(peaks.get(proc.info["pid"], 0.0), rss)


def ray_train_full(tmp: Path, model: Path, steps: int, overrides: list[str]) -> tuple[str, list[float]]:
    """``medsam3 train`` of the full-size model at ZeRO-3, 2 Ray Train workers: the outcome and
    the workers' sampled peak memory (MB)."""
    import threading

    from pipelines.train import run_train

    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=worker_peaks, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        run_train(tmp / "shards", tmp / "ray_full", full_config(model, 3, steps, overrides))
        log = [json.loads(line) for line in (tmp / "ray_full" / "metrics.jsonl").read_text().splitlines()]
        outcome = f"{statistics.median(m['step_s'] for m in log[1:]):.1f} s per step"
    except Exception as error:  # noqa: BLE001  (running out of memory is the result)
        done = len((tmp / "ray_full" / "metrics.jsonl").read_text().splitlines()) \
            if (tmp / "ray_full" / "metrics.jsonl").exists() else 0
        outcome = f"stopped after {done} of {steps} steps: {str(error).splitlines()[0][:80]}"
    finally:
        stop.set()
        sampler.join()
    return outcome, sorted(peaks.values(), reverse=True)[:2]


def plain_rank(rank: int, world: int, port: int, shards: str, model_dir: str, stage: int, steps: int,
               overrides: list[str], queue) -> None:
    """One rank of a plain DeepSpeed run (no Ray): the recipe's model, partitioned construction,
    optimizer, engine, batches and loss; puts (step seconds, peak RSS MB, losses) on ``queue``."""
    import os
    import resource

    import pyarrow.dataset as pads
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as a Ray Train worker with one CPU
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    from transformers import AutoTokenizer

    from medsam3.losses import set_loss
    from medsam3.model import enable_activation_checkpointing, load_detector, partitioned_construction
    from medsam3.ops import enable_box_prompts
    from medsam3.optim import inverse_sqrt_schedule, param_groups
    from medsam3.schema import shard_files
    from pipelines.recipe import engine_inputs
    from pipelines.settings import TrainSettings
    from pipelines.train_data import Augmentation, collate, sample_rng, stack_rows, train_transform

    cfg = full_config(Path(model_dir), stage, steps, overrides)
    settings = TrainSettings.from_config(cfg)
    enable_box_prompts()
    with partitioned_construction(settings.deepspeed_config()):  # as the recipe loads model.path
        model = load_detector(model_dir)
    enable_activation_checkpointing(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim))
    scheduler = inverse_sqrt_schedule(optimizer, cfg.optim, steps)
    engine, _, _, _ = deepspeed.initialize(model=model.train(), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=settings.deepspeed_config())
    move = engine_inputs(engine)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pads.dataset(shard_files(shards), format="parquet").to_table().to_pylist()
    rng, augment = np.random.default_rng(rank), Augmentation.from_config(cfg.train)
    times, losses = [], []
    for step in range(steps):
        chosen = [rows[i] for i in rng.integers(len(rows), size=1)]
        rngs = [sample_rng(0, step, row) for row in chosen]
        batch = stack_rows([train_transform(row, 336, augment, r) for row, r in zip(chosen, rngs, strict=True)])
        started = time.perf_counter()
        inputs, targets = collate(batch, tokenizer, rngs, float(cfg.train.box_prompt_prob),
                                  targets_from=settings.targets)
        loss = set_loss(engine(**move(inputs)), targets, settings.loss)["loss"]
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - started)
        losses.append(float(loss))
    queue.put((rank, times, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, losses))
    dist.destroy_process_group()


def plain_deepspeed_full(tmp: Path, model: Path, stage: int, steps: int, overrides: list[str]) -> dict | None:
    """2 plain DeepSpeed processes at ZeRO ``stage``; None when a rank dies (out of memory)."""
    import multiprocessing
    import queue as queues
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    found = context.Queue()
    ranks = [context.Process(target=plain_rank, args=(rank, 2, port, str(tmp / "shards"), str(model), stage, steps,
                                                      overrides, found)) for rank in range(2)]
    for process in ranks:
        process.start()
    results = {}
    while len(results) < 2:
        try:
            rank, times, peak, losses = found.get(timeout=10)
            results[rank] = (times, peak, losses)
        except queues.Empty:
            if any(p.exitcode not in (None, 0) for p in ranks):
                for process in ranks:
                    process.kill()
                return None
    for process in ranks:
        process.join()
    return {"step_s": statistics.median(t for t in results[0][0][1:]), "peaks": [results[r][1] for r in (0, 1)],
            "losses": results[0][2]}


def full_size(tmp: Path, steps: int, overrides: list[str], json_path: str | None = None) -> None:
    """The full-size model, saved with random weights and fine-tuned from that folder as from
    released weights: ``medsam3 train`` with 2 Ray Train workers at ZeRO-3, then the same model,
    batches and engine in 2 plain DeepSpeed processes at stages 3, 2 and 1."""
    import ray
    import torch

    from benchmarks.inference import tiny_checkpoint
    from medsam3.model import build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model("sam3_336").parameters())
    model = tiny_checkpoint(tmp / "sam3_336", "sam3_336")  # random weights, the CLIP tokenizer
    outcome, ray_peaks = ray_train_full(tmp, model, steps, overrides)
    ray.shutdown()
    print(f"  Ray Train, ZeRO-3: {outcome}; workers' peak {', '.join(f'{p / 1024:.1f}' for p in ray_peaks)} GB")
    rows = [["Ray Train (`medsam3 train`), 2 workers", 3, outcome,
             " / ".join(f"{p / 1024:.1f} GB" for p in ray_peaks), f"{STATE_BYTES[3](2) * params / 1e9:.1f} GB"]]
    for stage in (3, 2, 1):
        state_gb = STATE_BYTES[stage](2) * params / 1e9
        result = plain_deepspeed_full(tmp, model, stage, steps, overrides)
        if result is None:
            print(f"  plain DeepSpeed, stage {stage}: a rank died (out of memory)")
            rows.append(["plain DeepSpeed, 2 processes", stage, "a rank was killed: out of memory", "",
                         f"{state_gb:.1f} GB"])
            break
        peaks = " / ".join(f"{p / 1024:.1f} GB" for p in result["peaks"])
        print(f"  plain DeepSpeed, stage {stage}: {result['step_s']:.1f} s per step, peak per rank {peaks} "
              f"(model state by arithmetic {state_gb:.1f} GB), loss "
              + " ".join(f"{v:.1f}" for v in result["losses"]))
        rows.append(["plain DeepSpeed, 2 processes", stage, f"{result['step_s']:.1f} s per step", peaks,
                     f"{state_gb:.1f} GB"])
    record.write_section(
        json_path or record.default_path(__file__), __file__, SECTIONS, "full",
        tables=[record.table(
            f"full-size SAM3 ({params / 1e6:.0f}M parameters, sam3_336 preset) at 336², phantom shards, 2 ranks × "
            f"1 CPU × batch 1, bf16, activation checkpointing, {steps} steps (seconds per step: median of steps "
            f"2-{steps}); peak resident memory per rank (rank 0 / 1; Ray workers sampled each second)",
            ["run", "ZeRO stage", "result", "peak per rank", "model state per rank by arithmetic"], rows)],
        notes=FULL_NOTES)


FULL_NOTES = [
    "This machine has 23.5 GB. The Ray cluster's own processes (raylet, GCS, the train controller, "
    "Ray Data's actors, the driver) hold about 2.5 GB, so two ranks of the full-size model do not fit beside "
    "them: a Ray Train worker is killed for memory (by Ray's monitor or the kernel) at the first optimizer "
    "step, which allocates the Adam moments, while two plain processes with the same engine fit.",
    "Model state by arithmetic: 16 bytes per parameter (bf16 weights and gradients, fp32 master weights and "
    "two Adam moments; docs/cluster.md), divided as the stage shards it. DeepSpeed's buffers are set small "
    "for this machine (TIGHT_BUFFERS in benchmarks/train.py).",
]


if __name__ == "__main__":
    main()
