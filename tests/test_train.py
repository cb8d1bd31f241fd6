"""Full fine-tuning end to end on CPU: 2 Ray Train workers, DeepSpeed ZeRO-3, the tiny SAM3,
real CT slices from ../shared/data through `prepare`."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medsam3.config import load_config
from pipelines.export import export_run
from pipelines.recipe import probe_inputs
from pipelines.run_folder import RunFolder
from pipelines.settings import TrainError
from pipelines.train import run_train
from preprocessing.prepare import run_prepare
from tests.builders import SAMMED2D, WorkerKiller

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A handful of real CT slices: both livers, a spleen and a hip bone (4 rows)."""
    root = tmp_path_factory.mktemp("train")
    subset = root / "ct2d"
    (subset / "images").mkdir(parents=True)
    (subset / "masks").mkdir()
    for image, masks in {"amos_0004_75": ["liver_000"], "amos_0006_90": ["liver_000", "spleen_000"],
                         "s0619_32": ["hip_left_000", "hip_left_001"]}.items():
        shutil.copy(SAMMED2D / "images" / f"{image}.png", subset / "images")
        for mask in masks:
            shutil.copy(SAMMED2D / "masks" / f"{image}_{mask}.png", subset / "masks")
    out = root / "shards"
    run_prepare(subset, out, load_config("prepare", ["image_size=256", "modality=CT", "empty_fraction=0"]))
    return out


def train_cfg(*overrides):
    return load_config("train", ["train.val_every=0", "train.val_fraction=0", *overrides])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "overfit"
    # Overfitting a handful of fixed samples: no augmentation, no box prompts, larger steps.
    fixed = ["train.crop_scale=[1.0,1.0]", "train.crop_ratio=[1.0,1.0]", "train.flip_prob=0",
             "train.intensity_jitter=0", "train.box_prompt_prob=0", "optim.warmup_steps=5", "optim.cooldown_steps=0",
             "optim.lr_heads=3e-3",
             "optim.lr_backbone=1e-3", "optim.lr_prompt=1e-3", "optim.lr_detr_encoder=1e-3"]
    result = run_train(shards, run_dir, train_cfg("train.max_steps=80", "train.checkpoint_every=40", *fixed))
    assert result.error is None
    return run_dir, result


def test_overfits_real_samples(trained):
    run_dir, result = trained
    log = metrics(run_dir)
    assert [m["step"] for m in log] == list(range(1, 81))
    first, last = log[0]["loss"], sum(m["loss"] for m in log[-5:]) / 5
    assert last < first / 2, (first, last)
    early, late = (sum(m["train_dice"] for m in part) / 5 for part in (log[:5], log[-5:]))
    assert late > early + 0.3, (early, late)
    assert {"class", "presence", "box_l1", "giou", "mask_focal", "mask_dice", "lr", "samples_per_s"} <= set(log[-1])
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert result.metrics["step"] == 80


