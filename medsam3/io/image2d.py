"""2D images (PNG/JPEG/TIFF/BMP) and binary masks in the SAM-Med2D layout.

``images/<name>.<ext>`` with ``masks/<name>_<target>_<NNN>.png``, one binary mask per instance
of a target; ``image2label_train.json`` (image → masks) and ``label2image_test.json`` (mask →
image) list the pairs when present, otherwise masks are matched to images by file name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medsam3.io.case import CaseError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CONVERTED_TO_RGB = ("RGBA", "P", "CMYK", "YCbCr", "LA", "PA")  # Pillow modes read as an RGB copy
_INSTANCE = re.compile(r"^(?P<target>.+?)_(?P<instance>\d+)$")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image as (H, W) for grayscale (any bit depth) or (H, W, 3) uint8 for colour."""
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            img.load()
            if img.mode in CONVERTED_TO_RGB:
                img = img.convert("RGB")
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise CaseError(f"{name}: cannot read image ({exc})") from exc
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise CaseError(f"{name}: unsupported image shape {array.shape}")
    return array


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask file as bool; values other than 0 and one foreground value are an error."""
    name = os.fspath(path)
    array = read_image(path)
    if array.ndim == 3:
        if not (np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 0], array[..., 2])):
            raise CaseError(f"{name}: mask is a colour image; expected a binary mask")
        array = array[..., 0]
    values = np.unique(array)
    if values.size > 2 or (values.size == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise CaseError(f"{name}: mask is not binary (values {shown})")
    return array > 0


def target_of(mask_stem: str, image_stem: str) -> str:
    """Target name from a mask file stem: ``<image>_<target>_<NNN>`` → ``<target>``."""
    rest = mask_stem[len(image_stem) + 1:] if mask_stem.startswith(image_stem + "_") else mask_stem
    match = _INSTANCE.match(rest)
    return match.group("target") if match else rest


def pair_masks(root: str | os.PathLike) -> dict[str, list[str]]:
    """Image → mask files (relative to ``root``), from the JSON indexes and the file names."""
    root = Path(root)
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    masks = sorted(p for p in (root / "masks").iterdir() if p.is_file()) if (root / "masks").is_dir() else []
    by_name = {p.name: p for p in images}
    pairs: dict[str, set[str]] = {f"images/{p.name}": set() for p in images}

    def add(image: str, mask: str) -> None:
        image_path, mask_path = by_name.get(Path(image).name), root / "masks" / Path(mask).name
        if image_path is not None and mask_path.is_file():
            pairs[f"images/{image_path.name}"].add(f"masks/{mask_path.name}")

    for index_name, image_first in (("image2label_train.json", True), ("label2image_test.json", False)):
        index = root / index_name
        if index.is_file():
            for key, value in json.loads(index.read_text()).items():
                for other in value if isinstance(value, list) else [value]:
                    add(key, other) if image_first else add(other, key)
    # Masks not listed in any index: match by the longest image stem that prefixes them.
    listed = {m for ms in pairs.values() for m in ms}
    stems = sorted(by_name.values(), key=lambda p: -len(p.stem))
    for mask in masks:
        if f"masks/{mask.name}" in listed:
            continue
        for image in stems:
            if mask.stem.startswith(image.stem + "_"):
                pairs[f"images/{image.name}"].add(f"masks/{mask.name}")
                break
    return {k: sorted(v) for k, v in pairs.items()}
