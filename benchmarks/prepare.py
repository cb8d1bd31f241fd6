"""Benchmark of ``medsam3 prepare`` (run: ``make bench`` or ``python benchmarks/prepare.py``).

Prints, measured in the same run on the same synthetic CT cases:
(a) slices/s of ``prepare`` on the local Ray (all CPUs);
(b) slices/s of the same per-case function in one plain Python process, writing the same
    Parquet shards with pyarrow; and the ratio (a)/(b);
(c) the peak resident memory of preparing one synthetic 512×512×600 CT (one process, rows
    streamed to Parquet as they come), against 3× that volume's raw size.
The figures are also written as JSON (``--json``, default ``benchmarks/results/prepare.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medsam3.phantom import ORGANS, VERTEBRA

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

SECTIONS = {
    "prepare": {
        "title": "medsam3 prepare: Ray Data against one process, and peak memory",
        "measures": "Slices per second of `prepare` on the local Ray (all CPUs) against the same per-case function "
                    "in one plain process writing the same Parquet shards, and the peak resident memory of preparing "
                    "one 512×512×D CT volume against its raw size.",
        "run": "python benchmarks/prepare.py",
    },
}


def synthetic_ct(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Phantom-like CT built slice by slice, so a 512×512×600 volume needs no big temporaries."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y = np.meshgrid(np.linspace(-1, 1, nx, dtype=np.float32), np.linspace(-1, 1, ny, dtype=np.float32),
                       indexing="ij")
    hu = np.empty(shape, np.int16)
    labels = np.zeros(shape, np.uint8)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    for k, z in enumerate(np.linspace(-1, 1, nz, dtype=np.float32)):
        plane = np.where(body, 40.0, -1000.0).astype(np.float32)
        lab = np.zeros((nx, ny), np.uint8)
        for value, (_, organ_hu, c, r) in ORGANS.items():
            inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
            plane[inside & body] = organ_hu
            lab[inside & body] = value
        spine = (x / 0.1) ** 2 + ((y + 0.5) / 0.1) ** 2 <= 1
        plane[spine], lab[spine] = VERTEBRA[2], VERTEBRA[0]
        plane += rng.normal(0, 15, plane.shape).astype(np.float32)
        hu[:, :, k], labels[:, :, k] = np.clip(plane, -1024, 3071), lab
    return hu, labels


def write_dataset(root: Path, num_cases: int, shape, compress: bool = True) -> Path:
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    training = []
    for i in range(num_cases):
        hu, labels = synthetic_ct(shape, i)
        affine = np.diag([0.8, 0.8, 1.5, 1.0])
        nib.save(nib.Nifti1Image(hu, affine), root / "imagesTr" / f"ct_{i:03d}{ext}")
        nib.save(nib.Nifti1Image(labels, affine), root / "labelsTr" / f"ct_{i:03d}{ext}")
        training.append({"image": f"./imagesTr/ct_{i:03d}{ext}", "label": f"./labelsTr/ct_{i:03d}{ext}"})
    names = {"0": "background", **{str(v): n for v, (n, *_) in ORGANS.items()}, str(VERTEBRA[0]): VERTEBRA[1]}
    (root / "dataset.json").write_text(json.dumps({"name": "bench", "modality": {"0": "CT"}, "labels": names,
                                                   "training": training}))
    return root


def plain_process(input_dir: Path, output: Path, cfg) -> tuple[int, int]:
    """The same per-case function, in this process, writing Parquet with pyarrow."""
    from medsam3.io import discover
    from preprocessing.prepare import prepare_case, vocabulary_for

    output.mkdir(parents=True, exist_ok=True)
    refs, _ = discover(input_dir, cfg, vocabulary_for(cfg))
    slices = rows = 0
    for i, ref in enumerate(refs):
        _, case_rows = prepare_case(ref, cfg)
        rows += write_rows(case_rows, output / f"part-{i:05d}.parquet")
        slices += nib.load(Path(ref.root) / ref.files[0]).shape[2]
    return slices, rows


def write_rows(rows, path: Path, batch: int = 16) -> int:
    """Stream rows into one Parquet file, ``batch`` rows per row group, as prepare does."""
    import pyarrow.parquet as pq

    from medsam3.schema import SHARD_SCHEMA, parquet_options, rows_to_table

    count, buffer = 0, []
    with pq.ParquetWriter(path, SHARD_SCHEMA, **parquet_options()) as writer:
        for row in rows:
            buffer.append(row)
            count += 1
            if len(buffer) == batch:
                writer.write_table(rows_to_table(buffer))
                buffer = []
        if buffer:
            writer.write_table(rows_to_table(buffer))
    return count


def high_water_mark() -> int:
    """Peak resident set size of this process in bytes (VmHWM: unlike ru_maxrss, not inherited
    from the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_memory_child(input_dir: str, image_size: int) -> None:
    """Runs in a fresh process: prepare one case, print JSON with RSS figures (bytes)."""
    from medsam3.config import load_config
    from medsam3.io import discover
    from preprocessing.prepare import prepare_case, vocabulary_for

    cfg = load_config("prepare", [f"image_size={image_size}"])
    (ref,), _ = discover(input_dir, cfg, vocabulary_for(cfg))
    baseline = high_water_mark()
    start = time.perf_counter()
    _, rows = prepare_case(ref, cfg)
    with tempfile.TemporaryDirectory() as out:
        count = write_rows(rows, Path(out) / "part.parquet")
    peak = high_water_mark()
    print(json.dumps({"baseline": baseline, "peak": peak, "rows": count, "seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", default="256,256,48")
    parser.add_argument("--image-size", type=int, default=1008)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-slices", type=int, default=600, help="depth of the 512×512×D memory case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="where the figures go (default: benchmarks/results/prepare.json)")
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child, args.image_size)
        return

    import ray

    from medsam3.config import load_config
    from preprocessing.prepare import run_prepare

    shape = tuple(int(s) for s in args.shape.split(","))
    cfg = load_config("prepare", [f"image_size={args.image_size}"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "cases", args.cases, shape)
        from medsam3.ray_local import init_ray

        init_ray(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        # Warm-up, as a long job would be after its first cases: one worker per CPU with the
        # readers imported and a full 16-row block through the memory pool (first-touch page
        # faults are paid once per worker).
        run_prepare(write_dataset(tmp / "warm", cpus, (64, 64, 16)), tmp / "warm-out", cfg)

        ray_times, plain_times = [], []
        for repeat in range(args.repeats):  # interleaved, so slow spells of the VM hit both
            start = time.perf_counter()
            result = run_prepare(data, tmp / f"ray-out-{repeat}", cfg)
            ray_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            slices, rows = plain_process(data, tmp / f"plain-out-{repeat}", cfg)
            plain_times.append(time.perf_counter() - start)
            assert rows == result.num_rows, (rows, result.num_rows)
        ray.shutdown()
        ray_s, plain_s = statistics.median(ray_times), statistics.median(plain_times)
        ratios = ", ".join(f"{p / r:.2f}" for p, r in zip(plain_times, ray_times, strict=True))
        print(f"\nprepare throughput: {args.cases} CT cases of {shape}, {slices} slices → {rows} rows "
              f"at image_size={args.image_size}; median of {args.repeats} interleaved runs")
        print(f"  (a) Ray Data, {cpus} CPUs:        {slices / ray_s:7.1f} slices/s  ({ray_s:.1f} s)")
        print(f"  (b) one plain process:      {slices / plain_s:7.1f} slices/s  ({plain_s:.1f} s)")
        print(f"  ratio (a)/(b):              {plain_s / ray_s:7.2f}x   (per run: {ratios}; target >= 1.6 on 2 cores)")

        big = write_dataset(tmp / "big", 1, (512, 512, args.big_slices), compress=False)
        raw = 512 * 512 * args.big_slices * 2
        child = subprocess.run([sys.executable, __file__, "--child", str(big), "--image-size", str(args.image_size)],
                               capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"\npeak memory, one 512x512x{args.big_slices} int16 CT (raw {raw / 2**20:.0f} MiB), "
              f"{figures['rows']} rows in {figures['seconds']:.1f} s:")
        peak, idle = figures["peak"], figures["baseline"]
        print(f"  peak RSS {peak / 2**20:.0f} MiB; {(peak - idle) / 2**20:.0f} MiB above the process after imports "
              f"({idle / 2**20:.0f} MiB)")
        print(f"  peak / raw = {peak / raw:.2f}x total, {(peak - idle) / raw:.2f}x above imports   (target <= 3x)")

    ratio = plain_s / ray_s
    record.write_section(
        args.json or record.default_path(__file__), __file__, SECTIONS, "prepare",
        tables=[
            record.table(
                f"{args.cases} synthetic CT cases of {'×'.join(map(str, shape))} (NIfTI, 7 labels) → {rows:,} rows at "
                f"image_size={args.image_size}; median of {args.repeats} interleaved runs",
                ["measure", "figure"],
                [[f"`prepare` on the local Ray, {cpus} CPUs", f"{slices / ray_s:.1f} slices/s"],
                 ["the same per-case function in one plain process, same Parquet output",
                  f"{slices / plain_s:.1f} slices/s"],
                 [f"ratio Ray / one process (runs: {ratios})", f"{ratio:.2f}×"]]),
            record.table(
                f"peak memory preparing one 512×512×{args.big_slices} int16 CT (raw {raw / 2**20:,.0f} MiB), "
                f"{figures['rows']:,} rows, in one process",
                ["measure", "figure"],
                [["peak resident set", f"{peak / 2**20:,.0f} MiB"],
                 ["above the process after imports", f"{(peak - idle) / 2**20:,.0f} MiB"],
                 ["peak / raw volume", f"{peak / raw:.2f}×"],
                 ["time", f"{figures['seconds']:.1f} s"]]),
        ],
        targets=[record.target(f"ratio Ray / one process on {cpus} CPUs", round(ratio, 2), ">= 1.6"),
                 record.target("peak resident set / raw volume", round(peak / raw, 2), "<= 3")])


if __name__ == "__main__":
    main()
