"""`medsam3 serve`: a real local Ray + Serve on loopback, called over HTTP with a real client.

The answers must equal `medsam3 predict` on the same input and checkpoint (one code path); two
checkpoints are multiplexed behind one endpoint, and two LoRA adapters ride on the default one,
each answering as its own `predict --adapter`; concurrent requests with different images each
get their own image's answer; bad and hostile inputs get clear 4xx answers before memory is
spent and leave the server healthy; /v1 needs an API key that never reaches a log; every Ray
process listens on loopback only; the API survives fuzzing from its own OpenAPI schema; the web
page works in Chromium and draws a small slice scaled to the window, nearest neighbour, with the
masks aligned.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import io
import json
import os
import random
import select
import shutil
import socket
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import highdicom as hd
import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
import torch
from PIL import Image
from pycocotools import mask as coco

from medsam3.inference import inference_config
from medsam3.model import build_model
from medsam3.transforms import display_slice
from pipelines.predict import run_predict
from tests.builders import (
    SAMMED2D,
    SERVE_LIMITS,
    big_png,
    chromium,
    dicom_claiming,
    load_recist,
    lora_adapter,
    nifti_4d_zeros,
    nifti_claiming,
    npz_of,
    uint8_to_hu,
    write_ct_series,
    zip_bomb,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

PNG = SAMMED2D / "images" / "amos_0004_75.png"
THRESHOLD = 0.2535  # random tiny SAM3: partial masks (see test_predict)
SAME = 1e-3  # pixels that may differ between batched and single float32 passes (tests/test_batching.py)
KEY = "test-key-0f8e1c2d"  # the API key of the test endpoint (from a key file)
WRONG_KEY = "wrong-key-77aa31"
SETTINGS = {**SERVE_LIMITS, "inference": {"threshold": THRESHOLD}}


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
def adapters(checkpoints, tmp_path_factory):
    """Two LoRA adapters (peft's folders, different random weights) of checkpoint "a", the default."""
    root = tmp_path_factory.mktemp("adapters")
    return {name: lora_adapter(checkpoints["a"], root / name, seed)
            for name, seed in (("liver-siteA", 1), ("lung-siteB", 2))}


@pytest.fixture(scope="module")
def gone(checkpoints, tmp_path_factory):
    """A third adapter, served but never used before its test deletes its weights."""
    return lora_adapter(checkpoints["a"], tmp_path_factory.mktemp("gone") / "gone", 3)


@pytest.fixture(scope="module")
def url(checkpoints, adapters, gone, clip_trained, s3_endpoint, tmp_path_factory):
    from ray import serve

    from medsam3.io import storage
    from serve.run import start

    # model "b" is served from S3 (the replicas fetch it with the app's storage settings)
    storage.upload(checkpoints["b"], "s3://medsam3-test/serve/seed1")
    # model "v" is a video checkpoint (detector + clip-trained tracker) for mode=propagate
    served = {"a": str(checkpoints["a"]), "b": "s3://medsam3-test/serve/seed1", "v": str(clip_trained[1])}
    one_replica = {"autoscaling_config": None, "num_replicas": 1}
    keys = tmp_path_factory.mktemp("auth") / "api-keys"
    keys.write_text(f"# test keys\n{KEY}\n")
    # mounted under a route prefix, as behind a shared gateway: every route (and its key check) lives under it
    address = start(served, port=free_port(), overrides={"SegmentModel": one_replica}, route_prefix="/medsam3",
                    settings={**SETTINGS, "storage": {"endpoint_url": s3_endpoint},
                              "auth": {"api_keys_file": str(keys)}},
                    adapters={**{name: str(path) for name, path in adapters.items()}, "gone": str(gone)})
    yield address
    serve.shutdown()


AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url: str, path: Path | None = None, prompts=("liver",), data: bytes | None = None, name: str | None = None,
         headers=None, **fields) -> requests.Response:
    content = data if data is not None else path.read_bytes()
    form = {"prompt": list(prompts), **fields}
    return requests.post(f"{url}/v1/segment", files={"file": (name or path.name, content)}, data=form,
                         headers={**AUTH, **(headers or {})}, timeout=120)


