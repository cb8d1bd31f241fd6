"""``medsam3 prepare``: scans → deterministic, de-identified Parquet shards, on Ray Data.

The recipe, top to bottom:
1. discover cases in the driver (file names, JSON, DICOM headers; unknown labels fail here);
2. one Ray Data read task per case: decode, validate, hash the inputs, emit rows slice by slice;
3. write Parquet (``ShardSink``: rows in arrival order, deterministic names) into a temporary
   folder beside OUTPUT;
4. write ``manifest.json`` and ``rejected.json``, then rename the folder to OUTPUT.
A failed or interrupted run leaves OUTPUT as it was.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from omegaconf import DictConfig, OmegaConf

import medsam3
from medsam3.errors import StageError
from medsam3.io import CaseError, CaseRef, discover, read_case, storage
from medsam3.plans import Plans
from medsam3.ray_local import init_ray, require_reachable
from medsam3.samples import case_rows
from medsam3.schema import SCHEMA_VERSION, parquet_options, row_tables, shard_dataset, shard_files
from medsam3.vocab import Vocabulary

MANIFEST = "manifest.json"
ROWS_PER_BLOCK = 16  # ~64 MB of 1008² rows per Arrow block: bounded memory, cheap batches
REJECTED = "rejected.json"


class PrepareError(StageError):
    """The run as a whole failed (every case rejected, or a rejection under strict=true)."""


@dataclass
class PrepareResult:
    output: str
    num_rows: int
    num_cases: int
    rejected: list[dict[str, str]]
    counts: list[dict[str, Any]] = field(default_factory=list)


# --- per-case work (runs in Ray tasks, or in a plain process for the benchmark) ---------------

@functools.lru_cache(maxsize=8)
def _plans(settings_json: str) -> Plans:
    return Plans.from_prepare_config(OmegaConf.create(json.loads(settings_json)))


def plans_for(cfg: DictConfig) -> Plans:
    """The preprocessing plans a prepare config asks for (cached per process)."""
    keys = ("image_size", "slice_axis", "windows", "window", "window_overrides", "percentiles", "vocabulary",
            "extra_labels")
    return _plans(json.dumps({k: OmegaConf.to_container(cfg, resolve=True).get(k) for k in keys}, sort_keys=True))


def vocabulary_for(cfg: DictConfig) -> Vocabulary:
    """The prompt vocabulary a config asks for."""
    return plans_for(cfg).vocab


def prepare_case(ref: CaseRef, cfg: DictConfig) -> tuple[list[dict[str, str]], Iterator[dict[str, Any]]]:
    """Decode one case and return (its input files' digests, a generator of its rows).

    Everything that can reject the case (reading, validation, vocabulary) happens before the
    first row exists, so a case is either wholly in the shards or wholly rejected.
    """
    plans = plans_for(cfg)
    case = read_case(ref, cfg)
    rows = case_rows(case, cfg, plans)
    first = next(rows, None)

    def all_rows() -> Iterator[dict[str, Any]]:
        if first is not None:
            yield first
            yield from rows

    return case.sources, all_rows()


def _case_tables(batch: dict[str, Any], cfg: DictConfig, ledger: str, rows_per_block: int,
                 remote_input: tuple[str, str] | None = None) -> Iterator[pa.Table]:
    """Ray Data UDF: one case in, its rows out as Arrow tables of ``rows_per_block`` rows.

    The case's outcome goes to ``ledger/<index>.json`` (a file per case: no actor to start, and
    a retried task simply rewrites it). ``remote_input`` is (input URI, the driver's local copy
    of it): a task on another node fetches its case's files into the same place first.
    """
    storage.configure(cfg.get("storage"))
    index, ref = int(batch["index"][0]), CaseRef.from_dict(json.loads(batch["ref"][0]))
    record = storage.join(ledger, f"{index:08d}.json")
    if remote_input is not None:
        uri, mirror = remote_input
        storage.fetch_missing(uri, mirror, [Path(ref.root, f) for f in ref.files])
    try:
        sources, rows = prepare_case(ref, cfg)
    except CaseError as exc:  # under strict=true the driver fails the run after the write
        reason = {"dataset": ref.dataset, "case": _case_name(ref), "reason": str(exc)}
        storage.write_bytes(record, json.dumps(reason).encode())
        return
    yield from row_tables(rows, rows_per_block)
    outcome = {"dataset": ref.dataset, "case_id": ref.case_id, "sources": sources}
    storage.write_bytes(record, json.dumps(outcome).encode())


def _case_name(ref: CaseRef) -> str:
    # DICOM file paths may carry patient names in folder names; rejected.json names the hashed id.
    return ref.case_id if ref.layout == "dicom" else ref.files[0]


def _read_ledger(ledger: str) -> tuple[dict[tuple[str, str], list], dict[tuple[str, str], str]]:
    accepted, rejected = {}, {}
    for record in sorted(storage.listing(ledger)):
        entry = json.loads(storage.read_text(storage.join(ledger, record)))
        if "reason" in entry:
            rejected[(entry["dataset"], entry["case"])] = entry["reason"]
        else:
            accepted[(entry["dataset"], entry["case_id"])] = entry["sources"]
    return accepted, rejected


# --- the Ray job ------------------------------------------------------------------------------

def run_prepare(input_dir: str | os.PathLike, output_dir: str | os.PathLike, cfg: DictConfig,
                address: str | None = None) -> PrepareResult:
    """Prepare every case under ``input_dir`` into shards in ``output_dir`` (see module doc)."""
    import ray

    from preprocessing.shard_sink import ShardSink

    output = os.fspath(output_dir) if storage.is_remote(output_dir) else os.fspath(Path(output_dir).absolute())
    cfg.storage = storage.settings()  # read tasks get the settings in force here (config or environment)
    _check_output(output)
    # s3:// input: discovery reads headers, so the driver works on a local copy of the input
    local_input = storage.local_copy(input_dir)
    remote_input = (os.fspath(input_dir), os.fspath(local_input)) if storage.is_remote(input_dir) else None
    refs, rejected_early = discover(local_input, cfg, vocabulary_for(cfg))
    if cfg.strict and rejected_early:
        first = rejected_early[0]
        count = len(rejected_early)
        raise PrepareError(f"strict=true and {count} case(s) rejected: {first['case']}: {first['reason']}")
    if not refs:
        first = rejected_early[0]["reason"] if rejected_early else ""
        raise PrepareError(f"no case to prepare in {input_dir}: {first}")
    print(f"prepare: {len(refs)} case(s) in {len({r.dataset for r in refs})} dataset(s)")

    if not ray.is_initialized():
        init_ray(address, include_dashboard=False, configure_logging=True, logging_level="WARNING")
    require_reachable({"INPUT": input_dir, "OUTPUT": output}, PrepareError)  # before any task, on every node
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # deterministic row order and file contents
    # One read task per case, fused with the write: outputs are tiny, so the object-store
    # reservation that Ray Data makes per operator only holds tasks back on a small machine.
    context.op_resource_reservation_enabled = False
    # Ray Data samples each task's USS every second by reading /proc/<pid>/smaps, which maps the
    # whole object store: measured here as 2/3 of the machine's CPU spent in the kernel.
    context.memory_usage_poll_interval_s = None
    # staging and ledger live beside OUTPUT, on its filesystem: every node of a cluster writes there
    token = uuid.uuid4().hex[:8]
    staging = storage.join(storage.parent(output), f".{storage.name(output)}.tmp-{token}")
    ledger = storage.join(storage.parent(output), f".{storage.name(output)}.cases-{token}")
    filesystem, staging_path = storage.arrow_filesystem(staging)
    try:
        if not storage.is_remote(ledger):
            Path(ledger).mkdir(parents=True)
        items = [{"index": i, "ref": json.dumps(r.to_dict())} for i, r in enumerate(refs)]
        dataset = ray.data.from_items(items, override_num_blocks=len(refs))
        dataset = dataset.map_batches(
            _case_tables,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"cfg": cfg, "ledger": ledger, "rows_per_block": ROWS_PER_BLOCK, "remote_input": remote_input},
            num_cpus=float(cfg.num_cpus_per_case),
            concurrency=cfg.concurrency,
        )
        try:
            dataset.write_datasink(ShardSink(staging_path, filesystem, int(cfg.max_rows_per_file), parquet_options()))
        except Exception as exc:  # Ray wraps user errors; surface the case's own message
            cause = _root_cause(exc)
            raise PrepareError(f"prepare failed: {cause}") from exc
        accepted, rejected_late = _read_ledger(ledger)
        first_file = {(r.dataset, r.case_id): r.files[0] for r in refs if r.layout == "dicom"}
        rejected = rejected_early + [
            {"dataset": d, "case": c, "reason": r, **({"where": first_file[(d, c)]} if (d, c) in first_file else {})}
            for (d, c), r in sorted(rejected_late.items())
        ]
        if cfg.strict and rejected:
            raise PrepareError(f"strict=true and {len(rejected)} case(s) rejected: "
                               + "; ".join(r["reason"] for r in rejected[:5]))
        if not accepted:
            raise PrepareError(f"every case was rejected ({len(rejected)}); first: {rejected[0]['reason']}")
        counts, num_rows = _count_rows(staging)
        manifest = {
            "format": "medsam3-shards",
            "schema_version": SCHEMA_VERSION,
            "medsam3_version": medsam3.__version__,
            "config": _public_config(cfg),
            "plans": plans_for(cfg).to_dict(),
            "num_rows": num_rows,
            "num_cases": len(accepted),
            "num_rejected": len(rejected),
            "files": sorted(storage.name(p) for p in shard_files(staging)),
            "counts": counts,
            "inputs": [
                {"dataset": d, "case_id": c, **source}
                for (d, c), sources in sorted(accepted.items())
                for source in sorted(sources, key=lambda s: (s.get("path", ""), s["sha256"]))
            ],
        }
        manifest_text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        # "where" (a DICOM file path, which may name the patient) is for the console only
        public = [{k: v for k, v in r.items() if k != "where"} for r in rejected]
        storage.write_bytes(storage.join(staging, REJECTED), (json.dumps(public, indent=1) + "\n").encode())
        storage.write_bytes(storage.join(staging, MANIFEST), manifest_text.encode())  # last: marks it complete
        storage.replace_folder(staging, output, last=[MANIFEST])
    finally:
        for leftover in (staging, ledger):
            storage.remove(leftover)
    return PrepareResult(str(output), num_rows, len(accepted), rejected, counts)


def _check_output(output: str) -> None:
    if storage.is_file(output) or (storage.listing(output) and not storage.is_file(storage.join(output, MANIFEST))):
        raise PrepareError(f"output {output} exists and is not a medsam3 shard folder; refusing to overwrite it")


def _count_rows(folder: str) -> tuple[list[dict[str, Any]], int]:
    table = shard_dataset(shard_files(folder)).to_table(columns=["dataset", "label", "modality", "area"])
    rows, positive = Counter(), Counter()
    for dataset, label, modality, area in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
        rows[(dataset, label, modality)] += 1
        positive[(dataset, label, modality)] += area > 0
    counts = [
        {"dataset": d, "label": lab, "modality": m, "rows": n, "with_mask": positive[(d, lab, m)],
         "empty": n - positive[(d, lab, m)]}
        for (d, lab, m), n in sorted(rows.items())
    ]
    return counts, table.num_rows


def _public_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as recorded in the manifest: no salt, no absolute paths, no storage settings
    (where the files live does not change what they hold)."""
    public = OmegaConf.to_container(cfg, resolve=True)
    public.pop("salt", None)
    public.pop("storage", None)
    if public.get("vocabulary"):
        public["vocabulary"] = Path(public["vocabulary"]).name
    return public


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def format_summary(result: PrepareResult) -> str:
    """The end-of-run table: rows per dataset / label / modality, and the rejected cases."""
    header = ("dataset", "label", "modality", "rows", "with mask", "empty")
    body = [(c["dataset"], c["label"], c["modality"], c["rows"], c["with_mask"], c["empty"]) for c in result.counts]
    body.append(("total", "", "", result.num_rows, sum(c["with_mask"] for c in result.counts),
                 sum(c["empty"] for c in result.counts)))
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(str(v).ljust(w) if i < 3 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{result.num_cases} case(s) prepared, {len(result.rejected)} rejected → {result.output}")
    lines += [f"  rejected {r['case']}: {r['reason']}" + (f"  [first file: {r['where']}]" if "where" in r else "")
              for r in result.rejected[:20]]
    if len(result.rejected) > 20:
        lines.append(f"  ... and {len(result.rejected) - 20} more in {REJECTED}")
    return "\n".join(lines)
