"""`medsam3 serve`: a real local Ray + Serve on loopback, called over HTTP with a real client.

The answers must equal `medsam3 predict` on the same input and checkpoint (one code path); two
checkpoints are multiplexed behind one endpoint; bad inputs get clear 4xx answers and leave the
server healthy; a burst of concurrent requests all succeed; the web page works in Chromium.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco

from medsam3.inference import inference_config
from medsam3.model import build_model
from medsam3.transforms import display_slice
from pipelines.predict import run_predict
from tests.builders import SAMMED2D, load_recist, uint8_to_hu, write_ct_series

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

PNG = SAMMED2D / "images" / "amos_0004_75.png"
THRESHOLD = 0.2535  # random tiny SAM3: partial masks (see test_predict)
SETTINGS = {"max_upload_mb": 4, "max_voxels": 512 * 512 * 10, "inference": {"threshold": THRESHOLD}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    """Two different tiny checkpoints: seed 0 (the shared fixture) and seed 1."""
    other = tmp_path_factory.mktemp("seed1")
    torch.manual_seed(1)
    build_model("tiny").save_pretrained(other)
    for name in os.listdir(tiny_checkpoint):
        if name.endswith((".json", ".txt")) and name != "config.json":
            shutil.copy(tiny_checkpoint / name, other / name)
    return {"a": tiny_checkpoint, "b": other}


@pytest.fixture(scope="module")
def url(checkpoints, s3_endpoint):
    from ray import serve

    from medsam3.io import storage
    from serve.run import start

    # model "b" is served from S3 (the replicas fetch it with the app's storage settings)
    storage.upload(checkpoints["b"], "s3://medsam3-test/serve/seed1")
    served = {"a": str(checkpoints["a"]), "b": "s3://medsam3-test/serve/seed1"}
    one_replica = {"autoscaling_config": None, "num_replicas": 1}
    address = start(served, port=free_port(), overrides={"SegmentModel": one_replica},
                    settings={**SETTINGS, "storage": {"endpoint_url": s3_endpoint}})
    yield address
    serve.shutdown()


def post(url: str, path: Path | None = None, prompts=("liver",), data: bytes | None = None, name: str | None = None,
         headers=None, **fields) -> requests.Response:
    content = data if data is not None else path.read_bytes()
    form = {"prompt": list(prompts), **fields}
    return requests.post(f"{url}/v1/segment", files={"file": (name or path.name, content)}, data=form,
                         headers=headers, timeout=120)


def decode(rle: dict) -> np.ndarray:
    return coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def predict_cfg():
    return inference_config([f"threshold={THRESHOLD}"])


def test_health_models_and_docs(url):
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    models = requests.get(f"{url}/v1/models", timeout=10).json()
    assert models["default"] == "a" and [m["id"] for m in models["models"]] == ["a", "b"]
    assert "/v1/segment" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert "<canvas" in requests.get(f"{url}/", timeout=10).text


def test_2d_answers_equal_predict(url, checkpoints, tmp_path):
    answer = post(url, PNG, prompts=["liver", "spleen"], box=["100,120,300,330"])
    assert answer.status_code == 200, answer.text
    body = answer.json()
    summary = run_predict(PNG, ["liver", "spleen"], checkpoints["a"], tmp_path / "p", predict_cfg(),
                          boxes=["100,120,300,330"], progress=False)
    assert body["shape"] == [1, 512, 512] and body["model"] == "a"
    for entry, file, expected in zip(body["masks"], ["1_liver.png", "2_spleen.png"], summary["prompts"], strict=True):
        mask = decode(entry["rle"][0])
        assert np.array_equal(mask, np.asarray(Image.open(tmp_path / "p" / file)) > 0)
        assert entry["pixels"] == expected["pixels"] > 0 and entry["score"] == expected["score"]
    overlay = post(url, PNG, format="png")
    assert overlay.headers["content-type"] == "image/png" and Image.open(io.BytesIO(overlay.content)).size[0] > 300


def test_3d_answers_equal_predict(url, checkpoints, tmp_path):
    recist = load_recist()
    hu = uint8_to_hu(recist["imgs"][:8], width=2000, level=0)
    affine = np.diag([*recist["spacing"][:3], 1.0])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1, ::-1, :]), affine), path)
    body = post(url, path, prompts=["lesion"]).json()
    run_predict(path, ["lesion"], checkpoints["a"], tmp_path / "p", predict_cfg(), progress=False)
    predicted = nib.load(tmp_path / "p" / "labels.nii.gz")
    mask = np.asanyarray(predicted.dataobj) == 1
    assert body["shape"] == [8, 512, 512] and len(body["masks"][0]["rle"]) == 8
    for k, rle in enumerate(body["masks"][0]["rle"]):  # per display slice, as the model saw it
        assert np.array_equal(decode(rle), display_slice(mask, 2, k))
    assert body["masks"][0]["voxels"] == mask.sum() > 0 and body["masks"][0]["volume_ml"] > 0
    nifti = post(url, path, prompts=["lesion"], format="nifti")
    served = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(nifti.content))
    assert np.allclose(served.affine, predicted.affine)
    assert np.array_equal(np.asanyarray(served.dataobj), np.asanyarray(predicted.dataobj))


def test_dicom_zip_gets_a_dicom_seg(url, checkpoints, tmp_path):
    recist = load_recist()
    write_ct_series(tmp_path / "series", uint8_to_hu(recist["imgs"][:6]), recist["spacing"])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for f in sorted((tmp_path / "series").rglob("*.dcm")):
            z.write(f, f.relative_to(tmp_path / "series").as_posix())
    answer = post(url, data=buffer.getvalue(), name="series.zip", prompts=["lesion"], format="dicom-seg")
    assert answer.status_code == 200, answer.text
    seg = hd.seg.Segmentation.from_dataset(__import__("pydicom").dcmread(io.BytesIO(answer.content)))
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["lesion"]
    summary = run_predict(tmp_path / "series", ["lesion"], checkpoints["a"], tmp_path / "p", predict_cfg(),
                          progress=False)
    volume = seg.get_volume(segment_numbers=[1], combine_segments=False)
    assert int((volume.array > 0).sum()) == summary["prompts"][0]["voxels"] > 0


def test_two_checkpoints_behind_one_endpoint(url, checkpoints, tmp_path):
    by_field = {m: decode(post(url, PNG, model=m).json()["masks"][0]["rle"][0]) for m in ("a", "b")}
    by_header = decode(post(url, PNG, headers={"serve_multiplexed_model_id": "b"}).json()["masks"][0]["rle"][0])
    assert not np.array_equal(by_field["a"], by_field["b"]) and np.array_equal(by_header, by_field["b"])
    run_predict(PNG, ["liver"], checkpoints["b"], tmp_path / "b", predict_cfg(), progress=False)
    assert np.array_equal(by_field["b"], np.asarray(Image.open(tmp_path / "b" / "1_liver.png")) > 0)
    assert post(url, PNG, model="nope").status_code == 404


def zipped(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in entries:
            z.writestr(name, content)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (0o120777 << 16)
            z.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def test_bad_inputs_get_clear_answers_and_the_server_stays_up(url, tmp_path):
    recist = load_recist()
    big = tmp_path / "big.nii.gz"  # 16 slices of 512²: beyond max_voxels
    nib.save(nib.Nifti1Image(np.zeros((512, 512, 16), np.int16), np.eye(4)), big)
    cases = [
        (dict(data=os.urandom(5 * 2**20), name="huge.png"), 413, "limit"),
        (dict(path=big), 413, "exceeds the limits"),
        (dict(data=b"hello", name="notes.txt"), 415, "unsupported file type"),
        (dict(data=b"not a nifti", name="scan.nii.gz"), 422, "scan.nii.gz"),
        (dict(data=b"not a png", name="scan.png"), 422, "scan.png"),
        (dict(data=zipped([("../evil.dcm", b"x")]), name="s.zip"), 422, "'..'"),
        (dict(data=zipped([("/abs/evil.dcm", b"x")]), name="s.zip"), 422, "absolute path"),
        (dict(data=zipped([("ok.dcm", b"x")], symlink="link.dcm"), name="s.zip"), 422, "symbolic link"),
        (dict(data=b"PK not a zip", name="s.zip"), 422, "zip"),
        (dict(path=PNG, box=["5,5,1,1"]), 422, "x1 > x0"),
        (dict(path=PNG, format="dicom-seg"), 422, "DICOM series"),
        (dict(path=PNG, format="tiff"), 422, "format"),
        (dict(path=PNG, model="missing"), 404, "unknown model"),
    ]
    for kwargs, status, message in cases:
        answer = post(url, **kwargs)
        assert answer.status_code == status, (kwargs.get("name"), answer.text)
        assert message in answer.json()["detail"], answer.text
    no_prompt = requests.post(f"{url}/v1/segment", files={"file": ("a.png", PNG.read_bytes())}, timeout=30)
    assert no_prompt.status_code == 422
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert post(url, PNG).status_code == 200
    assert recist is not None


def test_a_burst_of_concurrent_requests_all_succeed(url):
    image = PNG.read_bytes()
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda i: post(url, data=image, name=f"{i}.png", prompts=["liver", "spleen"]),
                                range(60)))
    assert [a.status_code for a in answers] == [200] * 60
    first = answers[0].json()["masks"]
    assert all(a.json()["masks"] == first for a in answers)  # batched together, answered the same


def test_the_page_in_headless_chromium(url, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("no chromium here")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.set_input_files("#file", str(PNG))
        page.fill("#prompts", "liver")
        page.click("#go")
        page.wait_for_selector("#legend .entry", timeout=60_000)
        masked = int(page.get_attribute("#canvas", "data-masked"))
        legend = page.inner_text("#legend")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert "liver" in legend and masked > 0
    answer = post(url, PNG)
    assert masked == decode(answer.json()["masks"][0]["rle"][0]).sum()
    assert json.dumps(answer.json())  # plain JSON
