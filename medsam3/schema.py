"""The shard format that ``prepare`` writes and training, evaluation and serving read.

One Parquet row per (slice, label); see ``docs/data-format.md``. Tensor columns are written by
Ray Data as its fixed-shape tensor extension type (``ray.data.read_parquet`` gives numpy arrays
back); readers without Ray see the extension's storage type.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

SCHEMA_VERSION = 1

# column → (kind, description); kind "tensor" columns hold fixed-shape numpy arrays.
COLUMNS: dict[str, tuple[str, str]] = {
    "image": ("tensor", "uint8 (S, S, 3): the slice, intensity-normalised, resized and padded"),
    "mask": ("tensor", "uint8 (S, S) 0/1: the label's mask on the stored image"),
    "box": ("tensor", "float32 (4,): x0, y0, x1, y1 of the mask in stored pixels (x1, y1 exclusive); zeros if empty"),
    "prompt": ("string", "text prompt for SAM3"),
    "label": ("string", "label name as the source dataset spells it"),
    "dataset": ("string", "dataset name"),
    "modality": ("string", "CT, MR, US, ... (UNKNOWN when not given)"),
    "case_id": ("string", "case identifier (a salted hash for DICOM)"),
    "slice_index": ("int64", "index of the slice along the slicing axis; -1 for 2D images"),
    "num_slices": ("int64", "number of slices of the case along that axis; 1 for 2D images"),
    "spacing": ("tensor", "float32 (3,): mm per stored pixel along rows, columns, and between slices"),
    "orig_size": ("tensor", "int32 (2,): rows, columns of the slice before resizing"),
    "area": ("int64", "foreground pixels of the stored mask (0 for an empty row)"),
    "source_sha256": ("string", "sha256 over the sorted sha256 digests of the case's input files"),
}


class ShardSchemaError(ValueError):
    """A folder is not a medsam3 shard folder, or its schema differs from ``prepare``'s."""


def schema_problems(schema: pa.Schema) -> list[str]:
    """Differences between a Parquet schema and the shard schema (empty when it matches)."""
    problems = []
    names = set(schema.names)
    for column, (kind, _) in COLUMNS.items():
        if column not in names:
            problems.append(f"missing column {column!r}")
            continue
        arrow_type = schema.field(column).type
        if kind == "string" and not pa.types.is_string(arrow_type) and not pa.types.is_large_string(arrow_type):
            problems.append(f"column {column!r} is {arrow_type}, expected string")
        elif kind == "int64" and not pa.types.is_integer(arrow_type):
            problems.append(f"column {column!r} is {arrow_type}, expected an integer")
    return problems


def validate_shards(folder: str | os.PathLike) -> dict:
    """Check a shard folder (manifest, schema, non-empty) and return its manifest."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ShardSchemaError(f"{folder}: no manifest.json; not a folder written by `medsam3 prepare`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardSchemaError(
            f"{folder}: shard schema version {manifest.get('schema_version')} (this code reads {SCHEMA_VERSION})"
        )
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise ShardSchemaError(f"{folder}: no Parquet shards")
    dataset = pads.dataset([str(f) for f in files], format="parquet")
    problems = schema_problems(dataset.schema)
    if problems:
        raise ShardSchemaError(f"{folder}: not prepare's shard schema: {'; '.join(problems)}")
    if dataset.count_rows() == 0:
        raise ShardSchemaError(f"{folder}: the shards hold no rows")
    return manifest