def decode(rle: dict) -> np.ndarray:
    return coco.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def predict_cfg():
    return inference_config([f"threshold={THRESHOLD}"])


def test_health_models_and_docs(url):
    assert requests.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    assert url.endswith("/medsam3")
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}  # model ids stay behind the key
    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).json()
    assert models["default"] == "a"
    assert [m["id"] for m in models["models"]] == ["a", "b", "v", "liver-siteA", "lung-siteB", "gone"]
    assert [m["modes"] for m in models["models"]] == [["slices"], ["slices"], ["slices", "propagate"], ["slices"],
                                                      ["slices"], ["slices"]]
    assert [(m.get("base"), m.get("adapter")) for m in models["models"][2:]] == [
        (None, None), ("a", "liver-siteA"), ("a", "lung-siteB"), ("a", "gone")]
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


def test_lora_adapters_behind_one_endpoint_answer_as_their_own_predict(url, checkpoints, adapters, tmp_path):
    """The base and two LoRA adapters of it, two different CT slices, interleaved and all at once
    (items of several adapters in one batch): each answer equals `medsam3 predict` of that image
    with that adapter (or none). The adapters' masks differ from the base's and from each other's
    far beyond the batching tolerance, so an answer from a wrong adapter would show."""
    images = [SAMMED2D / "images" / name for name in ("amos_0004_75.png", "amos_0006_90.png")]
    models = ["a", *adapters]
    expected = {}
    for model in models:
        for i, image in enumerate(images):
            summary = run_predict(image, ["liver"], checkpoints["a"], tmp_path / f"{model}{i}", predict_cfg(),
                                  progress=False, adapter=adapters.get(model))
            assert summary.get("adapter") == (None if model == "a" else model)
            expected[model, i] = np.asarray(Image.open(tmp_path / f"{model}{i}" / "1_liver.png")) > 0
    for i in range(len(images)):
        base, first, second = (expected[model, i] for model in models)
        assert min(np.mean(first != base), np.mean(second != base), np.mean(first != second)) > 0.02
    order = [(model, i) for model in models for i in range(len(images))] * 4
    random.Random(5).shuffle(order)
    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(lambda pair: post(url, images[pair[1]], model=pair[0]), order))
    for (model, i), answer in zip(order, answers, strict=True):
        assert answer.status_code == 200 and answer.json()["model"] == model, answer.text
        mask = decode(answer.json()["masks"][0]["rle"][0])
        # batched and single float32 forward passes agree to rounding (tests/test_batching.py)
        assert np.mean(mask != expected[model, i]) <= SAME, f"{model} on image {i} answered like another model"
    by_header = post(url, images[0], headers={"serve_multiplexed_model_id": "lung-siteB"}).json()
    assert by_header["model"] == "lung-siteB"
    assert np.array_equal(decode(by_header["masks"][0]["rle"][0]), expected["lung-siteB", 0])


def test_an_adapter_broken_after_start_fails_its_own_requests_only(url, gone):
    """Its folder loses its weights while served: its requests get a 503 naming it; requests for
    the base sent with them (same batches) are answered, and the replica stays healthy."""
    (gone / "adapter_model.safetensors").unlink()
    image = SAMMED2D / "images" / "amos_0004_75.png"
    order = ["gone", "a"] * 4
    with ThreadPoolExecutor(max_workers=len(order)) as pool:
        answers = list(pool.map(lambda model: post(url, image, model=model), order))
    for model, answer in zip(order, answers, strict=True):
        if model == "gone":
            assert answer.status_code == 503 and "'gone'" in answer.json()["detail"], answer.text
        else:
            assert answer.status_code == 200 and answer.json()["model"] == "a", answer.text
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200


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
    no_prompt = requests.post(f"{url}/v1/segment", files={"file": ("a.png", PNG.read_bytes())}, headers=AUTH,
                              timeout=30)
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


MARKUP = '<img src="x" onerror="window.injected = 1">'


