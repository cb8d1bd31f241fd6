"""Prompt vocabulary: map dataset label names (and the modality) to SAM3 text prompts and CT windows.

The vocabulary lives in ``configs/prompts.yaml``; see its header for the matching rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from medsam3.config import CONFIG_DIR

SIDES = ("left", "right")


class UnknownLabelError(ValueError):
    """Label names that the vocabulary cannot map to a prompt."""

    def __init__(self, names: Iterable[str], where: str = ""):
        self.names = sorted(set(names))
        place = f" in {where}" if where else ""
        super().__init__(
            f"unknown label name(s){place}: {', '.join(repr(n) for n in self.names)}. "
            "Add them to the prompt vocabulary with extra_labels, e.g. "
            f"extra_labels.{_dotkey(self.names[0])}.prompt=\"...\""
        )


@dataclass(frozen=True)
class PromptEntry:
    """What a label name resolves to."""

    prompt: str
    window: str


def normalize(name: str) -> str:
    """Canonical spelling of a label name: lower case, ``_``/``-`` as spaces, single spaces."""
    return " ".join(re.sub(r"[_\-]+", " ", str(name)).lower().split())


class Vocabulary:
    """Resolves label names to prompts; built from the YAML vocabulary plus user additions."""

    def __init__(self, spec: Mapping[str, Any], extra_labels: Mapping[str, Any] | None = None):
        self.default_window = str(spec.get("default_window", "soft_tissue"))
        self._entries: dict[str, PromptEntry] = {}
        self._aliases: dict[str, str] = {}
        for name, body in (spec.get("labels") or {}).items():
            self._add(name, body or {})
        self._by_modality = {
            str(mod).upper(): {normalize(k): str(v) for k, v in (table or {}).items()}
            for mod, table in (spec.get("by_modality") or {}).items()
        }
        self._patterns = [
            (re.compile(p["match"]), str(p["prompt"]), str(p.get("window", self.default_window)))
            for p in spec.get("patterns") or []
        ]
        # User additions win over the shipped vocabulary, synonyms included.
        for name, body in (extra_labels or {}).items():
            self._add(name, body or {})

    @classmethod
    def from_file(cls, path: str | Path | None = None, extra_labels: Mapping[str, Any] | None = None):
        """Load a vocabulary file (default ``configs/prompts.yaml``)."""
        if path:
            from medsam3.io import storage

            path = storage.local_copy(path)  # may be an s3:// URI
        else:
            path = CONFIG_DIR / "prompts.yaml"
        spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        extra = extra_labels
        if OmegaConf.is_config(extra):
            extra = OmegaConf.to_container(extra, resolve=True)
        return cls(spec, extra)

    def _add(self, name: str, body: Mapping[str, Any]) -> None:
        key = normalize(name)
        window = str(body.get("window") or self.default_window)
        self._entries[key] = PromptEntry(prompt=str(body.get("prompt") or key), window=window)
        self._aliases[key] = key
        for synonym in body.get("synonyms") or []:
            self._aliases[normalize(synonym)] = key

    def lookup(self, name: str, modality: str | None = None) -> PromptEntry | None:
        """The prompt entry for a label name, or None when the vocabulary does not know it."""
        key = normalize(name)
        if key in self._aliases:
            canonical = self._aliases[key]
            entry = self._entries[canonical]
            specific = self._by_modality.get(str(modality or "").upper(), {}).get(canonical)
            if specific is not None:
                base = self._entries.get(self._aliases.get(normalize(specific), ""), entry)
                return PromptEntry(prompt=specific, window=base.window)
            return entry
        for pattern, template, window in self._patterns:
            match = pattern.match(key)
            if match:
                return PromptEntry(prompt=template.format(None, *match.groups()), window=window)
        words = key.split()
        if len(words) > 1:
            for side, rest in ((words[0], words[1:]), (words[-1], words[:-1])):
                if side in SIDES:
                    base = self.lookup(" ".join(rest), modality)
                    if base is not None:
                        return PromptEntry(prompt=f"{side} {base.prompt}", window=base.window)
        return None

    def resolve(self, name: str, modality: str | None = None) -> PromptEntry:
        """Like :meth:`lookup` but raises :class:`UnknownLabelError` for an unknown name."""
        entry = self.lookup(name, modality)
        if entry is None:
            raise UnknownLabelError([name])
        return entry

    def check(self, names: Iterable[str], modality: str | None = None, where: str = "") -> None:
        """Raise one error listing every unknown name."""
        unknown = [n for n in names if self.lookup(n, modality) is None]
        if unknown:
            raise UnknownLabelError(unknown, where)

    def names(self) -> list[str]:
        """Canonical label names of the vocabulary."""
        return sorted(self._entries)


def _dotkey(name: str) -> str:
    key = normalize(name).replace(" ", "_")
    return key if re.fullmatch(r"[a-z_][a-z0-9_]*", key) else f'"{key}"'
