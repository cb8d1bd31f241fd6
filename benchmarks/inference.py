"""Benchmark of inference (run: ``python benchmarks/inference.py``).

Prints, measured in one run on this machine:
(a) slices/s of ``predict``'s core on a 512×512×200 CT volume (real DeepLesion slices tiled to
    200) with batches of 8 slices vs one slice at a time, tiny SAM3 (target ≥ 2× on CPU);
(b) ``evaluate`` throughput (prompted slices/s, text and text+box) with 2 Ray Data actors vs 1,
    one CPU each;
(c) on a GPU machine: slices/s of the full-size ``sam3`` preset in bf16 at 1008².
Each ratio is the median over interleaved repeats, since these machines are noisy.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIST = ROOT.parent / "shared" / "data" / "medsam2-recist-ct"


def tiny_checkpoint(folder: Path, preset: str = "tiny") -> Path:
    import torch

    from medsam3.model import build_model, build_tokenizer

    torch.manual_seed(0)
    build_model(preset).save_pretrained(folder)
    build_tokenizer(bpe_path=ROOT.parent / "shared" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz",
                    work_dir=folder / "work").save_pretrained(folder)
    return folder


def ct_volume(depth: int):
    """A 512×512×depth CT case (HU) built from the real lesion volumes' slices."""
    from medsam3.io.case import Case
    from medsam3.io.npz import load_npz, npz_affine, to_canonical

    stacks = [load_npz(p)["imgs"] for p in sorted(RECIST.glob("*.npz"))]
    slices = np.concatenate(stacks)
    imgs = slices[np.arange(depth) % len(slices)].astype(np.int16) * 400 // 255 - 160
    affine, zooms = npz_affine(np.array([0.7, 0.7, 2.5]))
    return Case("bench", "bench", "CT", to_canonical(imgs), [], {}, zooms, affine)


def segmenter(checkpoint: Path, batch_size: int):
    from medsam3.inference import Segmenter, inference_config

    return Segmenter(checkpoint, inference_config([f"batch_size={batch_size}"]))


def volume_slices_per_s(model, case, prompts=("lesion",)) -> float:
    """Slices/s of one ``segment`` call; loading the model (~0.6 s here) is not part of it."""
    started = time.perf_counter()
    model.segment(case, list(prompts), progress=False)
    return case.image.shape[2] / (time.perf_counter() - started)


def evaluate_rate(shards: Path, checkpoint: Path, actors: int, out: Path) -> float:
    import pyarrow.dataset as pads

    from medsam3.inference import inference_config
    from medsam3.schema import shard_files
    from pipelines.evaluate import run_evaluate

    rows = pads.dataset(shard_files(shards), format="parquet").count_rows()
    cfg = inference_config([f"num_actors={actors}", "cpus_per_actor=1", "gallery=0", "batch_size=8"], stage="evaluate")
    started = time.perf_counter()
    run_evaluate(shards, [str(checkpoint)], out, cfg)
    return rows * len(cfg.modes) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=8, help="copies of the 4 lesion volumes for (b)")
    args = parser.parse_args()

    import ray
    import torch

    from medsam3.config import load_config
    from preprocessing.prepare import run_prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = tiny_checkpoint(tmp / "tiny")
        case = ct_volume(args.depth)
        by_batch, by_slice = segmenter(checkpoint, 8), segmenter(checkpoint, 1)
        for model in (by_batch, by_slice):
            volume_slices_per_s(model, ct_volume(8))  # warm-up (first-call allocations)
        batched, single = [], []
        for _ in range(args.repeats):
            batched.append(volume_slices_per_s(by_batch, case))
            single.append(volume_slices_per_s(by_slice, case))
        ratios = [b / s for b, s in zip(batched, single, strict=True)]
        print(f"\n(a) predict on a 512x512x{args.depth} CT volume, tiny SAM3, CPU ({torch.get_num_threads()} threads):")
        print(f"    batches of 8 slices: {statistics.median(batched):6.1f} slices/s")
        print(f"    one slice at a time: {statistics.median(single):6.1f} slices/s")
        print(f"    batched / single: {statistics.median(ratios):.2f}x  (runs {', '.join(f'{r:.2f}' for r in ratios)};"
              " target >= 2x)")

        from medsam3.ray_local import init_ray

        init_ray(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        (tmp / "in" / "lesions").mkdir(parents=True)
        for copy in range(args.copies):  # the 4 real volumes, repeated: enough rows to amortise start-up
            for f in sorted(RECIST.glob("*.npz")):
                shutil.copy(f, tmp / "in" / "lesions" / f"{f.stem}_{copy}.npz")
        run_prepare(tmp / "in", tmp / "shards", load_config("prepare", ["empty_fraction=0.5"]))
        one, two = [], []
        for i in range(args.repeats):
            one.append(evaluate_rate(tmp / "shards", checkpoint, 1, tmp / f"e1_{i}"))
            two.append(evaluate_rate(tmp / "shards", checkpoint, 2, tmp / f"e2_{i}"))
        ray.shutdown()
        ratios = [b / a for a, b in zip(one, two, strict=True)]
        print(f"\n(b) evaluate on {4 * args.copies} lesion volumes (the 4 real ones, repeated) at 1008², text and "
              "text+box, tiny SAM3, whole runs (start-up, inference, regrouping, metrics, reports):")
        print(f"    1 actor : {statistics.median(one):6.2f} prompted slices/s")
        print(f"    2 actors: {statistics.median(two):6.2f} prompted slices/s")
        print(f"    2 / 1: {statistics.median(ratios):.2f}x  (runs {', '.join(f'{r:.2f}' for r in ratios)})")

        if torch.cuda.is_available():
            full = segmenter(tiny_checkpoint(tmp / "sam3", preset="sam3"), 8)
            volume_slices_per_s(full, ct_volume(8))  # warm-up
            rate = volume_slices_per_s(full, ct_volume(64))
            print(f"\n(c) sam3 preset, bf16, {torch.cuda.get_device_name()}: {rate:.1f} slices/s at 1008²")
        else:
            print("\n(c) no GPU here: the sam3 preset's bf16 slices/s is measured on a GPU machine")


if __name__ == "__main__":
    main()