def test_the_page_in_headless_chromium(url, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.set_input_files("#file", str(PNG))
        page.fill("#prompts", f"liver, {MARKUP}")  # a prompt is text, never markup, in the tab that holds the key
        page.click("#go")
        page.wait_for_selector("#legend .entry", timeout=60_000)
        masked = int(page.get_attribute("#canvas", "data-masked"))
        legend = page.inner_text("#legend")
        injected = page.evaluate("[window.injected, document.querySelectorAll('#legend img').length]")
        page.screenshot(path=str(tmp_path / "page.png"))
        browser.close()
    assert "liver" in legend and masked > 0
    assert MARKUP in legend and injected == [None, 0]
    answer = post(url, PNG, prompts=("liver", MARKUP))
    assert masked == sum(decode(m["rle"][0]).sum() for m in answer.json()["masks"])
    assert json.dumps(answer.json())  # plain JSON


def test_the_page_scales_a_small_slice_to_the_window_pixel_for_pixel(url, tmp_path):
    """A 128×128 slice in a 1600×1200 window is drawn at a whole multiple (≥ 2×) of its size, within
    the window; the mask layer's box is the slice's; and the screenshot is the page's own 128×128
    picture (slice and masks) with every pixel repeated scale × scale times: nearest neighbour, the
    masks on the pixels they belong to."""
    from playwright.sync_api import sync_playwright

    small = tmp_path / "small.png"
    Image.open(PNG).resize((128, 128), Image.Resampling.BILINEAR).save(small)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.set_input_files("#file", str(small))
        page.fill("#prompts", "liver")
        page.click("#go")
        page.wait_for_selector("#legend .entry", timeout=60_000)
        masked = int(page.get_attribute("#canvas", "data-masked"))
        boxes = page.evaluate("""() => Object.fromEntries(["image", "canvas"].map(id => {
            const r = document.getElementById(id).getBoundingClientRect();
            return [id, [r.x, r.y, r.width, r.height]]; }))""")
        natural = page.evaluate("""() => {  // the slice with its masks, at the slice's own pixels
            const image = document.getElementById("image"), out = document.createElement("canvas");
            out.width = image.width; out.height = image.height;
            const ctx = out.getContext("2d");
            ctx.drawImage(image, 0, 0); ctx.drawImage(document.getElementById("canvas"), 0, 0);
            return out.toDataURL("image/png"); }""")
        x, y, width, height = boxes["image"]
        shot = page.screenshot(clip={"x": round(x), "y": round(y), "width": width, "height": height})
        browser.close()
    assert masked > 0
    assert boxes["canvas"] == boxes["image"]
    scale = width / 128
    assert scale >= 2 and scale == int(scale) and height == width
    assert y + height <= 1200 and x + width <= 1600
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(natural.split(",")[1]))).convert("RGB"))
    assert picture.shape == (128, 128, 3)
    drawn = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)
    repeated = picture.repeat(int(scale), axis=0).repeat(int(scale), axis=1).astype(int)
    assert np.abs(drawn - repeated).max() <= 2


# --- concurrency: every answer from its own image -----------------------------------------------

def test_concurrent_requests_with_different_images_get_their_own_answers(url):
    """Two different CT slices and a blank image, one prompt, mixed order, all at once: each answer
    equals the one its image gets alone (a (slice, window) sharing key handed out others' masks)."""
    ct = [SAMMED2D / "images" / "amos_0004_75.png", SAMMED2D / "images" / "amos_0006_90.png"]
    blank = io.BytesIO()
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(blank, format="PNG")
    images = [p.read_bytes() for p in ct] + [blank.getvalue()]
    alone = [decode(post(url, data=image, name="alone.png").json()["masks"][0]["rle"][0]) for image in images]
    # every two answers differ by far more than the tolerance below, so a swapped answer cannot pass
    assert all(np.mean(alone[i] != alone[j]) > 10 * SAME for i, j in ((0, 1), (0, 2), (1, 2)))
    order = [i % 3 for i in range(36)]
    random.Random(7).shuffle(order)
    with ThreadPoolExecutor(max_workers=36) as pool:
        answers = list(pool.map(lambda i: post(url, data=images[i], name="scan.png"), order))
    assert [a.status_code for a in answers] == [200] * 36, answers[0].text
    for i, answer in zip(order, answers, strict=True):
        mask = decode(answer.json()["masks"][0]["rle"][0])
        assert np.mean(mask != alone[i]) <= SAME, f"a request for image {i} got another image's mask"


