"""Memory the serve ingress spends on one volume request (run: ``python benchmarks/serve_memory.py``).

Each measurement runs in a fresh process: a CT volume (int16 or float32) as a gzipped NIfTI goes through the
ingress's own path (``read_scan``, items made chunk by chunk as ``Ingress._run`` does, answers
filled in, the NIfTI label map written) with the model's answers replaced by empty masks (the
model runs in another process). The peak resident memory above the process's baseline, divided
by the voxels, is set against what the ingress reserves for that request in ``max_decoded_mb``
(``serve.ingress.reserved_bytes`` of the file's declared size). The figures are also written as
JSON (``--json``, default ``benchmarks/results/serve_memory.json``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import record  # noqa: E402  (needs ROOT on the path)

SECTIONS = {
    "volume": {
        "title": "Ingress memory per voxel of a volume request",
        "measures": "Peak resident memory above the process's baseline, per voxel, of the ingress's work on one CT "
                    "volume request (NIfTI in and out, the model's answers replaced by empty masks) against what "
                    "a request reserves in `max_decoded_mb`: max(2 × the declared bytes, 8 per voxel) + 1 per "
                    "prompt.",
        "run": "python benchmarks/serve_memory.py",
    },
}
CASES = [((512, 512, 100), "int16", 1), ((512, 512, 100), "int16", 4), ((512, 512, 300), "int16", 1),
         ((512, 512, 300), "int16", 4), ((512, 512, 100), "float32", 1), ((512, 512, 100), "float32", 4)]


def one_request(path: Path, prompts: int, queue) -> None:
    """The ingress's work on one volume request; puts (peak RSS above baseline, voxels, the bytes
    the ingress reserves for it). Everything is imported here, before the baseline: a spawned
    process starts with its parent's peak RSS (Linux keeps it across exec), so the parent stays light."""
    import numpy as np

    from medsam3.inference import Preprocessor, SliceAnswer, inference_config
    from medsam3.io.declared import declared
    from medsam3.io.scan import read_scan
    from medsam3.io.write import write_nifti_labels
    from medsam3.plans import Plans
    from serve.ingress import reserved_bytes

    cfg = inference_config()
    names = ["liver", "spleen", "left kidney", "right kidney", "pancreas", "aorta"][:prompts]
    # items at the sam3 preset's input size, as serve ships them
    prep = Preprocessor(Plans.from_prepare_config(cfg.prepare), 1008)
    reserved = reserved_bytes(declared(path), prompts)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    scan = read_scan(path)
    case = scan.case
    intensity = prep.intensity(case)
    results = prep.results(case, names, [None] * prompts, None)
    count, chunk = prep.num_slices(case), int(cfg.batch_size)
    for start in range(0, count, chunk):
        items = prep.items(case, names, [None] * prompts, range(start, min(start + chunk, count)), intensity)
        answers = [SliceAnswer(np.zeros(item.out_hw, bool), 0.0) for item in items]
        prep.fill(case, results, items, answers)
    write_nifti_labels([r.mask for r in results], case.affine, path.with_name("labels.nii.gz"), scan.source_affine)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((peak - baseline, case.image.size, reserved))


def measure(shape: tuple[int, int, int], prompts: int, dtype: str) -> tuple[float, float]:
    """(bytes per voxel measured, reserved); the volume is written here, so the measuring process
    only reads it."""
    import nibabel as nib
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        volume = np.random.default_rng(0).integers(-1000, 1000, size=shape, dtype=np.int16).astype(dtype)
        nib.save(nib.Nifti1Image(volume, np.diag([0.8, 0.8, 2.0, 1.0])), path)
        del volume
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=one_request, args=(path, prompts, queue))
        process.start()
        grown, voxels, reserved = queue.get()
        process.join()
    return grown / voxels, reserved / voxels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None,
                        help="where the figures go (default: benchmarks/results/serve_memory.json)")
    args = parser.parse_args()
    print("ingress memory per voxel of a volume request (CT, NIfTI in and out)")
    print("volume           dtype    prompts  bytes/voxel  reserved")
    rows, worst = [], None
    for shape, dtype, prompts in CASES:
        per_voxel, reserved = measure(shape, prompts, dtype)
        print(f"{'x'.join(map(str, shape)):15s}  {dtype:7s}  {prompts:7d}  {per_voxel:11.2f}  {reserved:8.2f}")
        rows.append(["×".join(map(str, shape)), dtype, prompts, f"{per_voxel:.2f}", f"{reserved:.2f}"])
        share = per_voxel / reserved
        worst = max(worst or (share, per_voxel, prompts), (share, per_voxel, prompts))
    record.write_section(
        args.json or record.default_path(__file__), __file__, SECTIONS, "volume",
        tables=[record.table("random CT volumes as gzipped NIfTI, one fresh process per row",
                             ["volume", "dtype", "prompts", "bytes / voxel", "reserved / voxel"], rows)],
        targets=[record.target(f"largest measured / reserved bytes per voxel ({worst[2]} prompt(s))",
                               round(worst[0], 2), "<= 1")])


if __name__ == "__main__":
    main()
