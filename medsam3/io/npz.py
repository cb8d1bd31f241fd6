"""NPZ volumes: the MedSAM/MedSAM2 layout and the Medical SAM3 layout.

- MedSAM/MedSAM2: ``imgs`` (D, H, W) or 2D (H, W[, 3]), ``gts`` (same spatial shape, integer
  labels), optional ``spacing`` (x, y, z mm). Label names come from the prepare config.
- Medical SAM3: the same plus ``text_prompts`` mapping label value → prompt (a dict stored as a
  pickled object, or a JSON string).

Slices are used as stored: MedSAM-style files keep ``imgs[k]`` in viewing order, and their
``direction``/``origin`` describe physical placement, not a reordering to apply.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from medsam3.io.case import CaseError


def load_npz(path: str | os.PathLike, allow_pickle: bool = False, require_masks: bool = True) -> dict[str, Any]:
    """Read the arrays of an NPZ file; ``text_prompts`` is decoded to ``{int: str}``.

    ``require_masks=False`` accepts a file with ``imgs`` only (a scan to predict on)."""
    name = os.fspath(path)
    try:
        with np.load(name, allow_pickle=False) as f:
            keys = set(f.files)
            missing = ({"imgs", "gts"} if require_masks else {"imgs"}) - keys
            if missing:
                raise CaseError(f"{name}: NPZ lacks {sorted(missing)} (has {sorted(keys)})")
            out: dict[str, Any] = {k: f[k] for k in ("imgs", "gts", "spacing") if k in keys}
            prompts_raw = None
            if "text_prompts" in keys:
                try:
                    prompts_raw = f["text_prompts"]
                except ValueError:
                    prompts_raw = _load_pickled_prompts(name, allow_pickle)
    except CaseError:
        raise
    except Exception as exc:
        raise CaseError(f"{name}: cannot read NPZ ({type(exc).__name__}: {exc})") from exc
    if prompts_raw is not None:
        out["text_prompts"] = _decode_prompts(name, prompts_raw)
    return out


def _load_pickled_prompts(name: str, allow_pickle: bool) -> Any:
    if not allow_pickle:
        raise CaseError(
            f"{name}: text_prompts is a pickled object; set allow_pickle=true only if you trust this file"
        )
    with np.load(name, allow_pickle=True) as f:
        return f["text_prompts"]


def _decode_prompts(name: str, raw: Any) -> dict[int, str]:
    value = raw.item() if isinstance(raw, np.ndarray) and raw.shape == () else raw
    if isinstance(value, (str, np.str_, bytes)):
        value = json.loads(value)
    if isinstance(value, np.ndarray):  # array of strings: index = label value
        value = {i: v for i, v in enumerate(value.tolist()) if str(v)}
    if not isinstance(value, dict):
        raise CaseError(f"{name}: text_prompts must map label values to prompts, got {type(value).__name__}")
    try:
        return {int(k): str(v) for k, v in value.items() if str(v) and int(k) != 0}
    except (TypeError, ValueError) as exc:
        raise CaseError(f"{name}: text_prompts keys must be label values ({exc})") from exc


def npz_affine(spacing: np.ndarray | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAS affine and (x, y, z) zooms for an ``imgs`` array indexed (z, y, x) in LPS."""
    sx, sy, sz = (float(s) for s in (spacing if spacing is not None else (1.0, 1.0, 1.0))[:3])
    if min(sx, sy, sz) <= 0:
        raise CaseError(f"spacing must be positive, got {(sx, sy, sz)}")
    # The array transposed to (x, y, z) is LPS; flip x and y into RAS+ in the array itself.
    return np.diag([sx, sy, sz, 1.0]), (sx, sy, sz)


def to_canonical(imgs: np.ndarray) -> np.ndarray:
    """(z, y, x) LPS-ordered array → RAS+ canonical (x, y, z), as views (no copy)."""
    return imgs.transpose(2, 1, 0)[::-1, ::-1, :]


def npz_geometry(data: dict[str, Any], two_d: bool, where: str):
    """``(spacing, affine)`` of an NPZ's ``imgs``: 2D → ((row, col, 1), None); 3D (D, H, W) →
    the canonical zooms and RAS affine. Errors name ``where``."""
    imgs = data["imgs"]
    if two_d:
        return tuple(float(s) for s in data.get("spacing", (1.0, 1.0))[:2]) + (1.0,), None
    if imgs.ndim != 3:
        raise CaseError(f"{where}: imgs must be (D, H, W) or a 2D image, got shape {imgs.shape}")
    try:
        affine, zooms = npz_affine(data.get("spacing"))
    except CaseError as exc:
        raise CaseError(f"{where}: {exc}") from exc
    return zooms, affine
