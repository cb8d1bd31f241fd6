"""Benchmark of inference (run: ``python benchmarks/inference.py``).

Prints, measured in one run on this machine:
(a) slices/s of ``predict``'s core on a 512×512×200 CT volume (real DeepLesion slices tiled to
    200) with batches of 8 slices vs one slice at a time, tiny SAM3 (target ≥ 2× on CPU);
(b) ``evaluate`` throughput (prompted slices/s, text and text+box) with 2 Ray Data actors vs 1,
    one CPU each;
(c) on a GPU machine: slices/s of the full-size ``sam3`` preset in bf16 at 1008²;
(d) 3D: slices/s of ``propagate`` (a box seeded on the middle slice and tracked to both ends;
    text-started clips, with a detector that finds nothing and one that keeps every detection,
    each also with per-session backbone passes) against ``slices`` on the same 512×512×600 volume,
    with the tiny video model, and each run's peak RSS (a fresh process per run, so each peak is
    its own); ``--full-3d N`` measures seconds per slice of the full-size preset on N slices
    instead. ``--only-3d`` runs (d) alone, ``--no-3d`` everything but (d).
Each ratio is the median over interleaved repeats, since shared machines are noisy. The figures
are also written as JSON (``--json``, default ``benchmarks/results/inference.json``; one section
per part, a run replaces only the parts it ran).
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
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

RECIST = ROOT.parent / "shared" / "data" / "medsam2-recist-ct"
SECTIONS = {
    "predict": {
        "title": "medsam3 predict: batched slices against one slice at a time",
        "measures": "Slices per second of `predict`'s inference core (tiny SAM3, CPU, model loaded beforehand) on a "
                    "512×512×D CT volume built from real lesion slices, in batches of 8 slices against one slice "
                    "at a time.",
        "run": "python benchmarks/inference.py --no-3d",
    },
    "evaluate": {
        "title": "medsam3 evaluate: 2 Ray Data actors against 1",
        "measures": "Prompted slices per second of whole `evaluate` runs (start-up, inference, regrouping, metrics, "
                    "reports; text and text+box) on copies of the 4 real lesion volumes at 1008², with 2 actors "
                    "against 1, one CPU each.",
        "run": "python benchmarks/inference.py --no-3d",
    },
    "gpu": {
        "title": "Full-size sam3 preset in bf16 on a GPU",
        "measures": "Slices per second of `predict`'s core with the full-size `sam3` preset (random weights) in bf16 "
                    "at 1008² on a GPU; runs only where torch sees a GPU.",
        "run": "python benchmarks/inference.py --no-3d",
    },
    "3d": {
        "title": "3D: propagate against slices",
        "measures": "Slices per second and peak resident memory of `mode=propagate` (a box tracked from the middle "
                    "slice; text-started clips, with the vision pass shared by every clip and with per-session "
                    "passes) against `mode=slices` on one deep CT volume with the tiny video model, each run in a "
                    "fresh process; optionally seconds per slice of the full-size preset.",
        "run": "python benchmarks/inference.py --only-3d",
    },
    "3d_full": {
        "title": "3D with the full-size model: propagate against slices",
        "measures": "Seconds per slice of `mode=slices` and of text-started clips (vision pass shared, and per-session "
                    "passes; a detector that finds nothing) with the full-size "
                    "`sam3` preset (random weights, fp32) on a few slices of a CT volume, CPU.",
        "run": "python benchmarks/inference.py --full-3d 4",
    },
}


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
    """Slices/s of one ``segment`` call; loading the model is not part of it."""
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


def video_checkpoint(folder: Path, keep_detections: bool = False, preset: str = "tiny_video") -> Path:
    """A video model with random detector and tracker weights: the cost does not depend on the
    weights. A random detector finds nothing; ``keep_detections`` saves it with the detection
    thresholds at 0 and at most 2 objects, so text-started clips track the objects it adds (the
    tracker path)."""
    import torch

    from medsam3.model import build_model
    from medsam3.video import assemble_video_model

    torch.manual_seed(0)
    tiny_checkpoint(folder, preset)
    video = assemble_video_model(build_model(preset), None, preset, allow_random_tracker=True)
    if keep_detections:
        video.config.score_threshold_detection = video.config.new_det_thresh = 0.0
        video.config.max_num_objects = 2  # a structure or two, as a prompt finds, not every query
    video.save_pretrained(folder)
    return folder


def _timed_run(checkpoint: str, depth: int, mode: str, box: str | None, shared: bool, queue) -> None:
    """A child process: one ``segment`` call on the volume → (slices/s, peak RSS in MB).
    ``shared=False``: text sessions run the backbone and detector on each of their frames."""
    import contextlib
    import resource

    from medsam3.propagate import VolumePropagator

    if not shared:
        VolumePropagator._shared_detector = lambda *_: contextlib.nullcontext()
    model = segmenter(Path(checkpoint), 8)
    case = ct_volume(depth)
    started = time.perf_counter()
    model.segment(case, ["lesion"], [box] if box else None, mode=mode)
    queue.put((depth / (time.perf_counter() - started), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def propagation_table(depth: int, repeats: int, json_path: str | None = None) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    text = "propagate, text clips (8 slices, overlap 4, both directions)"
    with tempfile.TemporaryDirectory() as tmp:
        empty = str(video_checkpoint(Path(tmp) / "video"))
        finds = str(video_checkpoint(Path(tmp) / "finds", keep_detections=True))
        runs = {"slices (text)": (empty, "slices", None, True),
                "propagate, box on the middle slice": (empty, "propagate", f"200,200,300,300@z={depth // 2}", True),
                f"{text}; nothing found": (empty, "propagate", None, True),
                f"{text}; nothing found; per-session passes": (empty, "propagate", None, False),
                f"{text}; every detection kept": (finds, "propagate", None, True),
                f"{text}; every detection kept; per-session passes": (finds, "propagate", None, False)}
        found = timed_runs(context, runs, depth, repeats, f"\n(d) 3D on a 512x512x{depth} CT volume, tiny video "
                           "model, CPU:")
        rows = ratio_rows(found)
        tables = [record.table(f"a 512×512×{depth} CT volume ({512 * 512 * depth * 2 / 2**20:,.0f} MiB as int16), "
                               f"tiny video model with random weights, CPU; median of {repeats} run(s), each in a "
                               "fresh process; peak: the largest run's",
                               ["mode", "slices/s", "vs `slices`", "peak resident set"], rows)]
        targets = [record.target(f"text clips / slices, {case}", _ratio(found, f"{text}; {case}"), ">= 0.5")
                   for case in ("nothing found", "every detection kept")]
    record.write_section(
        json_path or record.default_path(__file__), __file__, SECTIONS, "3d", tables=tables, targets=targets,
        notes=["\"per-session passes\": every text session runs the backbone and the detector on each of its frames "
               "(about 4 times per slice with these clips), as transformers' Sam3VideoModel does on its own; "
               "otherwise one vision pass per slice is shared by every clip and direction.",
               "\"every detection kept\": the random detector saved with its detection thresholds at 0 and at most "
               "2 objects, so the clips track the objects it adds (the tracker's path); \"nothing found\": its own "
               "thresholds."])


def full_size_table(depth: int, json_path: str) -> None:
    """Seconds per slice of the full-size preset (random weights, fp32, CPU) on a few slices:
    ``slices`` against text clips, with the vision pass shared and with per-session passes."""
    import multiprocessing

    text = "propagate, text clips (8 slices, overlap 4, both directions)"
    with tempfile.TemporaryDirectory() as tmp:
        full = str(video_checkpoint(Path(tmp) / "sam3", preset="sam3"))
        runs = {"slices (text)": (full, "slices", None, True),
                f"{text}; nothing found": (full, "propagate", None, True),
                f"{text}; nothing found; per-session passes": (full, "propagate", None, False)}
        found = timed_runs(multiprocessing.get_context("spawn"), runs, depth, 1,
                           f"\n(d) full-size sam3 preset on a 512x512x{depth} CT volume, fp32, CPU:")
    base = found["slices (text)"][0][0]
    rows = [[name, f"{1 / rate:.1f}", f"{rate / base:.2f}×", f"{peak:,.0f} MB"]
            for name, [(rate, peak)] in found.items()]
    for row in rows:
        print("    " + "  ".join(row))
    record.write_section(json_path, __file__, SECTIONS, "3d_full", tables=[record.table(
        f"a 512×512×{depth} CT volume, full-size `sam3` preset (detector and tracker) with random weights, fp32, "
        "CPU; one run each, in a fresh process", ["mode", "seconds per slice", "vs `slices`", "peak resident set"],
        rows)], notes=FULL_SIZE_NOTES)


FULL_SIZE_NOTES = [
    "A volume of at most 8 slices is one clip: per-session passes run each slice's backbone twice (one "
    "session per direction); on deeper volumes each slice lies in two clips, so four times.",
    "No run with every detection kept: with the detection thresholds at 0, transformers matches all 200 "
    "queries' masks against the tracked objects' at 1008² (a 26 GB tensor); a trained detector keeps "
    "a few detections."]


def timed_runs(context, runs: dict, depth: int, repeats: int, title: str) -> dict[str, list]:
    """Each run (checkpoint, mode, box, shared) in a fresh process, interleaved ``repeats`` times."""
    found: dict[str, list] = {name: [] for name in runs}
    print(title, flush=True)
    for _ in range(repeats):
        for name, args in runs.items():
            queue = context.Queue()
            child = context.Process(target=_timed_run, args=(args[0], depth, *args[1:], queue))
            child.start()
            child.join()  # the result is two numbers: the queue holds them after the child exits
            if child.exitcode != 0:
                raise RuntimeError(f"{name}: the run failed (exit code {child.exitcode}); its error is above")
            found[name].append(queue.get())
            print(f"    run: {name}: {found[name][-1][0]:.3g} slices/s, peak RSS {found[name][-1][1]:.0f} MB",
                  flush=True)
    return found


def _ratio(found: dict[str, list], name: str) -> float:
    return round(statistics.median(r for r, _ in found[name]) / statistics.median(
        r for r, _ in found["slices (text)"]), 2)


def ratio_rows(found: dict[str, list]) -> list[list[str]]:
    base = statistics.median(r for r, _ in found["slices (text)"])
    rows = []
    for name, results in found.items():
        rate = statistics.median(r for r, _ in results)
        peak = max(m for _, m in results)
        print(f"    {name:80s} {rate:6.1f} slices/s  ({rate / base:.2f}x slices)  peak RSS {peak:5.0f} MB")
        rows.append([name, f"{rate:.1f}", f"{rate / base:.2f}×", f"{peak:,.0f} MB"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=8, help="copies of the 4 lesion volumes for (b)")
    parser.add_argument("--depth-3d", type=int, default=600, help="slices of the volume for (d)")
    parser.add_argument("--full-3d", type=int, default=0,
                        help="run (d) on the full-size sam3 preset alone, on a volume of this many slices")
    parser.add_argument("--only-3d", action="store_true", help="run (d) only")
    parser.add_argument("--no-3d", action="store_true", help="run (a)-(c) only")
    parser.add_argument("--json", default=None,
                        help="where the figures go (default: benchmarks/results/inference.json)")
    args = parser.parse_args()
    json_path = args.json or record.default_path(__file__)
    if args.full_3d:
        full_size_table(args.full_3d, json_path)
        return
    if args.only_3d:
        propagation_table(args.depth_3d, args.repeats, json_path)
        return

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
        record.write_section(json_path, __file__, SECTIONS, "predict", tables=[record.table(
            f"a 512×512×{args.depth} CT volume, tiny SAM3, CPU ({torch.get_num_threads()} threads), model loaded "
            f"beforehand; median of {args.repeats} interleaved runs",
            ["measure", "figure"],
            [["batches of 8 slices", f"{statistics.median(batched):.1f} slices/s"],
             ["one slice at a time", f"{statistics.median(single):.1f} slices/s"],
             [f"batched / one at a time (runs: {', '.join(f'{r:.2f}' for r in ratios)})",
              f"{statistics.median(ratios):.2f}×"]])],
            targets=[record.target("batched / one at a time", round(statistics.median(ratios), 2), ">= 2")])

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
        record.write_section(json_path, __file__, SECTIONS, "evaluate", tables=[record.table(
            f"{4 * args.copies} lesion volumes (the 4 real ones, repeated) at 1008², text and text+box, tiny SAM3, "
            f"whole runs; median of {args.repeats} interleaved runs",
            ["measure", "figure"],
            [["1 actor", f"{statistics.median(one):.2f} prompted slices/s"],
             ["2 actors", f"{statistics.median(two):.2f} prompted slices/s"],
             [f"2 actors / 1 (runs: {', '.join(f'{r:.2f}' for r in ratios)})", f"{statistics.median(ratios):.2f}×"]])])

        if torch.cuda.is_available():
            full = segmenter(tiny_checkpoint(tmp / "sam3", preset="sam3"), 8)
            volume_slices_per_s(full, ct_volume(8))  # warm-up
            rate = volume_slices_per_s(full, ct_volume(64))
            print(f"\n(c) sam3 preset, bf16, {torch.cuda.get_device_name()}: {rate:.1f} slices/s at 1008²")
            record.write_section(json_path, __file__, SECTIONS, "gpu", tables=[record.table(
                "a 512×512×64 CT volume, `sam3` preset, batches of 8 slices", ["measure", "figure"],
                [[f"{torch.cuda.get_device_name()}", f"{rate:.1f} slices/s"]])])
        else:
            print("\n(c) no GPU here: the sam3 preset's bf16 slices/s is measured on a GPU machine")
    if not args.no_3d:
        propagation_table(args.depth_3d, args.repeats, json_path)


if __name__ == "__main__":
    main()