def test_export_loads_and_matches_the_trained_engine(trained, tmp_path):
    from transformers import AutoTokenizer, Sam3Model

    run_dir, _ = trained
    out = Path(export_run(run_dir, tmp_path / "model"))
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    model = Sam3Model.from_pretrained(out, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        got = model(**probe_inputs(tokenizer, 224))
    want = torch.load(run_dir / "probe_outputs.pt")
    assert torch.allclose(got.pred_logits, want["pred_logits"], atol=1e-4)
    assert torch.allclose(got.pred_boxes, want["pred_boxes"], atol=1e-5)
    assert json.loads((out / "medsam3_export.json").read_text())["step"] == 80


def test_fine_tuned_beats_its_starting_point_in_evaluate(trained, shards, tmp_path):
    """The paper's comparison in miniature: `evaluate` on the overfitted slices, the exported
    model against the exact weights training started from (tiny, seed 0)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from medsam3.inference import inference_config
    from medsam3.model import build_model
    from pipelines.evaluate import run_evaluate

    run_dir, _ = trained
    tuned = Path(export_run(run_dir, tmp_path / "tuned"))
    vanilla = tmp_path / "vanilla"
    torch.manual_seed(0)  # as train_loop_per_worker does with train.seed=0
    build_model("tiny").save_pretrained(vanilla)
    AutoTokenizer.from_pretrained(run_dir / "tokenizer").save_pretrained(vanilla)
    cfg = inference_config(["gallery=0", "prepare.image_size=256", "split=all"], stage="evaluate")  # training cases
    run_evaluate(shards, [f"vanilla={vanilla}", f"tuned={tuned}"], tmp_path / "report", cfg)
    table = pd.read_csv(tmp_path / "report" / "metrics.csv")
    dice = table[table["mode"] == "text"].groupby("checkpoint")["dice"].mean()
    assert dice["tuned"] > max(0.5, dice["vanilla"] + 0.3), dice.to_dict()
    assert json.loads((tuned / "medsam3_export.json").read_text())["prompts"]  # trained prompts recorded


def holding_out(case: str) -> int:
    """A seed whose validation split (fraction 0.5) of the 3 cases of ``shards`` is ``case`` alone."""
    from pipelines.train_data import in_validation

    cases = ("amos_0004_75", "amos_0006_90", "s0619_32")
    wanted = [c == case for c in cases]
    return next(s for s in range(1000) if [in_validation("ct2d", c, 0.5, s) for c in cases] == wanted)


def test_bf16_zero3_on_cpu_trains_validates_and_exports(shards, tmp_path):
    """The dtype half of the GPU path: DeepSpeed's bf16 on its CPU accelerator, 2 ZeRO-3 workers,
    box prompts on (roi_align on bf16 features); float32 losses fall, the export loads in fp32.
    Validation holds out the case with two rows (liver and spleen): its Dice is reduced over both
    ranks' rows, one each (not rank 0's share)."""
    from transformers import AutoTokenizer, Sam3Model

    fixed = ["train.crop_scale=[1.0,1.0]", "train.crop_ratio=[1.0,1.0]", "train.flip_prob=0",
             "train.intensity_jitter=0", "train.box_prompt_prob=1.0", "optim.warmup_steps=3", "optim.cooldown_steps=0",
             "optim.lr_heads=3e-3",
             "optim.lr_backbone=1e-3", "optim.lr_prompt=1e-3", "optim.lr_detr_encoder=1e-3"]
    validation = [f"train.seed={holding_out('amos_0006_90')}", "train.val_fraction=0.5", "train.val_every=8",
                  "train.val_batches=100", "train.batch_size=1"]
    run_dir = tmp_path / "bf16"
    result = run_train(shards, run_dir, load_config("train", ["train.precision=bf16", "train.max_steps=16",
                                                              "train.checkpoint_every=16", *fixed, *validation]))
    assert result.error is None
    log = metrics(run_dir)
    assert {m["dtype"] for m in log} == {"bfloat16"} and len(log) == 16
    validated = [m for m in log if "val_dice" in m]
    assert [m["step"] for m in validated] == [8, 16]
    assert all(m["val_samples"] == 2 and 0.0 <= m["val_dice"] <= 1.0 for m in validated)
    assert all(math.isfinite(m["loss"]) for m in log)
    first, last = (sum(m["loss"] for m in part) / 4 for part in (log[:4], log[-4:]))
    assert last < 0.8 * first, (first, last)
    model = Sam3Model.from_pretrained(export_run(run_dir, tmp_path / "model"))
    assert next(model.parameters()).dtype == torch.float32
    probe = probe_inputs(AutoTokenizer.from_pretrained(tmp_path / "model"), 224)
    with torch.no_grad():
        assert torch.isfinite(model(**probe).pred_logits).all()
    with pytest.raises(TrainError, match="train.precision='fp16'"):
        run_train(shards, tmp_path / "bad", train_cfg("train.precision=fp16"))


def test_trained_weights_fine_tune_under_their_own_objective_and_keep_their_held_out_dice(
        trained, shards, tmp_path):
    """``loss.objective=auto`` with ``model.path`` continues the objective the weights were trained
    with (the overfit run's export records ``detr``). Fine-tuned with the released rates on two of
    the three cases, they keep their Dice on the third, which this run never trains on: validated
    on the starting weights (step 0) and every second step. The run's config and its export record
    the resolved objective and targets."""
    from omegaconf import OmegaConf

    start = Path(export_run(trained[0], tmp_path / "start"))
    run_dir = tmp_path / "tuned"
    fixed = ["train.crop_scale=[1.0,1.0]", "train.crop_ratio=[1.0,1.0]", "train.flip_prob=0",
             "train.intensity_jitter=0", "train.box_prompt_prob=0", "optim.warmup_steps=2", "optim.cooldown_steps=0"]
    cfg = load_config("train", [f"model.path={start}", f"train.seed={holding_out('amos_0006_90')}",
                                "train.val_fraction=0.5", "train.val_every=2", "train.val_batches=100",
                                "train.batch_size=1", "train.max_steps=6", "train.checkpoint_every=6", *fixed])
    assert run_train(shards, run_dir, cfg).error is None
    log = metrics(run_dir)
    held_out = {m["step"]: m["val_dice"] for m in log if "val_dice" in m}
    assert sorted(held_out) == [0, 2, 4, 6] and all(m["val_samples"] == 2 for m in log if "val_dice" in m)
    assert held_out[0] > 0.5, held_out  # the trained weights segment the case
    assert min(held_out[k] for k in (2, 4, 6)) >= held_out[0] - 0.05, held_out
    saved = OmegaConf.load(run_dir / "train_config.yaml").loss
    assert (saved.objective, saved.targets) == ("detr", "components")
    tuned = Path(export_run(run_dir, tmp_path / "export"))
    assert json.loads((tuned / "medsam3_export.json").read_text())["loss"] == {"objective": "detr",
                                                                                 "targets": "components"}


def test_refuses_bad_shards_and_too_many_workers(shards, tmp_path):
    from medsam3.schema import ShardSchemaError

    with pytest.raises(ShardSchemaError, match="no manifest.json"):
        run_train(tmp_path, tmp_path / "r", train_cfg())
    with pytest.raises(TrainError, match="num_workers=64"):
        run_train(shards, tmp_path / "r", train_cfg("train.num_workers=64"))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    run_dir = tmp_path / "diverges"
    # An absurd learning rate turns the weights to inf/NaN after the first update.
    with pytest.raises(TrainError, match=r"non-finite loss at step \d+") as failure:
        run_train(shards, run_dir, train_cfg("train.max_steps=6", "train.checkpoint_every=1", "train.max_failures=0",
                                             "optim.warmup_steps=1", "optim.lr_heads=1e30", "optim.lr_backbone=1e30"))
    message = str(failure.value)
    assert "amos_0" in message or "s0619_32" in message  # the samples of the failing step are named
    good = json.loads((Path(RunFolder(run_dir).latest_checkpoint()) / "trainer_state.json").read_text())["step"]
    failed_at = int(re.findall(r"non-finite loss at step (\d+)", message)[0])
    assert good == failed_at - 1


# augmentation (crop, flip, jitter) and box prompts on; batch 1 × 2 workers on the 4 rows: 2 steps per epoch
AUGMENTED = ("train.batch_size=1", "train.checkpoint_every=2", "train.box_prompt_prob=0.5", "train.flip_prob=0.5",
             "train.intensity_jitter=0.1", "train.crop_scale=[0.5,1.0]", "optim.warmup_steps=5",
             "optim.cooldown_steps=0")


@pytest.fixture(scope="module")
def seeded_runs(shards, tmp_path_factory) -> dict[str, list[dict]]:
    """Runs with AUGMENTED: "a", 8 steps; "resumed", a's seed, stopped at step 3, resumed by name
    to step 8, and a worker SIGKILLed after the resumed run's step 5; "c", 8 steps with another seed."""
    seed, other = 11, 12
    root = tmp_path_factory.mktemp("seeded")
    logs = {}
    for name, run_seed in (("a", seed), ("c", other)):
        assert run_train(shards, root / name, train_cfg(f"train.seed={run_seed}", "train.max_steps=8",
                                                        *AUGMENTED)).error is None
        logs[name] = metrics(root / name)
    # each rank's torch RNG is saved with the checkpoint
    assert {p.name for p in Path(RunFolder(root / "a").latest_checkpoint()).glob("torch_rng_rank*.pt")} == {
        "torch_rng_rank0.pt", "torch_rng_rank1.pt"}
    resumed = root / "resumed"
    assert run_train(shards, resumed, train_cfg(f"train.seed={seed}", "train.max_steps=3", *AUGMENTED)).error is None
    killer = WorkerKiller(resumed, after_steps=5)
    killer.start()
    result = run_train(shards, resumed, train_cfg(f"train.seed={seed}", "train.max_steps=8", *AUGMENTED))
    killer.join()
    assert killer.killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == 8
    logs["resumed"] = metrics(resumed)
    return logs


def test_a_run_resumes_by_name_at_its_step_and_data_position_and_survives_a_killed_worker(seeded_runs):
    """Stopped at step 3, resumed by name to step 8, and a worker SIGKILLed after the resumed
    run's step 5: it goes on from checkpoint 4, never from the start."""
    log = seeded_runs["resumed"]
    steps = [m["step"] for m in log]
    # resumed at step 4, not a fresh run; after the kill, redone from checkpoint 4 (at most step 5)
    assert steps[:4] == [1, 2, 3, 4] and steps[-1] == 8 and steps.count(4) == 1
    assert max(steps.count(s) for s in steps) == 2 and {s for s in steps if steps.count(s) == 2} <= {5}
    # the resumed run finished epoch 1 with one batch instead of starting a fresh pass at step 4
    last = {m["step"]: m for m in log}  # the steps' final attempts
    assert [last[s]["epoch"] for s in range(1, 9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    for first in (1, 5):  # whole epochs: every row exactly once (the liver and the spleen of
        seen = sorted(last[first]["samples"] + last[first + 1]["samples"])  # amos_0006 share a slice id)
        assert len(seen) == 4 and len(set(seen)) == 3 and seen == sorted(log[0]["samples"] + log[1]["samples"])


def test_same_seed_same_losses_different_seed_different_ones(seeded_runs):
    """Augmentation (crop, flip, jitter), box prompts and the shuffle are all seeded: a run and
    one with its seed that was stopped, resumed and lost a worker log identical losses and
    samples at every step; another seed does not."""
    final = {m["step"]: (m["loss"], m["samples"]) for m in seeded_runs["resumed"]}  # the final attempts
    assert [final[s] for s in range(1, 9)] == [(m["loss"], m["samples"]) for m in seeded_runs["a"]]
    assert [m["loss"] for m in seeded_runs["c"]] != [m["loss"] for m in seeded_runs["a"]]


def test_preprocessing_plans_travel_from_prepare_to_predict(tmp_path):
    """nnU-Net's contract: shards made at 512² with a custom CT window train a model whose export
    carries those plans, so predict makes the shards' pixels with no flag; shards made otherwise
    are refused by a resumed run and by evaluate, naming the settings."""
    from medsam3.inference import Segmenter, inference_config
    from medsam3.io.scan import read_scan
    from medsam3.phantom import write_phantom_dataset
    from medsam3.plans import Plans, PlansMismatch
    from medsam3.samples import Intensity
    from medsam3.schema import decode_batch, shard_dataset, shard_files
    from medsam3.transforms import display_slice
    from pipelines.evaluate import EvaluateError, run_evaluate
    from preprocessing.prepare import run_prepare

    write_phantom_dataset(tmp_path / "phantom", 1, (48, 48, 6))
    custom = ["image_size=512", "windows.soft_tissue=[250,60]", "empty_fraction=0"]
    run_prepare(tmp_path / "phantom", tmp_path / "shards", load_config("prepare", custom))
    run_dir = tmp_path / "run"
    result = run_train(tmp_path / "shards", run_dir, train_cfg("train.max_steps=1", "train.checkpoint_every=1",
                                                               "train.batch_size=1"))
    assert result.error is None
    model = Path(export_run(run_dir, tmp_path / "model"))
    plans = Plans.load(model)
    assert plans.image_size == 512 and plans.windows["soft_tissue"] == (250.0, 60.0)

    segmenter = Segmenter(model, inference_config())  # no prepare.* flag
    rows = decode_batch(shard_dataset(shard_files(tmp_path / "shards")).to_table().to_pydict())
    case = read_scan(tmp_path / "phantom" / "imagesTr" / "phantom_000.nii.gz").case
    liver = [i for i, p in enumerate(rows["prompt"]) if p == "liver"]
    planes = [display_slice(case.image, plans.slice_axis, int(rows["slice_index"][i])) for i in liver]
    squares = segmenter.plane_squares(planes, segmenter.prep.intensity(case), segmenter.window("liver", "CT"))
    assert squares.shape[1:] == (512, 512, 3)
    assert np.array_equal(squares, np.stack([rows["image"][i] for i in liver]))
    default = Plans.from_prepare_config(load_config("prepare", ["image_size=512"]))
    plain = default.square(planes[0], Intensity(case, default), "soft_tissue")
    assert not np.array_equal(plain, squares[0])  # the custom window changed the pixels

    with pytest.raises(PlansMismatch, match="image_size: 640 vs 512"):
        Segmenter(model, inference_config(["prepare.image_size=640"]))
    other = load_config("prepare", ["image_size=256", "empty_fraction=0"])
    run_prepare(tmp_path / "phantom", tmp_path / "other", other)
    with pytest.raises(TrainError, match="image_size: 512 vs 256"):
        run_train(tmp_path / "other", run_dir, train_cfg("train.max_steps=2", "train.batch_size=1"))
    with pytest.raises(EvaluateError, match="image_size: 512 vs 256"):
        run_evaluate(tmp_path / "other", [str(model)], tmp_path / "report", inference_config(stage="evaluate"))