def lesion_nifti(path: Path, name: str) -> Path:
    """8 slices (2..9) of a real lesion volume as a CT NIfTI (within the endpoint's voxel limit)."""
    recist = load_recist(name)
    hu = uint8_to_hu(recist["imgs"][2:10], width=2000, level=0)
    affine = np.diag([*recist["spacing"][:3], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1, ::-1, :]), affine), path)
    return path


def test_propagate_mode_answers_equal_predict_under_concurrency(url, clip_trained, tmp_path):
    """mode=propagate on the video checkpoint: two different volumes (a box-seeded one and a
    text-only one) sent together each get what `medsam3 predict --mode propagate` gives alone."""
    seeded = lesion_nifti(tmp_path / "seeded.nii.gz", "CT_Lesion_000009_03_01_036-048.npz")
    text = lesion_nifti(tmp_path / "text.nii.gz", "CT_Lesion_000002_03_01_035-047.npz")
    requests_ = [(seeded, {"box": ["208,177,250,236@z=4"]}), (text, {})] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda r: post(url, r[0], prompts=["lesion"], model="v", mode="propagate", **r[1]),
                                requests_))
    assert [a.status_code for a in answers] == [200] * 4, answers[0].text
    cfg = inference_config([f"threshold={THRESHOLD}", "mode=propagate"])
    for (path, fields), answer in zip(requests_, answers, strict=True):
        run_predict(path, ["lesion"], clip_trained[1], tmp_path / "p", cfg, boxes=fields.get("box", []),
                    progress=False)
        mask = np.asanyarray(nib.load(tmp_path / "p" / "labels.nii.gz").dataobj) == 1
        got = np.stack([decode(rle) for rle in answer.json()["masks"][0]["rle"]])
        assert np.array_equal(got, np.stack([display_slice(mask, 2, k) for k in range(8)]))
    assert answers[0].json()["masks"][0]["voxels"] > 1000  # the tracked lesion (slices mode is not this)
    refused = post(url, seeded, prompts=["lesion"], model="a", mode="propagate")
    assert refused.status_code == 422 and "no tracker" in refused.json()["detail"]
    unseeded = post(url, seeded, prompts=["lesion"], model="v", mode="propagate", box=["208,177,250,236"])
    assert unseeded.status_code == 422 and "@z=N" in unseeded.json()["detail"]
    outside = post(url, seeded, prompts=["lesion"], model="v", mode="propagate", box=["208,177,250,236@z=8"])
    assert outside.status_code == 422 and "outside the volume" in outside.json()["detail"]


# --- hostile uploads: refused before memory is spent ----------------------------------------------

def server_processes() -> list[psutil.Process]:
    """Ray's processes (GCS, raylet, workers: the proxy, the ingress, the model replicas)."""
    return psutil.Process().children(recursive=True)


