"""A Ray Data sink that writes shard files byte-for-byte the same on every run.

Ray Data's ``write_parquet`` hands a task's blocks to ``pyarrow.dataset.write_dataset`` with
``use_threads=True`` and no ``preserve_order``, so rows of one file may come out in another
order from run to run (seen in CI, and reproduced with pyarrow alone: 1 run in 20). DVC then
sees a changed shard where nothing changed. This sink writes each task's rows in the order
they arrive, with ``pyarrow.parquet`` and the same file layout: ``part-<task>-<i>.parquet``,
at most ``max_rows_per_file`` rows per file, one row group per file.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.block import Block, BlockAccessor
from ray.data.datasource import Datasink
from ray.data.datasource.datasink import TaskContext


class ShardSink(Datasink[list[str]]):
    """Write each task's blocks, in order, into ``part-<task index>-<i>.parquet`` under ``path``.

    ``filesystem`` is a pyarrow filesystem (local or S3) and ``path`` a folder within it;
    ``options`` are ``pyarrow.parquet.write_table`` keywords (compression, dictionaries, stats).
    """

    def __init__(self, path: str, filesystem: Any, max_rows_per_file: int, options: dict[str, Any]):
        if max_rows_per_file < 1:
            raise ValueError(f"max_rows_per_file must be at least 1, got {max_rows_per_file}")
        self.path = path.rstrip("/")
        self.filesystem = filesystem
        self.max_rows_per_file = max_rows_per_file
        self.options = options

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        self.filesystem.create_dir(self.path, recursive=True)

    def write(self, blocks: Iterable[Block], ctx: TaskContext) -> list[str]:
        written: list[str] = []
        pending: list[pa.Table] = []
        rows = 0
        for block in blocks:
            table = BlockAccessor.for_block(block).to_arrow()
            while table.num_rows:
                take = min(table.num_rows, self.max_rows_per_file - rows)
                pending.append(table.slice(0, take))
                table, rows = table.slice(take), rows + take
                if rows == self.max_rows_per_file:
                    written.append(self._write_file(pending, ctx.task_idx, len(written)))
                    pending, rows = [], 0
        if rows:
            written.append(self._write_file(pending, ctx.task_idx, len(written)))
        return written

    def _write_file(self, tables: list[pa.Table], task_index: int, number: int) -> str:
        table = pa.concat_tables(tables)
        name = f"part-{task_index:05d}-{number}.parquet"
        with self.filesystem.open_output_stream(f"{self.path}/{name}") as stream:
            pq.write_table(table, stream, row_group_size=table.num_rows, **self.options)
        return name
