"""The reader contract: a :class:`CaseRef` names a case's files, a :class:`Case` holds its arrays.

Readers return plain numpy arrays plus metadata and know nothing of Ray, so ``prepare``,
``predict`` and ``serve`` read a scan the same way.

Conventions
- 3D images are in nibabel's closest canonical orientation (RAS+), array axes (x, y, z).
  :func:`medsam3.transforms.display_slice` turns a slice into the radiological view that 2D
  images (PNG, DICOM frames) already use: patient's right on the left, anterior/superior up.
- 2D images are (H, W) or (H, W, 3) in display order already.
- Labels are one or more integer label maps on the image grid ("layers"); several layers only
  when labels overlap (DICOM-SEG segments, SAM-Med2D masks). Values are unique across layers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class CaseError(Exception):
    """A case cannot be prepared; the message names the file and the problem."""


@dataclass(frozen=True)
class CaseRef:
    """A case to read: small and picklable, found by discovery and shipped to a read task.

    ``root`` is where the dataset lives (never written to any output); ``files`` are relative
    to it. ``info`` carries layout-specific details (label names, channel, series UIDs...).
    """

    dataset: str
    layout: str
    case_id: str
    root: str
    files: tuple[str, ...]
    modality: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CaseRef:
        return cls(**{**d, "files": tuple(d["files"])})

    def describe(self) -> str:
        """How error messages name the case: dataset and its first file (relative path)."""
        return f"{self.dataset}/{self.files[0]}" if self.files else f"{self.dataset}/{self.case_id}"


@dataclass
class Case:
    """A decoded case: image, label layers and the geometry needed to slice and map back."""

    case_id: str
    dataset: str
    modality: str
    image: np.ndarray
    layers: list[np.ndarray]
    label_names: dict[int, str]
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None
    # Stored value → physical value (e.g. NIfTI scl_slope/inter), applied per slice to save memory.
    intensity_scale: tuple[float, float] = (1.0, 0.0)
    # Explicit prompts per label value (Medical SAM3 NPZ `text_prompts`), bypassing the vocabulary.
    prompts: dict[int, str] = field(default_factory=dict)
    sources: list[dict[str, str]] = field(default_factory=list)

    @property
    def is_3d(self) -> bool:
        return self.affine is not None

    @property
    def source_sha256(self) -> str:
        """One digest for all of the case's input files (sha256 over their sorted digests)."""
        return combined_sha256(s["sha256"] for s in self.sources)


def sha256_file(path: str, fs: Any = None, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed (local path, or any fsspec filesystem)."""
    digest = hashlib.sha256()
    opener = fs.open if fs is not None else open
    with opener(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def combined_sha256(digests: Iterable[str]) -> str:
    return hashlib.sha256("".join(sorted(digests)).encode()).hexdigest()