class PeakMemory(threading.Thread):
    """Samples the resident memory of the server's processes (those alive at the start)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.processes = server_processes()
        self.baseline = self.total()
        self.peak = self.baseline
        self.running = True

    def total(self) -> int:
        rss = 0
        for process in self.processes:
            with contextlib.suppress(psutil.Error):
                rss += process.memory_info().rss
        return rss

    def run(self):
        while self.running:
            self.peak = max(self.peak, self.total())
            time.sleep(0.05)

    def stop(self) -> int:
        self.running = False
        self.join()
        return self.peak - self.baseline


def raw_post(url: str, parts: list[bytes], file_chunks, content_length: int | None = None
             ) -> tuple[int, dict, int, str]:
    """POST a multipart body over a plain socket, chunked unless ``content_length`` is given; stops
    sending as soon as the server answers. Returns (status, JSON body, body bytes sent, where the
    body limit acted: the answer's X-MedSAM3-Limit)."""
    host, port, prefix = urlparse(url).hostname, urlparse(url).port, urlparse(url).path
    boundary = "medsam3boundary"
    head = b"".join(parts) + (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
                              'Content-Type: image/png\r\n\r\n').encode()
    framing = f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked"
    request = (f"POST {prefix}/v1/segment HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n").encode()
    sent = 0
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(request)
        try:
            for chunk in [head, *file_chunks]:
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer is already there
                sock.sendall(chunk if content_length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                answer.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, body = answer.split(b"\r\n\r\n", 1)
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    where = {k.lower(): v for k, v in headers.items()}.get(b"x-medsam3-limit", b"").decode()
    return int(head.split(b" ", 2)[1]), json.loads(body), sent, where


def prompt_part(boundary: str = "medsam3boundary") -> bytes:
    return f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nliver\r\n'.encode()


def test_hostile_uploads_are_refused_before_memory_is_spent(url, tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip", gib=1.0)  # 1 GiB of zeros in about 1 MB
    png = big_png(tmp_path / "huge.png", 30000, 30000)
    nifti = nifti_claiming(tmp_path / "huge.nii.gz", (2000, 2000, 2000))
    # 512 in a fourth axis: real zeros (256 MiB decoded from a small gzip), and a header alone claiming 4 GiB
    zeros_4d = nifti_4d_zeros(tmp_path / "zeros4d.nii.gz", (64, 64, 64, 512))
    nifti_4d = nifti_claiming(tmp_path / "huge4d.nii.gz", (256, 256, 64, 512))
    void = npz_of(tmp_path / "CT_void.npz", np.zeros(256, dtype="V4096"))  # 1 MiB that claims to be 256 voxels
    series = {name: zipped([(f.name, f.read_bytes()) for f in dicom_claiming(tmp_path / name, *shape).iterdir()])
              for name, shape in (("rgb", (512, 512, 8, 3)), ("multiframe", (512, 512, 400, 1, 32)))}
    megabyte = b"\0" * 2**20
    monitor = PeakMemory()
    monitor.start()
    answers = {}
    for name, file, content, status, message in [
            ("zip bomb", "series.zip", bomb.read_bytes(), 413, "zip expands beyond its limits"),
            ("30000² PNG", png.name, png.read_bytes(), 413, "[30000, 30000] exceeds the limits"),
            ("2000³ NIfTI", nifti.name, nifti.read_bytes(), 413, "[2000, 2000, 2000] exceeds the limits"),
            ("4D NIfTI of zeros", zeros_4d.name, zeros_4d.read_bytes(), 422,
             "4D volume (64, 64, 64, 512) and no channel configured"),
            ("4D NIfTI header", nifti_4d.name, nifti_4d.read_bytes(), 422,
             "4D volume (256, 256, 64, 512) and no channel configured"),
            ("void NPZ", void.name, void.read_bytes(), 422, "array 'imgs' has dtype |V4096; numbers are expected"),
            ("RGB DICOM", "rgb.zip", series["rgb"], 422, "a colour DICOM series (3 samples per pixel)"),
            ("multi-frame DICOM", "frames.zip", series["multiframe"], 413, "[512, 512, 400] exceeds the limits")]:
        started = time.perf_counter()
        answer = post(url, data=content, name=file)
        answers[name] = (answer.status_code, time.perf_counter() - started)
        assert answer.status_code == status and message in answer.json()["detail"], (name, answer.text)
    # 600 MB without a Content-Length (chunked): cut at 4 MB, the rest is never sent
    started = time.perf_counter()
    status, body, sent, where = raw_post(url, [prompt_part()], (megabyte for _ in range(600)))
    answers["600 MB chunked"] = (status, time.perf_counter() - started)
    # in Serve's HTTP proxy (serve/limits.py), before the body reaches the ingress
    assert status == 413 and "upload too large" in body["detail"] and sent < 64 * 2**20 and where == "proxy"
    # a declared 600 MB body: refused from its Content-Length alone
    status, body, sent, where = raw_post(url, [prompt_part()], (megabyte for _ in range(600)),
                                         content_length=600 * 2**20)
    assert status == 413 and f"{600 * 2**20} bytes" in body["detail"] and sent < 64 * 2**20 and where == "proxy"
    grown = monitor.stop()
    print(f"hostile uploads: {answers}; server memory grew by at most {grown / 2**20:.0f} MiB")
    assert all(seconds < 10 for _, seconds in answers.values()), answers
    assert grown < 256 * 2**20, f"the server grew by {grown / 2**20:.0f} MiB"
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert post(url, PNG).status_code == 200


# --- who may call it ------------------------------------------------------------------------------

def test_v1_needs_an_api_key_that_never_reaches_a_log(url):
    import ray

    for headers in ({}, {"Authorization": f"Bearer {WRONG_KEY}"}, {"Authorization": KEY}):
        answer = requests.post(f"{url}/v1/segment", files={"file": ("a.png", PNG.read_bytes())},
                               data={"prompt": "liver"}, headers=headers, timeout=30)
        assert answer.status_code == 401 and "API key" in answer.json()["detail"]
        assert answer.headers["www-authenticate"].startswith("Bearer")
        for path in ("/v1/models", "/info/", "/datastore/?output=all"):  # under the app's route prefix
            assert requests.get(f"{url}{path}", headers=headers, timeout=10).status_code == 401, path
    # two Authorization headers (a good one and a bad one, either order): refused, whichever a reader takes
    for pair in ((KEY, WRONG_KEY), (WRONG_KEY, KEY)):
        status, body = get_with_headers(url, "/v1/models", [("Authorization", f"Bearer {key}") for key in pair])
        assert status == 400 and "more than one Authorization header" in body, body
    for path in ("/healthz", "/readyz", "/", "/openapi.json"):  # probes and the page stay open
        assert requests.get(f"{url}{path}", timeout=30).status_code == 200
    assert requests.get(f"{url}/v1/models", headers=AUTH, timeout=10).status_code == 200
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    assert sum(1 for f in logs.rglob("*") if f.is_file()) > 10
    for log in (f for f in logs.rglob("*") if f.is_file()):
        text = log.read_bytes()
        assert KEY.encode() not in text and WRONG_KEY.encode() not in text, log


def get_with_headers(url: str, path: str, headers: list[tuple[str, str]]) -> tuple[int, str]:
    """A GET with the headers as given, repeated names included (requests folds them)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.putrequest("GET", parts.path + path)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read().decode()
    finally:
        connection.close()


# --- loopback ---------------------------------------------------------------------------------------

def test_every_ray_process_listens_on_loopback_only(url):
    listening = []
    for process in server_processes():
        try:
            listening += [(process.name(), c.laddr) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert len(listening) >= 5  # GCS, raylet, workers, the HTTP proxy
    for name, address in listening:
        assert address.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"), (name, address)


# --- fuzzed from its own OpenAPI schema --------------------------------------------------------------

def test_the_api_survives_fuzzing_from_its_openapi_schema(url):
    """schemathesis generates requests from /openapi.json (bounded examples): no 5xx, and every
    4xx answer is JSON with a `detail`; the replicas stay up."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures, calls = [], []
    for operation in schema.get_all_operations():
        api_operation = operation.ok()
        # /v1 in depth; the MONAI Label routes (test_monailabel drives them with their client) more briefly
        examples = 100 if api_operation.path.startswith(("/v1/", "/healthz", "/readyz")) else 25

        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategies.one_of([api_operation.as_strategy(generation_mode=mode)
                                       for mode in schemathesis.GenerationMode]))
        def fuzz(case):
            response = case.call(headers=AUTH, timeout=60)
            calls.append((case.method, case.path, response.status_code))
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))
            elif response.status_code >= 400:
                body = response.json()
                assert "detail" in body, (case.method, case.path, response.text[:200])

        fuzz()
    print(f"schemathesis: {len(calls)} calls, statuses {sorted(collections.Counter(c[2] for c in calls).items())}")
    assert {path for _, path, _ in calls} >= {"/v1/segment", "/v1/models", "/healthz", "/readyz", "/info/",
                                              "/infer/{model}", "/datastore/", "/session/"}
    assert not failures, failures
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    assert post(url, PNG).status_code == 200
