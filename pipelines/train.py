"""``medsam3 train``: fine-tuning of SAM3 with Ray Train driving DeepSpeed (ZeRO-3 by default): the driver.

1. check the settings, the shards and the cluster; split cases into train/validation (whole
   cases, seeded) and record the split in the run folder;
2. build the Ray Data pipelines and start a ``TorchTrainer`` whose workers run
   :class:`pipelines.recipe.FinetuneRecipe` (model, engine, checkpoints, validation);
3. log rank 0's metrics per step (``metrics.jsonl`` and one progress line) and plot the curves.
A run started again with the same RUN_DIR resumes from its latest checkpoint. RUN_DIR may be an
``s3://`` URI: Ray Train keeps checkpoints there, and the run's files are uploaded at each checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from medsam3.io import storage
from medsam3.plans import Plans
from medsam3.ray_local import init_ray, require_reachable
from medsam3.schema import arrow_source, shard_dataset, shard_files, validate_shards
from pipelines.recipe import quiet_report_log, train_loop_per_worker
from pipelines.run_folder import SPLIT_FILE, RunFolder
from pipelines.settings import TrainError, TrainSettings
from pipelines.train_data import case_draw

CaseKey = tuple[str, str]  # (dataset, case_id)


def run_train(shards: str | os.PathLike, run_dir: str | os.PathLike, cfg: DictConfig, address: str | None = None):
    """Train (or resume) a run; returns Ray Train's ``Result``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.clip_data import clip_dataset
    from pipelines.train_data import eval_transform, swap_sides

    settings = TrainSettings.from_config(cfg)  # bad settings stop here, before any worker starts
    if warning := settings.schedule_warning():
        print(f"warning: {warning}", flush=True)
    manifest = validate_shards(shards)
    fraction, seed = settings.val_fraction, settings.seed
    train_cases, val_cases = split_cases(_cases(shards), fraction, seed, validate=settings.val_every > 0)
    held_out = frozenset(val_cases)
    print(f"cases: {len(train_cases)} for training, {len(val_cases)} held out "
          f"(train.val_fraction={fraction:g}, train.seed={seed})")
    cfg.storage = storage.settings()  # workers get the settings in force here (config or environment)
    run = RunFolder(run_dir).open()
    plans = shards_plans(shards, manifest, run)
    if not ray.is_initialized():
        # a local Ray gets a logical CPU for the data pipeline beside the training workers
        local_cpus = None if address else max(os.cpu_count() or 1, settings.cpus_needed)
        init_ray(address, num_cpus=local_cpus, include_dashboard=False, logging_level="WARNING",
                 env=train_environment(settings.use_gpu))
    _check_resources(settings)
    require_reachable({"SHARDS": shards, "RUN_DIR": run.uri}, TrainError)  # before any worker starts
    from medsam3.inference import checkpoint_image_size
    from medsam3.model import build_tokenizer, preset

    size = preset(settings.preset)["image_size"] if settings.model_path is None else \
        checkpoint_image_size(settings.model_path)
    split = {"val_fraction": fraction, "seed": seed, "val": [f"{d}/{c}" for d, c in val_cases],
             "train": [f"{d}/{c}" for d, c in train_cases]}
    steps_per_epoch = _steps_per_epoch(shards, settings, held_out)
    clips = settings.mode == "clips"
    # Files in a seeded order mix datasets and cases along the stream; each epoch then shuffles
    # it further in the workers' seeded buffers. The order is the same in every run with this seed.
    files = shard_files(shards)
    paths, filesystem = arrow_source([files[i] for i in np.random.default_rng(seed).permutation(len(files))])
    # one progress line per step (RunFolder.log_metrics) instead of Ray Data's bars for every epoch
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = ray.data.read_parquet(paths, filesystem=filesystem)
    # augmentation runs in the workers (pipelines/train_data.py says why)
    datasets = {"train": rows.filter(lambda r: (r["dataset"], r["case_id"]) not in held_out)}
    # RGB image + mask per row (a clip holds clip_length of them, padding included)
    decoded_mb = manifest["num_rows"] * 4 * plans.image_size**2 / 2**20 * (settings.clip_length if clips else 1)
    small = decoded_mb <= settings.cache_max_mb
    if clips:  # one row per clip of consecutive slices (pipelines/clip_data.py)
        datasets["train"] = clip_dataset(datasets["train"], settings.clip_length, in_driver=small)
    if settings.val_every:
        val = rows.filter(lambda r: (r["dataset"], r["case_id"]) in held_out)
        datasets["val"] = val.map(eval_transform, fn_kwargs={"size": size})
    if small:  # small shards: read once, not again every epoch
        datasets = {name: data.materialize() for name, data in datasets.items()}
    # the run records what auto resolved to (and the export carries it on)
    cfg.loss.objective, cfg.loss.targets = settings.objective, settings.targets.kind
    OmegaConf.save(cfg, run.local / "train_config.yaml")
    plans.save(run.local)
    (run.local / SPLIT_FILE).write_text(json.dumps(split, indent=1))
    # the prompts the model is trained on (flips swap sides), so inference can flag unseen ones
    shard_prompts = _prompts(shards)
    trained = set(shard_prompts)
    if settings.augment.flip_prob > 0:
        trained |= {swap_sides(p) for p in trained}
    prompts_file = run.local / "prompts.json"
    seen = set(json.loads(prompts_file.read_text())) if prompts_file.is_file() else set()
    prompts_file.write_text(json.dumps(sorted(trained | seen), indent=1))
    tokenizer_dir = run.local / "tokenizer"
    if not tokenizer_dir.is_dir():  # a resumed run keeps the tokenizer it started with
        prompts = sorted({c["label"] for c in manifest["counts"]} | set(shard_prompts))
        build_tokenizer(settings.model_path, settings.bpe_path, prompts, run.local).save_pretrained(tokenizer_dir)
    run.sync()
    # Ray Train writes checkpoints to <storage_path>/<name>: RUN_DIR's parent, on its filesystem
    storage_fs, storage_path = storage.arrow_filesystem(storage.parent(run.uri))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "run_dir": run.uri,
                           "tokenizer_files": {f.name: f.read_bytes() for f in tokenizer_dir.iterdir() if f.is_file()},
                           "image_size": size, "steps_per_epoch": steps_per_epoch},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.num_workers, use_gpu=settings.use_gpu,
            resources_per_worker={"CPU": settings.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=settings.run_name or run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs if run.remote else None,
            callbacks=[_metrics_logger(run)],
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=settings.num_to_keep),
            failure_config=ray.train.FailureConfig(max_failures=settings.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=list(datasets), execution_options=_ingest_options()),
    )
    quiet_report_log()  # the workers do the same in train_loop_per_worker
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:  # retries (FailureConfig) exhausted
        raise TrainError(f"training failed: {exc}") from exc
    finally:
        run.plot_curves()
        run.sync()
    return result


