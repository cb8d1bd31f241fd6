"""Build real NIfTI / DICOM / DICOM-SEG test inputs from the real volumes in ../shared/data.

The MedSAM2 NPZ volumes are already CT-windowed uint8 (soft tissue, W400/L40). Mapping them back
to Hounsfield units with the inverse window means that `prepare` on the NIfTI or DICOM copy must
give the same pixels as on the NPZ (up to rounding): a strong check of orientation and windowing.
"""

from __future__ import annotations

import datetime
import gzip
import io
import json
import os
import signal
import struct
import threading
import time
import zipfile
import zlib
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

# ../shared/data beside the checkout (CI clones main elsewhere, with shared/ beside it too)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
RECIST = SHARED / "medsam2-recist-ct"
SAMMED2D = SHARED / "sam-med2d-demo"

# Limits of the test endpoint (tests/test_serve.py); the session's Ray starts Serve's HTTP proxy
# with the same body limit (conftest), as `medsam3 serve` does.
SERVE_LIMITS = {"max_upload_mb": 4, "max_voxels": 512 * 512 * 10, "proxy_buffer_mb": 64}

# A patient identity that must never reach the shards or the manifest.
PHI = {
    "PatientName": "Doe^Jane^Q",
    "PatientID": "PID-4711-SECRET",
    "PatientBirthDate": "19700101",
    "AccessionNumber": "ACC-99887766",
    "InstitutionName": "St Example Secret Hospital",
    "ReferringPhysicianName": "House^Gregory",
}


def load_recist(name: str | None = None) -> dict[str, np.ndarray]:
    """One real MedSAM2 CT lesion NPZ as a dict (the first file by name by default)."""
    files = sorted(RECIST.glob("*.npz"))
    path = files[0] if name is None else RECIST / name
    with np.load(path) as f:
        return {k: f[k] for k in f.files} | {"name": path.stem}


def uint8_to_hu(imgs: np.ndarray, width: float = 400.0, level: float = 40.0) -> np.ndarray:
    """Inverse of the soft-tissue window: 0..255 → HU (int16)."""
    low = level - width / 2
    return np.rint(imgs.astype(np.float32) * (width / 255.0) + low).astype(np.int16)


def lps_affine(spacing, direction=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """ITK-style geometry (LPS) → NIfTI affine (RAS) for an array indexed (x, y, z)."""
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.asarray(spacing, float)[None, :]
    aff[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff


def write_msd_dataset(root: Path, cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                      labels: dict[int, str], modality: str = "CT", name: str = "TestMSD") -> Path:
    """Write an MSD layout: cases maps id → (image xyz, label xyz, affine)."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for case_id, (image, label, affine) in cases.items():
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{case_id}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    spec = {
        "name": name,
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": len(training),
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return root


def write_ct_series(out_dir: Path, hu: np.ndarray, spacing, shuffle_seed: int | None = 0,
                    intercept: float = -1024.0, nested: bool = True) -> list[pydicom.Dataset]:
    """Write a CT series from an array indexed (z, row, col) with HU values.

    Slices are stored as unsigned values with RescaleIntercept (so HU needs the rescale), named in
    a shuffled order and spread over nested folders (so readers must sort by position).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    sx, sy, sz = (float(s) for s in spacing)
    order = np.arange(hu.shape[0])
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    datasets = []
    for rank, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.PatientSex = "F"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20200102"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101010"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 3, int(k) + 1
        ds.Manufacturer = "TestVendor"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k) * sz]
        ds.SliceThickness = sz
        ds.PixelSpacing = [sy, sx]
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.PixelData = (hu[k].astype(np.int32) - int(intercept)).astype(np.uint16).tobytes()
        sub = out_dir / (f"d{rank % 3}" if nested else "") / f"img_{rank:04d}.dcm"
        sub.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(sub, enforce_file_format=True)
        datasets.append(ds)
    return datasets


def write_seg(path: Path, source: list[pydicom.Dataset], masks: dict[str, np.ndarray]) -> hd.seg.Segmentation:
    """A DICOM-SEG over ``source`` (sorted or not) with one binary segment per label name.

    ``masks`` arrays are indexed (z, row, col) in the order of increasing z position.
    """
    ordered = sorted(source, key=lambda d: float(d.ImagePositionPatient[2]))
    descriptions = []
    for number, label in enumerate(masks, start=1):
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        ))
    stack = np.stack([m.astype(bool) for m in masks.values()], axis=-1)  # (z, r, c, segments)
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=100,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medsam3-tests",
        manufacturer_model_name="builder",
        software_versions="0",
        device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return seg


def today() -> str:
    return datetime.date.today().strftime("%Y%m%d")


