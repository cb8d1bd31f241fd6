"""Writing a benchmark's figures as JSON (``benchmarks/results/<script>.json``).

Each script declares ``SECTIONS`` (a literal dict: section id → title, the one sentence saying
what it measures, and the command that runs it) and, per section it ran, calls
:func:`write_section` with its tables and targets. A result file holds one entry per section;
running one section again replaces that entry and keeps the others. ``tools/benchmarks_doc.py``
renders the files as ``docs/benchmarks.md``.

A section::

    {"id": "images", "title": ..., "measures": ..., "date": "2026-01-31T12:00:00Z",
     "command": "python benchmarks/train.py --steps 30", "machine": {...},
     "tables": [{"title": ..., "columns": [...], "rows": [[...], ...]}],
     "targets": [{"measure": ..., "value": 2.4, "target": "<= 1.5", "met": false}],
     "notes": [...]}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # when the benchmark imported this


def load_average() -> dict:
    """The machine's 1-minute load average when the benchmark started and now: other work on the
    machine shows here."""
    now = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"start": None if LOAD_AT_START is None else round(LOAD_AT_START, 2),
            "end": None if now is None else round(now, 2)}


def default_path(script: str) -> Path:
    """``benchmarks/results/<script-name>.json`` for a script's ``__file__``."""
    return RESULTS / f"{Path(script).stem}.json"


def _relative(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it (symlinks not followed)."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(ROOT)) if absolute.is_relative_to(ROOT) else path


def command_line() -> str:
    """The command this process was started with, run from the repository root (the interpreter
    and the script relative to it, an interpreter outside it by name)."""
    executable = sys.executable if Path(os.path.abspath(sys.executable)).is_relative_to(ROOT) else "python"
    return shlex.join([_relative(executable), _relative(sys.argv[0]), *sys.argv[1:]])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What the figures were measured on."""
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    gpu = None
    if "torch" in sys.modules:  # only asked when the benchmark itself uses torch
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    return {"cpu": cpu_model(), "cores": cores, "usable_cores": usable, "ram_gib": ram_gib(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(), "torch": _version("torch"),
            "ray": _version("ray"), "load_average_1m": load_average()}


def target(measure: str, value: float, goal: str) -> dict:
    """A figure against its target, e.g. ``target("ratio", 1.76, ">= 1.6")``; ``met`` is worked out here."""
    op, bound = goal.split()
    bound = float(bound)
    met = {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    return {"measure": measure, "value": value, "target": goal, "met": bool(met)}


def table(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": list(columns), "rows": [list(r) for r in rows]}


def write_section(path: str | Path, script: str, sections: dict, section_id: str, *, tables: list[dict],
                  targets: list[dict] = (), notes: list[str] = ()) -> Path:
    """Add (or replace) one section of ``script``'s result file; the others already there are kept."""
    path = Path(path)
    benchmark = Path(script).stem
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = [s for s in old.get("sections", []) if s.get("id") != section_id and s.get("id") in sections]
    entry = {"id": section_id, **{k: sections[section_id][k] for k in ("title", "measures")},
             "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), "command": command_line(),
             "machine": machine(), "tables": list(tables), "targets": list(targets), "notes": list(notes)}
    order = list(sections)
    merged = sorted([*kept, entry], key=lambda s: order.index(s["id"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": benchmark, "sections": merged}, indent=2, ensure_ascii=False) + "\n")
    print(f"figures written to {_relative(str(path))} (section {section_id})")
    return path
