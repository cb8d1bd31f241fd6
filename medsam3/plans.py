"""Preprocessing plans: how a scan's plane becomes the pixels a model sees, saved with the model.

nnU-Net's contract: ``prepare`` writes its :class:`Plans` into the shards' manifest, ``train``
copies them into the run, ``export`` saves them beside the weights (``plans.json``), and
inference loads them from the checkpoint, so a model is never fed pixels made differently from
the ones it was trained on. ``samples.case_rows`` (shards) and ``inference.Preprocessor``
(predict, evaluate, serve) both turn planes into pixels through :meth:`Plans.square`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from medsam3.config import CONFIG_DIR
from medsam3.transforms import resize_pad
from medsam3.vocab import Vocabulary, normalize

PLANS_FILE = "plans.json"
EXPORT_FILE = "medsam3_export.json"  # what an export records of its run (pipelines/export.py)


class PlansMismatch(ValueError):
    """Two things that must share preprocessing settings do not."""


@dataclass(frozen=True)
class Plans:
    image_size: int                          # side of the stored square
    slice_axis: int                          # axis of the RAS volume that 3D scans are cut along
    windows: dict[str, tuple[float, float]]  # CT window name → (width, level) in HU
    window: str | None                       # one window forced for every label
    window_overrides: dict[str, str]         # label name (or prompt) → window name
    percentiles: tuple[float, float]         # non-CT intensity range, per volume
    vocabulary: dict[str, Any] = field(repr=False)  # {"spec": prompts.yaml content, "extra_labels": ...}

    @classmethod
    def from_prepare_config(cls, cfg: Any) -> Plans:
        """The plans of a ``prepare`` config (``configs/prepare.yaml`` with overrides)."""
        from medsam3.io import storage

        path = storage.local_copy(cfg.vocabulary) if cfg.get("vocabulary") else CONFIG_DIR / "prompts.yaml"
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        extra = cfg.get("extra_labels") or {}
        extra = OmegaConf.to_container(extra, resolve=True) if OmegaConf.is_config(extra) else dict(extra)
        return cls(
            image_size=int(cfg.image_size), slice_axis=int(cfg.slice_axis),
            windows={str(k): (float(v[0]), float(v[1])) for k, v in cfg.windows.items()},
            window=str(cfg.window) if cfg.get("window") else None,
            window_overrides={normalize(k): str(v) for k, v in (cfg.get("window_overrides") or {}).items()},
            percentiles=(float(cfg.percentiles[0]), float(cfg.percentiles[1])),
            vocabulary={"spec": spec, "extra_labels": extra},
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plans:
        return cls(
            image_size=int(data["image_size"]), slice_axis=int(data["slice_axis"]),
            windows={k: (float(v[0]), float(v[1])) for k, v in data["windows"].items()},
            window=data.get("window"), window_overrides=dict(data.get("window_overrides") or {}),
            percentiles=(float(data["percentiles"][0]), float(data["percentiles"][1])),
            vocabulary=data["vocabulary"],
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["windows"] = {k: list(v) for k, v in self.windows.items()}
        data["percentiles"] = list(self.percentiles)
        data["vocabulary_digest"] = self.vocabulary_digest
        return data

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / PLANS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Plans | None:
        """The plans saved in a folder (an exported model or a run), or None when it has none."""
        path = Path(folder) / PLANS_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise PlansMismatch(f"{path}: not a medsam3 plans file ({exc})") from exc

    @cached_property
    def vocabulary_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.vocabulary, sort_keys=True).encode()).hexdigest()[:16]

    @cached_property
    def vocab(self) -> Vocabulary:
        return Vocabulary(self.vocabulary["spec"], self.vocabulary["extra_labels"])

    # --- the one place a plane becomes pixels -------------------------------------------------

    def window_for(self, name: str, modality: str | None, default: str | None = None) -> str:
        """The CT window of a label name (prepare) or a prompt (inference): the forced window,
        then a per-label override, then ``default`` or the vocabulary's window for it."""
        if self.window:
            return self.window
        if normalize(name) in self.window_overrides:
            return self.window_overrides[normalize(name)]
        if default:
            return default
        entry = self.vocab.lookup(name, modality)
        return entry.window if entry else self.vocab.default_window

    def square(self, plane: np.ndarray, intensity, window: str, channels: int | None = 3) -> np.ndarray:
        """A display-ordered plane → the stored square (uint8, ``image_size``², RGB or one band)."""
        return resize_pad(intensity(plane, window), self.image_size, channels=channels)

    # --- comparisons -------------------------------------------------------------------------

    def differences(self, other: Plans) -> dict[str, str]:
        """setting → ``"mine vs theirs"`` for every setting that differs (the vocabulary by digest)."""
        out = {}
        for key in ("image_size", "slice_axis", "windows", "window", "window_overrides", "percentiles",
                    "vocabulary_digest"):
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                out[key] = f"{_show(mine)} vs {_show(theirs)}"
        return out

    def require_same(self, other: Plans, mine: str, theirs: str, error: type[Exception] = PlansMismatch) -> None:
        """Raise ``error`` (a stage's own error type) naming each differing setting and both values."""
        found = self.differences(other)
        if found:
            raise error(f"{mine} and {theirs} were preprocessed differently ({_listed(found)}); "
                        "prepare them with the same settings")


def _listed(found: dict[str, str]) -> str:
    return "; ".join(f"{key}: {values}" for key, values in found.items())


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}, sort_keys=True)
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def checkpoint_plans(checkpoint: str | os.PathLike, prepare_cfg: Any) -> Plans:
    """The plans to preprocess for a checkpoint: the ones saved with it, or for a checkpoint
    without any (released weights) those of ``prepare_cfg``. A ``prepare.*`` setting asked for
    explicitly (differing from ``configs/prepare.yaml``) that contradicts the saved plans is an
    error naming both values, never silently applied or ignored."""
    from medsam3.config import load_config
    from medsam3.io import storage

    asked = Plans.from_prepare_config(prepare_cfg)
    saved = Plans.load(storage.local_copy(checkpoint))
    if saved is None:
        return asked
    defaults = Plans.from_prepare_config(load_config("prepare"))
    contradicted = asked.differences(saved)
    clash = {key: values for key, values in contradicted.items() if key in asked.differences(defaults)}
    if clash:
        raise PlansMismatch(f"{checkpoint} was trained on pixels made with other settings than those asked for "
                            f"({_listed(clash)}: asked vs saved); drop the prepare.* overrides, "
                            "the checkpoint's plans.json applies")
    return saved
