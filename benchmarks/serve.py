"""Benchmark of ``medsam3 serve`` (run: ``python benchmarks/serve.py``).

A local Ray + Serve on loopback with the tiny SAM3 (one model replica, 1 CPU); clients POST a
real 512×512 CT slice with two prompts. For 1, 8 and 32 concurrent clients it prints requests/s
and p50/p99 latency with dynamic batching on (up to 16 items per model call) and off (1), and
the ratios (target: with batching, ≥ 2× the throughput at 32 clients, p99 ≤ 2× the single-client
latency). "copies": every client sends the same slice; "distinct": at 32 clients, each request
sends a different image (four real slices, each with one pixel changed per request), so no two
requests may share a vision pass.

LoRA adapters (``--adapter`` of ``medsam3 serve``): seconds to switch a replica's model to an
adapter already in memory ("swap"), to load one from disk on first use (evicting another), and
to load the whole model (a ``Segmenter`` of the checkpoint) as the baseline, with adapters made
the way ``train.method=lora`` makes them (r=16 on the default target linears).
``--adapters-only`` skips the HTTP table.

``--monailabel``: the MONAI Label routes against ``/v1`` on one server, a real CT volume
(8 slices of 512², int16 NIfTI / NRRD), one prompt, sequential requests through MONAI Label's
own client: median seconds per request and the ratio to ``/v1`` (the protocol's overhead:
the store, the label map in the input's geometry, the multipart answer).

The figures are also written as JSON (``--json``, default ``benchmarks/results/serve.json``; one
section per part, a run replaces only the parts it ran).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

PNG = ROOT.parent / "shared" / "data" / "sam-med2d-demo" / "images" / "amos_0004_75.png"
SLICES = ("amos_0004_75.png", "amos_0006_90.png", "s0114_111.png", "s0619_32.png")
SECTIONS = {
    "http": {
        "title": "medsam3 serve over HTTP: dynamic batching on and off",
        "measures": "Requests per second and p50/p99 latency of `POST /v1/segment` (a 512² CT slice, 2 prompts) "
                    "with 1, 8 and 32 concurrent clients on one tiny-SAM3 model replica (1 CPU), with dynamic "
                    "batching (up to 16 items per model call) and without.",
        "run": "python benchmarks/serve.py",
    },
    "replica": {
        "title": "The model replica alone: batches of 16 items against one at a time",
        "measures": "Items per second of the replica's own work (`Segmenter.run_items` on (slice, prompt) items of "
                    "different images) in batches of 16 against one at a time.",
        "run": "python benchmarks/serve.py",
    },
    "adapters": {
        "title": "LoRA adapters: switch, load, and a whole model load",
        "measures": "Milliseconds to switch a replica to a LoRA adapter already loaded, to load one from disk "
                    "(evicting another), and to load the whole tiny model, with r=16 adapters on the default "
                    "targets.",
        "run": "python benchmarks/serve.py --adapters-only",
    },
    "monailabel": {
        "title": "MONAI Label routes against /v1",
        "measures": "Seconds per request of MONAI Label's routes, driven by MONAI Label's own client, against "
                    "`/v1/segment` on the same server and CT volume (512×512×8 int16, one prompt, sequential "
                    "requests, routes interleaved).",
        "run": "python benchmarks/serve.py --monailabel",
    },
}


def distinct_images(count: int) -> list[bytes]:
    """``count`` different PNGs: the real slices in turn, each with one pixel set to a unique value."""
    import io

    import numpy as np
    from PIL import Image

    slices = [np.asarray(Image.open(PNG.parent / name).convert("L")) for name in SLICES]
    images = []
    for i in range(count):
        pixels = slices[i % len(slices)].copy()
        pixels[i // 256 % pixels.shape[0], 0] = i % 256
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


def load(url: str, clients: int, requests_per_client: int, distinct: bool = False) -> tuple[float, float, float]:
    import requests

    total = clients * (requests_per_client + 1)
    images = distinct_images(total) if distinct else [PNG.read_bytes()] * total

    def one(i):
        started = time.perf_counter()
        answer = requests.post(f"{url}/v1/segment", files={"file": ("ct.png", images[i])},
                               data={"prompt": ["liver", "spleen"]}, timeout=300)
        answer.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(clients)))  # warm-up round
        started = time.perf_counter()
        latencies = sorted(pool.map(one, range(clients, total)))
        elapsed = time.perf_counter() - started
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return len(latencies) / elapsed, statistics.median(latencies), p99


def model_items_per_s(checkpoint: Path, batch: int, rounds: int = 6) -> float:
    """The replica's own work: Segmenter.run_items on (slice, prompt) items of different requests."""
    from medsam3.inference import Preprocessor, Segmenter, checkpoint_image_size, inference_config
    from medsam3.io.scan import read_scan

    cfg = inference_config()
    segmenter = Segmenter(checkpoint, cfg)
    prep = Preprocessor(segmenter.plans, checkpoint_image_size(checkpoint))
    case = read_scan(PNG).case
    items = []
    for i in range(batch):  # distinct requests: each image differs from the others in one pixel
        image = case.image.copy()
        image[i, 0] = 255 - image[i, 0]
        distinct = type(case)(**{**case.__dict__, "image": image})
        items += prep.items(distinct, ["liver"], [None], [0], prep.intensity(distinct))
    segmenter.run_items(items)
    started = time.perf_counter()
    for _ in range(rounds):
        segmenter.run_items(items)
    return batch * rounds / (time.perf_counter() - started)