def train_environment(use_gpu: bool) -> dict[str, str]:
    """Environment variables for a Ray that runs training: DeepSpeed's CPU accelerator when no GPU
    is used, and Ray Train's controller polling its workers every 0.2 s. Each ``report`` waits
    until the controller has taken the previous one, and its default interval (2 s) would make
    every step last at least that long."""
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def shards_plans(shards, manifest: dict, run: RunFolder) -> Plans:
    """The shards' preprocessing plans, which the run keeps (export saves them with the model). A
    run resumed on shards made with other settings is refused, naming the settings."""
    if "plans" not in manifest:
        raise TrainError(f"{shards}: the manifest has no preprocessing plans (shards from an older "
                         "medsam3 prepare); prepare them again")
    plans = Plans.from_dict(manifest["plans"])
    before = Plans.load(run.local)
    if before is not None:
        before.require_same(plans, f"run {run.uri}", f"shards {shards}", error=TrainError)
    return plans


def _ingest_options():
    """Ray Train's ingest options with the read order kept: the blocks reach the split in the
    same order in every run, so a seed gives the same batches (and losses) again."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _metrics_logger(run: RunFolder):
    """A Ray Train callback (it runs in the controller, on the driver's node): rank 0's metrics
    to ``metrics.jsonl`` and the console; a remote run's files are uploaded at each checkpoint."""
    from ray.train import UserCallback

    settings = storage.settings()  # the controller is another process: it gets the driver's settings

    class MetricsLogger(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            run.log_metrics(metrics[0])
            if checkpoint is not None and run.remote:
                storage.configure(settings)
                run.sync()

    return MetricsLogger()


def split_cases(cases: Sequence[CaseKey], fraction: float, seed: int,
                validate: bool) -> tuple[list[CaseKey], list[CaseKey]]:
    """(training cases, validation cases): whole cases, a case held out when its seeded draw is
    below ``fraction`` (:func:`pipelines.train_data.case_draw`). With ``validate``
    (train.val_every > 0) at least one case is held out: on few cases the draw easily holds out
    none (2 cases at 0.2: 64%), and validation would then have nothing to score. At least one
    case is always left for training. Validation on fewer than 2 cases is refused (TrainError)."""
    cases = sorted(cases)
    if validate and len(cases) < 2:
        raise TrainError(f"train.val_every > 0 validates on held-out cases, but the shards hold {len(cases)} "
                         "case(s): validation needs at least 2 (one held out, one to train on); "
                         "set train.val_every=0 to train without validation")
    draws = {case: case_draw(*case, seed) for case in cases}
    val = [case for case in cases if draws[case] < fraction]
    if validate and not val:
        val = [min(cases, key=draws.get)]  # the case nearest to being drawn
    if len(val) == len(cases) and cases:
        val.remove(max(val, key=draws.get))  # the one farthest from being drawn trains
    return [case for case in cases if case not in val], val


def _cases(shards) -> list[CaseKey]:
    table = shard_dataset(shard_files(shards)).to_table(columns=["dataset", "case_id"])
    return sorted(set(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True)))


def _steps_per_epoch(shards, settings: TrainSettings, held_out: frozenset[CaseKey]) -> int:
    """Ray Train splits each epoch equally: every worker gets ⌊samples / workers⌋ samples (rows,
    or clips in clip mode) of the cases not ``held_out``."""
    from pipelines.clip_data import count_clips

    table = shard_dataset(shard_files(shards)).to_table(columns=["dataset", "case_id", "prompt", "slice_index"])
    groups: dict[tuple[str, str, str], list[int]] = {}
    for d, c, p, k in zip(*(table.column(i).to_pylist() for i in range(4)), strict=True):
        if (d, c) not in held_out:
            groups.setdefault((d, c, p), []).append(k)
    samples = count_clips(groups, settings.clip_length) if settings.mode == "clips" else \
        sum(len(v) for v in groups.values())
    steps = samples // settings.num_workers // settings.batch_size
    if steps == 0:
        kind = "clip" if settings.mode == "clips" else "row"
        raise TrainError(f"{samples} training {kind}(s) cannot give each of {settings.num_workers} worker(s) "
                         f"a batch of {settings.batch_size}")
    return steps


def _prompts(shards) -> list[str]:
    table = shard_dataset(shard_files(shards)).to_table(columns=["prompt"])
    return sorted(set(table.column(0).to_pylist()))


def _check_resources(settings: TrainSettings) -> None:
    import ray

    available = ray.cluster_resources()
    workers = settings.num_workers
    if settings.use_gpu and available.get("GPU", 0) < workers:
        gpus = available.get("GPU", 0)
        raise TrainError(f"train.num_workers={workers} with GPUs, but the cluster has {gpus:g} GPU(s)")
    if available.get("CPU", 0) < settings.cpus_needed:
        raise TrainError(f"train.num_workers={workers} × train.cpus_per_worker={settings.cpus_per_worker:g} "
                         f"plus 1 CPU for the data pipeline, but the cluster has {available.get('CPU', 0):g} CPU(s)")
