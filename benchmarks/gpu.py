"""The full-size SAM3 on one GPU (run: ``bash benchmarks/gpu.sh``, under 10 minutes on an H100).

(a) Training at 1008² on ``medsam3 train``'s own path: Ray Train with one GPU worker, DeepSpeed
    ZeRO-3, bf16, activation checkpointing, batch ``--batch`` on phantom shards prepared at the
    model's size. Samples/s is the median of steps 3 onwards. The model FLOPs of one sample's forward
    and backward are counted by torch's ``FlopCounterMode`` on a plain bf16 step (recomputation
    not counted). MFU = FLOPs per sample × samples/s / the GPU's dense bf16 peak.
(b) Inference: the full-size ``Segmenter`` (bf16 on a GPU) on a 512×512 CT volume of real lesion
    slices. It reports seconds per slice in ``slices`` mode and with 3D propagation, and peak
    allocated memory.

``--preset tiny --device cpu`` runs the same code on the tiny model, to check the script on a
machine without a GPU. Figures go to ``benchmarks/results/gpu.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

SECTIONS = {
    "gpu": {
        "title": "The full-size SAM3 on one GPU: a training step at 1008², MFU and inference latency",
        "measures": "Samples per second and model-FLOPs utilisation of full-size training through Ray Train + "
                    "DeepSpeed ZeRO-3 (bf16, activation checkpointing), and seconds per slice of full-size "
                    "inference on a real CT volume, on one GPU.",
        "run": "bash benchmarks/gpu.sh",
    },
}

# Dense bf16 tensor-core peaks from NVIDIA's data sheets (FLOP/s, no sparsity), by device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
BPE = ROOT.parent / "shared" / "data" / "clip-bpe" / "bpe_simple_vocab_16e6.txt.gz"


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def flops_per_sample(preset: str, device, batch: int) -> float:
    """Model FLOPs of one forward and backward (bf16 autocast on a GPU), per sample."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsam3.model import build_model, model_image_size
    from medsam3.ops import enable_box_prompts

    enable_box_prompts()
    model = build_model(preset).to(device).train()
    side = model_image_size(model)
    inputs = {"pixel_values": torch.randn(batch, 3, side, side, device=device),
              "input_ids": torch.randint(0, model.config.text_config.vocab_size, (batch, 32), device=device),
              "attention_mask": torch.ones(batch, 32, dtype=torch.long, device=device)}
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        outputs = model(**inputs)
        (outputs.pred_logits.float().sum() + outputs.pred_masks.float().sum()).backward()
    del model, outputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return counter.get_total_flops() / batch


def train_rate(tmp: Path, preset: str, use_gpu: bool, batch: int, steps: int) -> tuple[float, float, list]:
    """(samples/s, median step seconds, every rank's peak memory) of ``medsam3 train``."""
    import ray

    from medsam3.config import load_config
    from medsam3.model import preset as preset_spec
    from medsam3.phantom import write_phantom_dataset
    from pipelines.train import run_train
    from preprocessing.prepare import run_prepare

    size = preset_spec(preset)["image_size"]
    write_phantom_dataset(tmp / "phantom", 2, (96, 96, 16))
    run_prepare(tmp / "phantom", tmp / "shards", load_config("prepare", [f"image_size={size}"]))
    tokenizer = [] if preset.startswith("tiny") else [f"model.bpe_path={BPE}"]
    cfg = load_config("train", [f"model.preset={preset}", *tokenizer, "train.num_workers=1",
                                f"train.use_gpu={str(use_gpu).lower()}", "train.precision=bf16",
                                "train.activation_checkpointing=true", f"train.batch_size={batch}",
                                f"train.max_steps={steps}", "train.checkpoint_every=100000", "train.val_every=0",
                                "train.val_fraction=0", "train.max_failures=0", "optim.warmup_steps=1",
                                "optim.cooldown_steps=1"])
    run_train(tmp / "shards", tmp / "run", cfg)
    ray.shutdown()
    log = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][2:]
    return (statistics.median(m["samples_per_s"] for m in log), statistics.median(m["step_s"] for m in log),
            log[-1]["rank_peak_memory_mb"])


def inference_seconds(tmp: Path, preset: str, device, depth: int) -> dict[str, tuple[float, float]]:
    """Seconds per slice and peak memory (MB) of ``slices`` and ``propagate`` on a CT volume."""
    import resource

    import torch

    from benchmarks.inference import ct_volume, segmenter, video_checkpoint

    video = preset if preset == "sam3" else "tiny_video"
    model = segmenter(video_checkpoint(tmp / "video", preset=video), 8)
    case = ct_volume(depth)
    model.segment(ct_volume(2), ["lesion"], mode="slices")  # kernels and caches warm
    found = {}
    for mode in ("slices", "propagate"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        model.segment(case, ["lesion"], mode=mode)
        seconds = (time.perf_counter() - started) / depth
        peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        found[mode] = (seconds, peak)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="sam3", help="sam3 (1008²); tiny to check the script on a CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=2, help="training samples per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--depth", type=int, default=16, help="slices of the CT volume for (b)")
    parser.add_argument("--json", default=None, help="where the figures go (default: benchmarks/results/gpu.json)")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no GPU here; check the script with --preset tiny --device cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        flops = flops_per_sample(args.preset, device, args.batch)
        rate, step_s, peaks = train_rate(tmp, args.preset, device.type == "cuda", args.batch, args.steps)
        inference = inference_seconds(tmp, args.preset, device, args.depth)
    peak = peak_flops(device)
    mfu = flops * rate / peak if peak else None
    rows = [[f"training, samples/s (1 worker, batch {args.batch})", f"{rate:.2f}"],
            ["training, seconds per step", f"{step_s:.2f}"],
            ["model FLOPs per sample (forward + backward)", f"{flops / 1e9:,.1f} GFLOP"],
            ["MFU (dense bf16 peak)", f"{100 * mfu:.1f} %" if mfu is not None else "peak unknown"],
            ["training, peak memory", f"{peaks[0]:,.0f} MB"],
            *[[f"inference, {mode}, seconds per slice ({args.depth} slices)", f"{seconds:.3f}"]
              for mode, (seconds, _) in inference.items()],
            *[[f"inference, {mode}, peak memory", f"{mb:,.0f} MB"] for mode, (_, mb) in inference.items()]]
    for name, figure in rows:
        print(f"  {name}: {figure}")
    record.write_section(args.json or record.default_path(__file__), __file__, SECTIONS, "gpu", tables=[
        record.table(f"{args.preset} preset, random weights, {device.type}, bf16", ["measure", "figure"], rows)])


if __name__ == "__main__":
    main()
