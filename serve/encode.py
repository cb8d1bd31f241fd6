"""Request parsing and JSON encodings of the endpoint: boxes, COCO RLE per display plane, previews.

(Kept out of ``serve/app.py``: Serve pickles the deployment classes while that module is being
imported, so the helpers they call must already exist in an importable module.)
"""

from __future__ import annotations

import base64
import io

import numpy as np


def planes_shape(scan, axis: int) -> list[int]:
    """[slices, rows, columns] of the display planes (2D: [1, rows, columns])."""
    from medsam3.transforms import display_slice

    if not scan.is_3d:
        return [1, *scan.case.image.shape[:2]]
    return [scan.case.image.shape[axis], *display_slice(scan.case.image, axis, 0).shape[:2]]


def rle_planes(mask: np.ndarray, is_3d: bool, axis: int) -> list[dict]:
    """COCO RLE (pycocotools: column-major, compressed counts) of each display plane."""
    from pycocotools import mask as coco

    from medsam3.transforms import display_slice

    planes = [display_slice(mask, axis, k) for k in range(mask.shape[axis])] if is_3d else [mask]
    encoded = []
    for plane in planes:
        rle = coco.encode(np.asfortranarray(plane.astype(np.uint8)))
        encoded.append({"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return encoded


def preview_planes(scan, prep, prompt: str) -> list[str]:
    """The display planes as base64 PNG (windowed for the first prompt), for the web page."""
    from PIL import Image

    intensity = prep.intensity(scan.case)
    window = prep.window(prompt, scan.case.modality)
    out = []
    for k in range(prep.num_slices(scan.case)):
        buffer = io.BytesIO()
        Image.fromarray(intensity(prep.plane(scan.case, k), window)).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


