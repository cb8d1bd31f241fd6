"""The shard format that ``prepare`` writes and training, evaluation and serving read.

One Parquet row per (slice, label); see ``docs/data-format.md``. ``image`` and ``mask`` are
stored as raw C-order bytes (S×S×3 and S×S uint8; zstd compresses them in the file) because
Parquet's list encoding spends 4 bytes of level data per pixel: 3x slower to write and
5x the memory. :func:`decode_row` / :func:`decode_batch` give the arrays back.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from medsam3.io import storage

SCHEMA_VERSION = 1

# column → description; the Arrow types are in SHARD_SCHEMA.
COLUMNS: dict[str, str] = {
    "image": "uint8 (S, S, 3) as raw bytes: the slice, intensity-normalised, resized and padded",
    "mask": "uint8 (S, S) 0/1 as raw bytes: the label's mask on the stored image",
    "box": "float32 x4: x0, y0, x1, y1 of the mask in stored pixels (x1, y1 exclusive); zeros if empty",
    "prompt": "text prompt for SAM3",
    "label": "label name as the source dataset spells it",
    "dataset": "dataset name",
    "modality": "CT, MR, US, ... (UNKNOWN when not given)",
    "case_id": "case identifier (a salted hash for DICOM)",
    "slice_index": "index of the slice along the slicing axis; -1 for 2D images",
    "num_slices": "number of slices of the case along that axis; 1 for 2D images",
    "spacing": "float32 x3: mm per stored pixel along rows, columns, and between slices",
    "orig_size": "int32 x2: rows, columns of the slice before resizing",
    "area": "foreground pixels of the stored mask (0 for an empty row)",
    "source_sha256": "sha256 over the sorted sha256 digests of the case's input files",
}

SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("mask", pa.binary()),
    ("box", pa.list_(pa.float32(), 4)),
    ("prompt", pa.string()),
    ("label", pa.string()),
    ("dataset", pa.string()),
    ("modality", pa.string()),
    ("case_id", pa.string()),
    ("slice_index", pa.int64()),
    ("num_slices", pa.int64()),
    ("spacing", pa.list_(pa.float32(), 3)),
    ("orig_size", pa.list_(pa.int32(), 2)),
    ("area", pa.int64()),
    ("source_sha256", pa.string()),
])
_VECTORS = {"box": np.float32, "spacing": np.float32, "orig_size": np.int32}


def row_tables(rows, rows_per_table: int):
    """Rows → Arrow tables of at most ``rows_per_table`` rows each, as the rows come (a volume's
    rows are never all held at once)."""
    block = []
    for row in rows:
        block.append(row)
        if len(block) == rows_per_table:
            yield rows_to_table(block)
            block = []
    if block:
        yield rows_to_table(block)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows from :func:`medsam3.samples.case_rows` → an Arrow table in :data:`SHARD_SCHEMA`.

    Built column by column with one copy of each image: about 3x cheaper than handing row
    dicts to Ray Data's generic converter (measured with py-spy in a prepare task).
    """
    columns = []
    for field in SHARD_SCHEMA:
        name = field.name
        if name in ("image", "mask"):
            columns.append(_binary_column([r[name] for r in rows]))
        elif name in _VECTORS:
            dtype = _VECTORS[name]
            values = np.concatenate([np.asarray(r[name], dtype) for r in rows]) if rows else np.zeros(0, dtype)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(values), field.type.list_size))
        else:
            columns.append(pa.array([r[name] for r in rows], field.type))
    return pa.Table.from_arrays(columns, schema=SHARD_SCHEMA)


def _binary_column(arrays: list[np.ndarray]) -> pa.Array:
    """uint8 arrays → a binary column, copied once into one buffer from Arrow's memory pool.

    The pool keeps freed blocks for reuse; a fresh numpy buffer of this size (64 MB per block of
    1008² rows) is mmap-ed and page-faulted anew each time, which cost more than the copy.
    """
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum([a.nbytes for a in arrays], out=offsets[1:])
    data = pa.allocate_buffer(int(offsets[-1]))
    out = np.frombuffer(data, np.uint8)
    for array, start, end in zip(arrays, offsets[:-1], offsets[1:], strict=True):
        out[start:end] = array.reshape(-1)
    return pa.Array.from_buffers(pa.binary(), len(arrays), [None, pa.py_buffer(offsets), data])


def _side(mask_bytes: int) -> int:
    side = math.isqrt(mask_bytes)
    if side * side != mask_bytes:
        raise ShardSchemaError(f"mask of {mask_bytes} bytes is not a square image")
    return side