def adapter_times(checkpoint: Path, folder: Path, rounds: int = 20) -> dict[str, float]:
    """Median seconds: full model load, adapter load from disk (first use), adapter swap (loaded)."""
    from medsam3.inference import Segmenter, inference_config
    from medsam3.lora import apply_lora
    from medsam3.model import build_model

    adapters = {}
    for name in ("first", "second"):
        model = apply_lora(build_model(path=checkpoint), {"r": 16, "alpha": 32, "dropout": 0.0})
        model.save_pretrained(folder / name)
        adapters[name] = folder / name
    cfg = inference_config()

    def timed(step) -> float:
        started = time.perf_counter()
        step()
        return time.perf_counter() - started

    def use(segmenter: Segmenter, name: str) -> None:
        with segmenter.using(name):
            pass

    full = statistics.median(timed(lambda: Segmenter(checkpoint, cfg)) for _ in range(5))
    one = Segmenter(checkpoint, cfg, adapters=adapters, max_adapters=1)  # each switch evicts and loads
    use(one, "first")  # the first load also wraps the base in peft's PeftModel
    loads = [timed(lambda name=name: use(one, name)) for name in ["second", "first"] * (rounds // 4)]
    both = Segmenter(checkpoint, cfg, adapters=adapters, max_adapters=2)
    use(both, "first")
    use(both, "second")
    swaps = [timed(lambda name=name: use(both, name)) for name in ["first", "second"] * rounds]
    return {"model load": full, "adapter load": statistics.median(loads), "adapter swap": statistics.median(swaps)}


def print_adapter_times(times: dict[str, float], json_path) -> None:
    full = times["model load"]
    print("\nLoRA adapters on the tiny SAM3 (r=16, CPU): median seconds")
    rows = []
    for what, seconds in times.items():
        ratio = "" if what == "model load" else f"  (model load / this: {full / seconds:.0f}x)"
        print(f"  {what:13s} {seconds * 1000:9.2f} ms{ratio}")
        rows.append([what, f"{seconds * 1000:.2f} ms", "1×" if what == "model load" else f"{full / seconds:.1f}×"])
    record.write_section(json_path, __file__, SECTIONS, "adapters", tables=[record.table(
        "tiny SAM3 on CPU, r=16 adapters on the default targets; medians", ["operation", "time", "model load / this"],
        rows)])


def monailabel_times(url: str, folder: Path, rounds: int = 8) -> dict[str, float]:
    """Median seconds per request of /v1 and of the MONAI Label routes on the same volume."""
    import nibabel as nib
    import nrrd
    import numpy as np
    import requests
    from monailabel.client import MONAILabelClient

    from tests.builders import load_recist, uint8_to_hu

    recist = load_recist()
    data = np.ascontiguousarray(uint8_to_hu(recist["imgs"][2:10], width=2000, level=0).transpose(2, 1, 0))
    data = data.astype(np.int16)
    spacing = np.asarray(recist["spacing"][:3], float)
    nifti, volume = folder / "ct.nii.gz", folder / "ct.nrrd"
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), nifti)
    nrrd.write(str(volume), data, {"space": "left-posterior-superior", "space directions": np.diag(spacing),
                                   "space origin": np.zeros(3), "encoding": "gzip"}, index_order="F")
    client = MONAILabelClient(url, tmpdir=str(folder))
    client.upload_image(str(nifti), "ct")
    session = client.create_session(str(volume))["session_id"]
    params = {"labels": ["liver"]}
    calls = {
        "/v1/segment, NIfTI upload, NIfTI answer": lambda: requests.post(
            f"{url}/v1/segment", files={"file": ("ct.nii.gz", nifti.read_bytes())},
            data={"prompt": "liver", "format": "nifti"}, timeout=120).raise_for_status(),
        "/infer, NIfTI upload (file=)": lambda: client.infer("tiny", "", dict(params), file=str(nifti)),
        "/infer, datastore image (image=ID)": lambda: client.infer("tiny", "ct", dict(params)),
        "/infer, Slicer's NRRD session, NRRD answer": lambda: client.infer(
            "tiny", "", {**params, "result_extension": ".nrrd", "result_dtype": "uint8"}, session_id=session),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):  # interleaved, so that drift of this noisy machine hits every route alike
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--adapters-only", action="store_true", help="only the LoRA adapter timings")
    parser.add_argument("--monailabel", action="store_true", help="only the MONAI Label routes against /v1")
    parser.add_argument("--json", default=None, help="where the figures go (default: benchmarks/results/serve.json)")
    args = parser.parse_args()
    json_path = args.json or record.default_path(__file__)
    if args.monailabel:
        import ray
        from ray import serve

        from benchmarks.inference import tiny_checkpoint
        from medsam3.ray_local import init_ray
        from serve.run import start

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = tiny_checkpoint(Path(tmp) / "tiny")
            init_ray(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            url = start({"tiny": str(checkpoint)}, port=port,
                        settings={"monailabel": {"store_dir": str(Path(tmp) / "store")}},
                        overrides={"SegmentModel": {"autoscaling_config": None, "num_replicas": 1}})
            times = monailabel_times(url, Path(tmp))
            serve.shutdown()
            ray.shutdown()
        baseline = next(iter(times.values()))
        print("\nMONAI Label routes vs /v1: tiny SAM3 on CPU, a 512x512x8 CT volume, one prompt, median of 8")
        for name, seconds in times.items():
            print(f"{name:48s} {seconds:7.3f} s  {seconds / baseline:5.2f}x")
        record.write_section(json_path, __file__, SECTIONS, "monailabel", tables=[record.table(
            "tiny SAM3 on CPU, a real CT volume of 512×512×8 int16, one prompt, sequential requests through MONAI "
            "Label's client; median of 8 interleaved rounds", ["route", "s / request", "vs `/v1`"],
            [[name, f"{seconds:.3f}", f"{seconds / baseline:.2f}×"] for name, seconds in times.items()])])
        return
    if args.adapters_only:
        from benchmarks.inference import tiny_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            print_adapter_times(adapter_times(tiny_checkpoint(Path(tmp) / "tiny"), Path(tmp)), json_path)
        return

    import ray
    from ray import serve

    from benchmarks.inference import tiny_checkpoint
    from serve.run import start

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "tiny")
        from medsam3.ray_local import init_ray

        init_ray(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        table = {}
        for batching, size in (("on", 16), ("off", 1)):
            options = {"SegmentModel": {"autoscaling_config": None, "num_replicas": 1,
                                        "user_config": {"max_batch_size": size, "batch_wait_timeout_s": 0.02}}}
            url = start({"tiny": str(checkpoint)}, port=port, overrides=options)
            for clients in (1, 8, 32):
                table[(batching, clients, "copies")] = load(url, clients, args.requests_per_client)
            table[(batching, 32, "distinct")] = load(url, 32, args.requests_per_client, distinct=True)
            serve.delete("medsam3")
        serve.shutdown()
        ray.shutdown()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp) / "tiny")
        single, batched = model_items_per_s(checkpoint, 1), model_items_per_s(checkpoint, 16)
        adapters = adapter_times(checkpoint, Path(tmp))
    print(f"\nmodel replica alone (Segmenter.run_items): {single:.1f} items/s one at a time, "
          f"{batched:.1f} items/s in batches of 16 ({batched / single:.2f}x)")
    print("\nserve: tiny SAM3 on CPU, one model replica, a 512² CT slice with 2 prompts per request")
    print("clients  images    batching   req/s    p50 (s)   p99 (s)")
    for (batching, clients, images), (rate, p50, p99) in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][2],
                                                                                                 kv[0][0])):
        print(f"{clients:7d}  {images:>8}  {batching:>8}  {rate:6.2f}  {p50:8.3f}  {p99:8.3f}")
    on1 = table[("on", 1, "copies")]
    for images in ("copies", "distinct"):
        on32, off32 = table[("on", 32, images)], table[("off", 32, images)]
        print(f"\n{images}: throughput at 32 clients, batching on / off: {on32[0] / off32[0]:.2f}x  (target >= 2x)")
        print(f"{images}: p99 at 32 clients with batching / single-client p50: {on32[2] / on1[1]:.2f}x  "
              "(target <= 2x)")
    rows = [[clients, images, batching, f"{rate:.2f}", f"{p50:.3f}", f"{p99:.3f}"]
            for (batching, clients, images), (rate, p50, p99) in sorted(table.items(), key=lambda kv: (
                kv[0][1], kv[0][2], kv[0][0] == "on"))]
    targets = []
    for images in ("copies", "distinct"):
        on32, off32 = table[("on", 32, images)], table[("off", 32, images)]
        targets += [record.target(f"{images}: throughput at 32 clients, batching on / off",
                                  round(on32[0] / off32[0], 2), ">= 2"),
                    record.target(f"{images}: p99 at 32 clients with batching / single-client p50",
                                  round(on32[2] / on1[1], 2), "<= 2")]
    record.write_section(json_path, __file__, SECTIONS, "http", tables=[record.table(
        f"tiny SAM3 on CPU, one model replica (1 CPU), ingress 0.5 CPU, clients on the same machine; a 512² CT slice "
        f"with 2 prompts per request, {args.requests_per_client} requests per client after a warm-up round; "
        "copies: every client sends the same slice, distinct: every request a different image",
        ["clients", "images", "batching", "req/s", "p50 (s)", "p99 (s)"], rows)], targets=targets,
        notes=["p99 under load is bounded below by queueing: with every client on one machine, latency under load "
               "is about clients / throughput."])
    record.write_section(json_path, __file__, SECTIONS, "replica", tables=[record.table(
        "tiny SAM3 on CPU, one (slice, prompt) item per distinct image", ["measure", "figure"],
        [["one item at a time", f"{single:.1f} items/s"], ["batches of 16 items", f"{batched:.1f} items/s"],
         ["batched / one at a time", f"{batched / single:.2f}×"]])])
    print_adapter_times(adapters, json_path)


if __name__ == "__main__":
    main()
