"""Shared fixtures: a local Ray for the whole session, and paths to the real data in ../shared."""

from __future__ import annotations

import os

import pytest

from medsam3.ray_local import init_ray
from tests.builders import RECIST, SAMMED2D, SERVE_LIMITS, SHARED

# Credentials for the S3-compatible server the tests start (moto accepts any); set before Ray
# starts so its workers inherit them, as they would inherit a real cluster's AWS environment.
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)


def pytest_sessionstart(session):
    missing = [p for p in (RECIST, SAMMED2D) if not p.is_dir()]
    if missing:
        raise pytest.UsageError(f"real test data not found: {missing} (expected ../shared/data beside the repo)")


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that runs a Ray job (starting Ray costs seconds)."""
    import ray

    from serve.limits import proxy_environment

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.update(proxy_environment(SERVE_LIMITS))  # the body limit in Serve's HTTP proxy
    # 3 logical CPUs: two training workers plus one for the Ray Data pipeline that feeds them
    init_ray(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             env={"DS_ACCELERATOR": "cpu"})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_data():
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny SAM3 saved as a Hugging Face directory (random weights, fixed seed) with SAM3's
    CLIP BPE tokenizer derived from the real merges file: what `medsam3 export` writes."""
    import torch

    from medsam3.model import build_model, build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-checkpoint")
    torch.manual_seed(0)
    build_model("tiny").save_pretrained(folder)
    tokenizer = build_tokenizer(bpe_path=SHARED / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz", work_dir=folder / "work")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's server mode) on loopback, with a bucket ``medsam3-test``;
    yields its URL (the value of the ``storage.endpoint_url`` config key)."""
    import socket

    from moto.server import ThreadedMotoServer

    from medsam3.io import storage

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    storage.configure({"endpoint_url": url})
    fs, _ = storage.filesystem("s3://medsam3-test")
    fs.mkdir("medsam3-test")
    yield url
    server.stop()


# One real CT lesion volume (7 slices show the lesion) for clip training and propagation.
LESION_CASE = "CT_Lesion_000009_03_01_036-048.npz"
# Overfitting two clips: no augmentation, no detector box prompts, constant high learning rates.
OVERFIT = ["train.crop_scale=[1.0,1.0]", "train.crop_ratio=[1.0,1.0]", "train.flip_prob=0",
           "train.intensity_jitter=0", "train.box_prompt_prob=0", "optim.warmup_steps=5", "optim.cooldown_steps=0",
           "optim.lr_timescale=1000", "optim.lr_heads=1e-3", "optim.lr_backbone=1e-3", "optim.lr_prompt=1e-3",
           "optim.lr_detr_encoder=1e-3", "optim.lr_tracker=1e-3"]
CLIPS = ["model.preset=tiny_video", "train.mode=clips", "train.clip_length=4", "train.batch_size=1",
         "train.val_every=0", "train.val_fraction=0"]


@pytest.fixture(scope="session")
def lesion_shards(tmp_path_factory):
    """`prepare` of the lesion volume at 224² (the tiny video model's input), lesion slices only:
    two clips of 4 consecutive slices (3-6 and 6-9)."""
    import shutil

    from medsam3.config import load_config
    from preprocessing.prepare import run_prepare

    root = tmp_path_factory.mktemp("lesion")
    (root / "scans").mkdir()
    shutil.copy(RECIST / LESION_CASE, root / "scans")
    run_prepare(root / "scans", root / "shards", load_config("prepare", ["image_size=224", "modality=CT",
                                                                          "empty_fraction=0"]))
    return root


@pytest.fixture(scope="session")
def clip_trained(ray_local, lesion_shards):
    """A 2-worker ZeRO-3 clip run (detector + tracker) overfitting the lesion's clips, exported
    as a video checkpoint: (run folder, export folder, scans folder, shards folder)."""
    from medsam3.config import load_config
    from pipelines.export import export_run
    from pipelines.train import run_train

    run_dir = lesion_shards / "run"
    result = run_train(lesion_shards / "shards", run_dir,
                       load_config("train", [*CLIPS, *OVERFIT, "train.max_steps=60", "train.checkpoint_every=30"]))
    assert result.error is None
    export_run(run_dir, lesion_shards / "model")
    return run_dir, lesion_shards / "model", lesion_shards / "scans", lesion_shards / "shards"
