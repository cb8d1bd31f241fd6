"""Write segmentation results in the input's own terms: a NIfTI label map with the input's affine,
a DICOM-SEG (highdicom) referencing the source series, PNG masks, and overlay pictures."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.sr.codedict import codes

from medsam3.transforms import display_slice, to_rgb

# Distinct colours for up to ten prompts (tab10), then they repeat.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def label_map(masks: Sequence[np.ndarray], values: Sequence[int] | None = None) -> np.ndarray:
    """Masks → one label map, value ``values[i]`` (default i+1) for mask i (where masks overlap,
    the later one wins)."""
    values = list(values) if values is not None else list(range(1, len(masks) + 1))
    labels = np.zeros(masks[0].shape, np.uint8 if max(values, default=0) < 256 else np.uint16)
    for value, mask in zip(values, masks, strict=True):
        labels[mask] = value
    return labels


def source_label_image(masks: Sequence[np.ndarray], canonical_affine: np.ndarray,
                       source_affine: np.ndarray | None = None, values: Sequence[int] | None = None,
                       dtype: np.dtype | None = None) -> nib.Nifti1Image:
    """A label map of canonical (RAS+) masks; with ``source_affine`` reoriented back to the input
    file's own axes, so that its affine and voxel order are the input's."""
    labels = label_map(masks, values)
    image = nib.Nifti1Image(labels if dtype is None else labels.astype(dtype), canonical_affine)
    if source_affine is not None:
        orientation = nib.orientations
        current, wanted = orientation.io_orientation(canonical_affine), orientation.io_orientation(source_affine)
        image = image.as_reoriented(orientation.ornt_transform(current, wanted))
    return image


def write_label_image(image: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """A label image as NIfTI (.nii, .nii.gz) or NRRD (.nrrd), by the path's suffix."""
    if str(path).endswith(".nrrd"):
        from medsam3.io.nrrd_file import write_nrrd

        return write_nrrd(image, path)
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    nib.save(image, os.fspath(path))
    return Path(path)


def write_nifti_labels(masks: Sequence[np.ndarray], canonical_affine: np.ndarray, path: str | os.PathLike,
                       source_affine: np.ndarray | None = None) -> Path:
    """A NIfTI label map (value i+1 for mask i) in the input file's geometry (see source_label_image)."""
    return write_label_image(source_label_image(masks, canonical_affine, source_affine), path)


def write_dicom_seg(masks: Sequence[np.ndarray], prompts: Sequence[str], canonical_affine: np.ndarray,
                    dicom_files: Sequence[str | os.PathLike], path: str | os.PathLike,
                    software_version: str = "0") -> Path:
    """A binary DICOM-SEG, one segment per prompt, on the frames of the source series it references."""
    sources = [pydicom.dcmread(f) for f in dicom_files]
    volume = hd.get_volume_from_series(sources)
    channels = []
    for mask in masks:  # canonical RAS arrays → the series' own frame order (highdicom matches geometry)
        on_grid = hd.Volume.from_nibabel(nib.Nifti1Image(mask.astype(np.uint8), canonical_affine))
        channels.append(on_grid.match_geometry(volume).array > 0)
    numbers = list(range(1, len(masks) + 1))
    seg_volume = volume.with_array(np.stack(channels, axis=-1).astype(np.uint8), channels={"SegmentNumber": numbers})
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=prompt[:64],
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,  # free-text prompts: the label carries the meaning
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="MedSAM3", version=software_version, family=codes.DCM.ArtificialIntelligence),
        )
        for number, prompt in enumerate(prompts, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=seg_volume,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medsam3",
        manufacturer_model_name="MedSAM3",
        software_versions=software_version,
        device_serial_number="0",
        omit_empty_frames=False,
    )
    seg.save_as(os.fspath(path))
    return Path(path)


def write_png_mask(mask: np.ndarray, path: str | os.PathLike) -> Path:
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    return Path(path)


def overlay(image_rgb: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.45) -> np.ndarray:
    """An RGB picture with each mask blended in its colour and its outline drawn solid."""
    from scipy import ndimage

    out = image_rgb.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        colour = np.array(COLOURS[i % len(COLOURS)], np.float32)
        out[mask] = (1 - alpha) * out[mask] + alpha * colour
        out[mask & ~ndimage.binary_erosion(mask)] = colour
    return out.clip(0, 255).astype(np.uint8)


def save_overlay_figure(panels: Sequence[tuple[str, np.ndarray]], prompts: Sequence[str], path: str | os.PathLike,
                        scores: Sequence[float] | None = None) -> Path:
    """One or more overlay panels side by side with a legend of prompt colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
    for ax, (title, picture) in zip(axes[0], panels, strict=True):
        ax.imshow(picture)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    labels = list(prompts) if scores is None else [f"{p} ({s:.2f})" for p, s in zip(prompts, scores, strict=True)]
    handles = [Patch(color=np.array(COLOURS[i % len(COLOURS)]) / 255, label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def volume_panels(display_image, masks: Sequence[np.ndarray], axis: int,
                  count: int = 4) -> list[tuple[str, np.ndarray]]:
    """Overlays of up to ``count`` slices spread over where the masks are (display orientation).

    ``display_image(k)`` returns slice k as display-ordered uint8 (what the model saw)."""
    union = np.zeros(masks[0].shape[axis], bool)
    for mask in masks:
        union |= mask.any(axis=tuple(i for i in range(3) if i != axis))
    where = np.flatnonzero(union)
    if where.size == 0:
        where = np.arange(masks[0].shape[axis])
    picks = sorted({int(where[round(i)]) for i in np.linspace(0, where.size - 1, min(count, where.size))})
    return [(f"slice {k}", overlay(to_rgb(display_image(k)), [display_slice(m, axis, k) for m in masks]))
            for k in picks]
