"""A prompt's answer on a scan, and mask logits mapped back to a plane's own pixels: what
slice-by-slice inference (:mod:`medsam3.inference`) and propagation (:mod:`medsam3.propagate`)
both produce."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def masks_to_grid(logits: torch.Tensor, out_hw: tuple[int, int], content: tuple[float, float]) -> torch.Tensor:
    """Mask logits over the model's square → the content's own pixels.

    ``content`` is the fraction of the square's height and width the image fills (the rest is
    bottom/right padding); the logits are scaled so that this part becomes ``out_hw``, then cropped.
    """
    height, width = out_hw
    full = (max(height, round(height / content[0])), max(width, round(width / content[1])))
    return F.interpolate(logits, size=full, mode="bilinear", align_corners=False)[..., :height, :width]


@dataclass
class PromptResult:
    """One prompt's answer for a scan."""

    prompt: str
    mask: np.ndarray  # bool, the scan's spatial shape (3D: canonical RAS axes)
    slice_scores: np.ndarray  # best kept score per slice (0 where no query passed)
    in_vocabulary: bool
    box: list[float] | None = None
    instances: list[np.ndarray] = field(default_factory=list)  # 2D only: one mask per kept query
    slice_axis: int | None = None  # 3D: the mask's axis that slice_scores runs along

    @property
    def score(self) -> float:
        return float(self.slice_scores.max(initial=0.0))

    @property
    def slices_with_mask(self) -> int:
        """Slices holding at least one mask voxel; a kept query can score on a slice and still
        leave no voxel there once its mask is mapped back to the plane."""
        if self.mask.ndim == 2:
            return int(self.mask.any())
        if self.slice_axis is None:
            raise ValueError(f"{self.prompt!r}: a volume's result needs its slice_axis")
        planes = tuple(axis for axis in range(self.mask.ndim) if axis != self.slice_axis)
        return int(np.count_nonzero(self.mask.any(axis=planes)))