def decode_row(row: dict) -> dict:
    """A row as read → ``image`` (S, S, 3) and ``mask`` (S, S) uint8 arrays (zero-copy views of
    the bytes) and numpy vectors for ``box``, ``spacing`` and ``orig_size``."""
    side = _side(len(row["mask"]))
    out = {**row, "image": np.frombuffer(row["image"], np.uint8).reshape(side, side, 3),
           "mask": np.frombuffer(row["mask"], np.uint8).reshape(side, side)}
    for name, dtype in _VECTORS.items():
        out[name] = np.asarray(row[name], dtype)
    return out


def decode_batch(batch: dict) -> dict:
    """A Ray Data numpy batch → stacked ``image`` (N, S, S, 3) and ``mask`` (N, S, S) arrays."""
    masks = batch["mask"]
    if len(masks) == 0:
        return batch
    side = _side(len(masks[0]))
    images = np.stack([np.frombuffer(b, np.uint8) for b in batch["image"]]).reshape(-1, side, side, 3)
    stacked = np.stack([np.frombuffer(b, np.uint8) for b in masks]).reshape(-1, side, side)
    return {**batch, "image": images, "mask": stacked}


def parquet_options() -> dict:
    """Writer options for shards: zstd everywhere; dictionaries and min/max statistics only on
    scalar columns (on the image bytes they cost 2-3x the write time and help no query)."""
    strings = [f.name for f in SHARD_SCHEMA if f.type == pa.string()]
    return {
        "compression": "zstd",
        "use_dictionary": strings,
        "write_statistics": strings + [f.name for f in SHARD_SCHEMA if f.type == pa.int64()],
    }



class ShardSchemaError(ValueError):
    """A folder is not a medsam3 shard folder, or its schema differs from ``prepare``'s."""


def schema_problems(schema: pa.Schema) -> list[str]:
    """Differences between a Parquet schema and :data:`SHARD_SCHEMA` (empty when it matches)."""
    problems = []
    for field in SHARD_SCHEMA:
        if field.name not in schema.names:
            problems.append(f"missing column {field.name!r}")
            continue
        found = schema.field(field.name).type
        if found != field.type and _widen(found) != field.type:
            problems.append(f"column {field.name!r} is {found}, expected {field.type}")
    return problems


def _widen(arrow_type: pa.DataType) -> pa.DataType:
    # large_* variants hold the same values (a reader may have widened them)
    return {pa.large_binary(): pa.binary(), pa.large_string(): pa.string()}.get(arrow_type, arrow_type)


def shard_files(folder: str | os.PathLike) -> list[str]:
    """The Parquet files of a shard folder (local path or ``s3://`` URI), in order."""
    fs, inner = storage.filesystem(folder)
    found = sorted(p for p in fs.glob(f"{inner.rstrip('/')}/*.parquet"))
    return [storage.join(folder, p.rsplit("/", 1)[-1]) for p in found]


def arrow_source(files: list[str]) -> tuple[list[str], Any]:
    """(paths, pyarrow filesystem) for reading shard files with pyarrow or Ray Data."""
    if not files:
        return [], None
    fs, _ = storage.arrow_filesystem(files[0])
    return [storage.arrow_filesystem(f)[1] for f in files], fs


def shard_dataset(files: list[str]) -> pads.Dataset:
    """A pyarrow dataset over shard files (local or remote)."""
    paths, fs = arrow_source(files)
    return pads.dataset(paths, format="parquet", filesystem=fs)


def validate_shards(folder: str | os.PathLike) -> dict:
    """Check a shard folder (manifest, schema, non-empty) and return its manifest."""
    manifest_path = storage.join(folder, "manifest.json")
    if not storage.is_file(manifest_path):
        raise ShardSchemaError(f"{folder}: no manifest.json; not a folder written by `medsam3 prepare`")
    manifest = json.loads(storage.read_text(manifest_path))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardSchemaError(
            f"{folder}: shard schema version {manifest.get('schema_version')} (this code reads {SCHEMA_VERSION})"
        )
    files = shard_files(folder)
    if not files:
        raise ShardSchemaError(f"{folder}: no Parquet shards")
    dataset = shard_dataset(files)
    problems = schema_problems(dataset.schema)
    if problems:
        raise ShardSchemaError(f"{folder}: not prepare's shard schema: {'; '.join(problems)}")
    if dataset.count_rows() == 0:
        raise ShardSchemaError(f"{folder}: the shards hold no rows")
    return manifest