def reorient(canonical: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS-canonical array in another orientation (e.g. "PIL"), with the matching affine."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    ornt = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes)))
    data = apply_orientation(canonical, ornt)
    return np.ascontiguousarray(data), affine @ inv_ornt_aff(ornt, canonical.shape)


# --- hostile uploads (tests/test_serve_limits.py, tests/test_serve.py) ---------------------------

def big_png(path: Path, width: int, height: int) -> Path:
    """A valid grayscale PNG of any size, written row by row (never held in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), b"\0" * (width + 1)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def nifti_claiming(path: Path, shape: tuple[int, ...]) -> Path:
    """A gzipped NIfTI whose header declares ``shape`` (int16) followed by a few bytes of data."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    buffer = io.BytesIO()
    header.write_to(buffer)
    path.write_bytes(gzip.compress(buffer.getvalue() + b"\0" * 4 + b"\1" * 1024))
    return path


def nifti_4d_zeros(path: Path, shape: tuple[int, int, int, int]) -> Path:
    """A real gzipped 4D int16 NIfTI of zeros, its data written in chunks (small on disk)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header.set_data_offset(352)
    buffer = io.BytesIO()
    header.write_to(buffer)
    chunk = b"\0" * (int(np.prod(shape[:3])) * 2)
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(buffer.getvalue().ljust(352, b"\0"))
        for _ in range(shape[3]):
            out.write(chunk)
    return path


def npz_of(path: Path, imgs: np.ndarray) -> Path:
    """An NPZ whose ``imgs`` is the given array (any dtype, objects pickled)."""
    np.savez(path, imgs=imgs)
    return path


def dicom_claiming(folder: Path, rows: int, columns: int, frames: int, samples: int = 1, bits: int = 16) -> Path:
    """A series folder of one DICOM file whose header declares ``frames`` frames of ``rows`` ×
    ``columns`` × ``samples`` values of ``bits`` bits, followed by at most 1 MiB of pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0.0, 0.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, columns, frames
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = b"\0" * min(rows * columns * samples * bits // 8, 2**20)
    folder.mkdir(parents=True)
    ds.save_as(folder / "0001.dcm", enforce_file_format=True)
    return folder


def zip_bomb(path: Path, gib: float = 1.0) -> Path:
    """A small zip whose one member expands to ``gib`` GiB of zeros (written in chunks)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive, archive.open("slice.dcm", "w",
                                                                                   force_zip64=True) as member:
        for _ in range(int(gib * 1024)):
            member.write(b"\0" * 2**20)
    return path


class WorkerKiller(threading.Thread):
    """SIGKILLs one Ray Train worker once ``run_dir/metrics.jsonl`` has ``after_steps`` lines (a
    node or process failure mid-run); ``killed`` holds the pid."""

    def __init__(self, run_dir: Path, after_steps: int = 3, timeout_s: float = 240):
        super().__init__(daemon=True)
        self.log, self.after, self.deadline = Path(run_dir) / "metrics.jsonl", after_steps, time.time() + timeout_s
        self.killed: list[int] = []

    def run(self) -> None:
        import psutil

        while time.time() < self.deadline and not self.killed:
            if self.log.is_file() and len(self.log.read_text().splitlines()) >= self.after:
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        self.killed.append(proc.info["pid"])
                        break
            time.sleep(0.2)


# The linears a test adapter adapts (tiny SAM3): attention and MLP of the vision trunk and the DETR decoder.
LORA_TARGETS = (r".*(vision_encoder\.backbone|detr_decoder)\.layers\.\d+\.(attention|self_attn|mlp)"
                r"\.(q_proj|v_proj|fc1|fc2)")


def lora_adapter(checkpoint: Path, folder: Path, seed: int, scale: float = 0.1) -> Path:
    """A rank-4 LoRA adapter of ``checkpoint``'s detector written by peft's ``save_pretrained``,
    with random ``lora_B`` (fixed seed; peft starts it at zero) so that it changes the masks."""
    import torch
    from peft import LoraConfig, get_peft_model

    from medsam3.model import build_model

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = get_peft_model(build_model(path=checkpoint), LoraConfig(r=4, target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, scale)
    model.save_pretrained(folder)
    return folder


def chromium() -> str:
    """Debian's Chromium for the page tests (Playwright drives it): a failure under ``make test``
    (which installs it, MEDSAM3_REQUIRE_BROWSER=1), skipped in a bare pytest run without it."""
    import shutil

    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("MEDSAM3_REQUIRE_BROWSER") or os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed: `make browser` installs it")
        pytest.skip("no chromium here (`make browser` installs it)")
    return found


def loss_weights(objective: str = "detr") -> dict:
    """The weights ``set_loss`` gets for ``objective``, resolved as a run resolves them."""
    from medsam3.config import load_config
    from pipelines.settings import TrainSettings

    return TrainSettings.from_config(load_config("train", [f"loss.objective={objective}"])).loss
