"""Peak memory of `medsam3 import` on a full-size checkpoint, against the file's size.

Writes a Meta-format SAM3 checkpoint at full size, with Meta's names and shapes
(tests/data/meta_sam3_keys.json.gz) and random fp32 weights, wrapped like a training checkpoint
({"model": ..., "optimizer": Adam's two moments per tensor}: about 10 GB, the size of Medical
SAM3's checkpoint_2D.pt), then imports it in a child process while sampling that process's
resident memory every 50 ms. A baseline in the same run: loading the same file whole
(``torch.load`` without memory-mapping), as a conversion that reads everything first would.

    python benchmarks/import_memory.py [--kind image|video] [--keep DIR] [--json PATH]

The figures are also written as JSON (default ``benchmarks/results/import_memory.json``; one
section per ``--kind``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

BPE = ROOT.parent / "shared" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"
SECTIONS = {
    "image": {
        "title": "medsam3 import: peak memory on a full-size image checkpoint",
        "measures": "Peak resident memory and time of `medsam3 import` on a full-size SAM3 image checkpoint in "
                    "Meta's names with random weights and Adam state (the size of a training checkpoint), against "
                    "loading the same file whole with `torch.load`.",
        "run": "python benchmarks/import_memory.py",
    },
    "video": {
        "title": "medsam3 import: peak memory on a full-size video checkpoint",
        "measures": "The same for a full-size SAM3 video checkpoint (detector and tracker).",
        "run": "python benchmarks/import_memory.py --kind video",
    },
}


def write_checkpoint(path: Path, kind: str) -> int:
    with gzip.open(ROOT / "tests" / "data" / "meta_sam3_keys.json.gz") as f:
        shapes = json.load(f)[kind]
    torch.manual_seed(0)
    model = {k: (torch.randn(s, dtype=torch.complex64) if "freqs_cis" in k else torch.empty(s).normal_(0, 0.02))
             for k, s in shapes.items()}
    state = {i: {"exp_avg": torch.zeros(s), "exp_avg_sq": torch.zeros(s)} for i, s in enumerate(shapes.values())}
    torch.save({"model": model, "optimizer": {"state": state}, "epoch": 1}, path)
    return path.stat().st_size


def peak_rss(command: list[str]) -> tuple[float, float, int]:
    """(peak resident MB of the child and its children, seconds, exit code)."""
    started = time.perf_counter()
    child = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [child, *child.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = child.communicate()
    stop.set()
    thread.join()
    if child.returncode:
        print(err.decode()[-2000:], file=sys.stderr)
    return peak / 2**20, time.perf_counter() - started, child.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("image", "video"), default="image")
    parser.add_argument("--keep", help="write the checkpoint and the import here (default: a temporary folder)")
    parser.add_argument("--json", default=None,
                        help="where the figures go (default: benchmarks/results/import_memory.json)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp:
        weights = Path(tmp, "checkpoint.pt")
        size = write_checkpoint(weights, args.kind) / 2**20
        print(f"checkpoint: {size:,.0f} MB ({args.kind}, with Adam state)")
        load = [sys.executable, "-c", f"import torch; torch.load({str(weights)!r}, map_location='cpu', "
                "weights_only=True)"]
        base_mb, base_s, _ = peak_rss(load)
        medsam3 = [sys.executable, "-m", "medsam3.cli", "import", str(weights), str(Path(tmp, "hf")), "--bpe",
                   str(BPE), "--kind", args.kind]
        mb, seconds, code = peak_rss(medsam3)
        if code:
            raise SystemExit(f"medsam3 import failed ({code})")
        written = sum(f.stat().st_size for f in Path(tmp, "hf").glob("*.safetensors")) / 2**20
        print(f"baseline torch.load (whole file): peak RSS {base_mb:,.0f} MB in {base_s:.0f} s")
        print(f"medsam3 import:                   peak RSS {mb:,.0f} MB in {seconds:.0f} s, wrote {written:,.0f} MB")
        print(f"ratio: import peak / file size {mb / size:.2f}, import peak / whole-file load {mb / base_mb:.2f}")
    record.write_section(
        args.json or record.default_path(__file__), __file__, SECTIONS, args.kind,
        tables=[record.table(f"a {args.kind} checkpoint of {size:,.0f} MB (Meta's names, random fp32 weights, Adam's "
                             "two moments); resident memory of the process and its children sampled every 50 ms",
                             ["process", "peak resident set", "time", "peak / file size"],
                             [["`torch.load` of the whole file (baseline)", f"{base_mb:,.0f} MB", f"{base_s:.0f} s",
                               f"{base_mb / size:.2f}×"],
                              [f"`medsam3 import` (wrote {written:,.0f} MB of weights)", f"{mb:,.0f} MB",
                               f"{seconds:.0f} s", f"{mb / size:.2f}×"]])])


if __name__ == "__main__":
    main()
