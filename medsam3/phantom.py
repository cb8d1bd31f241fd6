"""A synthetic CT phantom dataset in the Medical Segmentation Decathlon layout.

A few small abdomen/thorax volumes in Hounsfield units with organ-like ellipsoids (liver, spleen,
kidneys, lungs, vertebral column), stored in LPS orientation so that readers must reorient them.
Used by ``make demo`` and the benchmarks; real data for tests lives in ``../shared/data``.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

# label value → (name, HU, centre (x right, y anterior, z superior), radii), in units of the half-extent.
# Soft-tissue organs have contrast-enhanced (portal venous phase) values, so that they stand out from
# the 40 HU soft tissue around them as in a contrast CT (unenhanced values, 30–60 HU under 15 HU
# noise, leave them next to invisible in the soft-tissue window).
ORGANS = {
    1: ("liver", 110, (0.35, 0.05, -0.15), (0.35, 0.40, 0.30)),
    2: ("spleen", 125, (-0.45, -0.20, -0.10), (0.15, 0.20, 0.20)),
    3: ("kidney_left", 170, (-0.35, -0.35, -0.45), (0.12, 0.12, 0.20)),
    4: ("kidney_right", 170, (0.35, -0.35, -0.45), (0.12, 0.12, 0.20)),
    5: ("lung_left", -850, (-0.40, 0.05, 0.55), (0.28, 0.40, 0.45)),
    6: ("lung_right", -850, (0.40, 0.05, 0.55), (0.28, 0.40, 0.45)),
}
VERTEBRA = (7, "vertebra", 700)


def make_case(shape=(128, 128, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom as (HU int16, labels uint8), both indexed (x, y, z) in RAS order."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    hu = np.full(shape, -1000.0, np.float32)
    labels = np.zeros(shape, np.uint8)
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    hu[body] = -80.0
    hu[(x / 0.78) ** 2 + (y / 0.58) ** 2 <= 1] = 40.0
    for value, (_, organ_hu, centre, radii) in ORGANS.items():
        c = np.asarray(centre) + rng.uniform(-0.05, 0.05, 3)
        r = np.asarray(radii) * rng.uniform(0.85, 1.15, 3)
        inside = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
        inside &= body
        hu[inside] = organ_hu
        labels[inside] = value
    value, _, bone_hu = VERTEBRA
    spine = (x / 0.1) ** 2 + ((y + 0.5) / 0.1) ** 2 <= 1
    hu[spine] = bone_hu
    labels[spine] = value
    hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), labels


def write_phantom_dataset(out_dir: str | Path, num_cases: int = 3, shape=(128, 128, 64),
                          spacing=(3.0, 3.0, 5.0), seed: int = 0) -> Path:
    """Write ``num_cases`` phantoms as an MSD dataset (imagesTr/, labelsTr/, dataset.json)."""
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    # Stored LPS: x and y flipped relative to RAS, as DICOM-derived NIfTI files often are.
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * (shape[0] - 1) / 2, spacing[1] * (shape[1] - 1) / 2, 0.0]
    training = []
    for i in range(num_cases):
        hu, labels = make_case(shape, seed + i)
        case = f"phantom_{i:03d}"
        nib.save(nib.Nifti1Image(hu[::-1, ::-1].copy(), affine), out / "imagesTr" / f"{case}.nii.gz")
        nib.save(nib.Nifti1Image(labels[::-1, ::-1].copy(), affine), out / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    names = {"0": "background", **{str(v): n for v, (n, *_) in ORGANS.items()}, str(VERTEBRA[0]): VERTEBRA[1]}
    spec = {"name": "phantom", "description": "medsam3 synthetic CT phantom", "modality": {"0": "CT"},
            "labels": names, "numTraining": num_cases, "training": training}
    (out / "dataset.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out
