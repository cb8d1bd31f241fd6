"""The MONAI Label protocol of `medsam3 serve`, driven by MONAI Label's own Python client
(`monailabel.client`, installed without its dependencies) and by 3D Slicer's request, against a
real local Ray + Serve on loopback with real CT (NIfTI, NRRD and a DICOM series).

Label maps come back in the input's geometry with the ids `/info` lists, and equal what the
endpoint's `/v1` API answers for the same scan (which test_serve checks against `predict`).
Clicks and an ROI land on the voxels they name whatever the file's orientation; images are
kept per API key; bad requests get clear 4xx answers and the server stays up.
"""

from __future__ import annotations

import gzip
import json
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import highdicom as hd
import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest
import requests
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy import ndimage

from tests.builders import SERVE_LIMITS, chromium, load_recist, uint8_to_hu, write_ct_series

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

KEY = "viewer-key-5c1e"
OTHER_KEY = "viewer-key-other-9a7d"
THRESHOLD = 0.2535  # random tiny SAM3: partial masks (see test_predict)
TOKEN = {"token_type": "bearer", "access_token": KEY}


@pytest.fixture(scope="module")
def url(tiny_checkpoint, clip_trained, tmp_path_factory):
    import socket

    from ray import serve

    from serve.run import start

    keys = tmp_path_factory.mktemp("auth") / "keys"
    keys.write_text(f"{KEY}\n{OTHER_KEY}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = {**SERVE_LIMITS, "inference": {"threshold": THRESHOLD}, "auth": {"api_keys_file": str(keys)},
                "monailabel": {"store_dir": str(tmp_path_factory.mktemp("store")), "max_store_mb": 64}}
    address = start({"a": str(tiny_checkpoint), "v": str(clip_trained[1])}, port=port, settings=settings,
                    overrides={"SegmentModel": {"autoscaling_config": None, "num_replicas": 1}})
    yield address
    serve.shutdown()


@pytest.fixture()
def client(url, tmp_path):
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    client.update_auth(TOKEN)
    return client


def v1(url: str, path: Path, prompts, **fields) -> dict:
    """The endpoint's own API on the same file: the masks to compare with (test_serve: = predict)."""
    answer = requests.post(f"{url}/v1/segment", files={"file": (path.name, path.read_bytes())},
                           data={"prompt": list(prompts), "format": "nifti", **fields},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert answer.status_code == 200, answer.text
    labels = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    data = np.asanyarray(labels.dataobj)
    return {p: data == i for i, p in enumerate(prompts, start=1)}


def ct_volume(name: str | None = None, slices=slice(2, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A real lesion volume as int16 HU in (x, y, z) order (CT-detected: below -500 HU) and spacing."""
    recist = load_recist(name)
    hu = uint8_to_hu(recist["imgs"][slices], width=2000, level=0)
    return np.ascontiguousarray(hu.transpose(2, 1, 0)).astype(np.int16), np.asarray(recist["spacing"][:3], float)


def lps_nifti(path: Path, name: str | None = None) -> Path:
    """Stored in LPS voxel order (x and y flipped against RAS), as scanners write them."""
    data, spacing = ct_volume(name)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [120.0, 95.0, -40.0]
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def slicer_nrrd(path: Path, name: str | None = None) -> Path:
    """What 3D Slicer writes for a volume: gzip NRRD in LPS space."""
    data, spacing = ct_volume(name)
    header = {"space": "left-posterior-superior", "space directions": np.diag(spacing),
              "space origin": np.array([-120.0, -95.0, -40.0]), "kinds": ["domain"] * 3, "encoding": "gzip"}
    nrrd.write(str(path), data, header, index_order="F")
    return path


def test_info_lists_every_model_with_stable_label_ids(client, url, clip_trained):
    info = client.info()
    assert info["name"] == "MedSAM3"
    assert set(info["models"]) == {"a", "a-interactive", "v", "v-interactive"}
    assert {m["type"] for m in info["models"].values()} == {"segmentation", "deepgrow"}
    trained = json.loads((clip_trained[1] / "medsam3_export.json").read_text())["prompts"]
    assert info["models"]["v"]["labels"] == {p: i for i, p in enumerate(sorted(trained), start=1)}
    released = info["models"]["a"]["labels"]  # no training record: the vocabulary's prompts
    assert list(released.values()) == list(range(1, len(released) + 1)) and "liver" in released
    assert info["models"]["v"]["config"]["mode"] == ["slices", "propagate"]
    assert info["models"]["a"]["config"]["mode"] == ["slices"]
    assert client.info()["models"] == info["models"]  # the same ids on every call


def test_auth_follows_slicers_login(url, tmp_path):
    anonymous = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert anonymous.auth_enabled()
    with pytest.raises(MONAILabelClientException) as refused:
        anonymous.info()
    assert refused.value.status_code == 401
    with pytest.raises(MONAILabelClientException):
        anonymous.auth_token("radiologist", "not-a-key")
    anonymous.update_auth(anonymous.auth_token("radiologist", KEY))
    assert anonymous.auth_valid_token() and "models" in anonymous.info()


def test_upload_then_infer_answers_in_the_inputs_geometry(client, url, tmp_path):
    """info → upload_image → infer, a NIfTI stored in LPS order: the label map has the input's
    affine and shape, the ids of /info, and each label's mask equals /v1's for that prompt."""
    path = lps_nifti(tmp_path / "abdomen.nii.gz")
    labels = client.info()["models"]["a"]["labels"]
    assert client.upload_image(str(path), "abdomen-1") == {"image": "abdomen-1"}
    result, params = client.infer("a", "abdomen-1", {"labels": ["liver", "lesion", "my free text"]})
    answer = nib.load(result)
    source = nib.load(path)
    assert np.allclose(answer.affine, source.affine) and answer.shape == source.shape
    assert params["label_names"] == {**labels, "my free text": len(labels) + 1}
    expected = v1(url, path, ["liver", "lesion", "my free text"])
    data = np.asanyarray(answer.dataobj)
    assert set(np.unique(data)) <= {0, *(params["label_names"][p] for p in expected)}
    for prompt, mask in expected.items():
        assert np.array_equal(data == params["label_names"][prompt], mask), prompt
    assert sum(m.sum() for m in expected.values()) > 0
    summary = {entry["label"]: entry for entry in params["labels"]}  # each label's own mask, before overlaps
    voxels = v1(url, path, ["lesion"])["lesion"].sum()
    voxel_ml = np.prod(source.header.get_zooms()[:3]) / 1000
    assert summary["lesion"]["voxels"] == voxels and summary["lesion"]["id"] == labels["lesion"]
    assert summary["lesion"]["volume_ml"] == pytest.approx(voxels * voxel_ml, abs=1e-3)


def test_slicers_session_request_with_nrrd_gets_nrrd_back(client, url, tmp_path):
    """3D Slicer sends NRRD, asks for result_extension .nrrd / result_dtype uint8 and names
    labels in the model's option field: the NRRD answer has the input's space, directions and
    origin, and the masks of the same volume sent as NIfTI."""
    volume = slicer_nrrd(tmp_path / "volume.nrrd")
    session = client.create_session(str(volume))
    assert client.get_session(session["session_id"])["name"] == session["session_id"]
    params = {"prompts": "lesion, liver", "result_extension": ".nrrd", "result_dtype": "uint8"}
    result, out = client.infer("a", "volume", params, session_id=session["session_id"])
    data, header = nrrd.read(result, index_order="F")
    _, source = nrrd.read(str(volume), index_order="F")
    assert data.dtype == np.uint8 and data.shape == tuple(source["sizes"])
    assert np.allclose(header["space directions"], source["space directions"])
    assert np.allclose(header["space origin"], source["space origin"])
    as_nifti = tmp_path / "same.nii.gz"  # the same voxels and geometry, RAS affine
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.c_[np.r_[source["space directions"].T, np.zeros((1, 3))],
                                                     [*source["space origin"], 1.0]]
    nib.save(nib.Nifti1Image(nrrd.read(str(volume), index_order="F")[0], affine), as_nifti)
    for prompt, mask in v1(url, as_nifti, ["lesion", "liver"]).items():
        assert np.array_equal(data == out["label_names"][prompt], mask), prompt
    # OHIF's extension asks output=image: the bare file, no multipart around it
    ohif = requests.post(f"{url}/infer/a?image=&session_id={session['session_id']}&output=image",
                         data={"params": json.dumps(params)}, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ohif.status_code == 200 and ohif.headers["content-type"] == "application/octet-stream"
    (tmp_path / "ohif.nrrd").write_bytes(ohif.content)
    assert np.array_equal(nrrd.read(str(tmp_path / "ohif.nrrd"), index_order="F")[0], data)
    client.remove_session(session["session_id"])
    with pytest.raises(MONAILabelClientException):
        client.get_session(session["session_id"])


def test_a_dicom_series_gets_a_dicom_seg(client, url, tmp_path):
    recist = load_recist()
    write_ct_series(tmp_path / "series", uint8_to_hu(recist["imgs"][:6]), recist["spacing"])
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in sorted((tmp_path / "series").rglob("*.dcm")):
            z.write(f, f.relative_to(tmp_path / "series").as_posix())
    result, params = client.infer("a", "series", {"labels": ["lesion"]}, file=str(archive))
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(result))
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == ["lesion"]
    voxels = int((seg.get_volume(segment_numbers=[1], combine_segments=False).array > 0).sum())
    answer = requests.post(f"{url}/v1/segment", files={"file": ("s.zip", archive.read_bytes())},
                           data={"prompt": ["lesion"]}, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert voxels == answer.json()["masks"][0]["voxels"] == params["labels"][0]["voxels"] > 0


def test_clicks_and_an_roi_land_on_the_voxels_they_name(client, url, tmp_path):
    """The interactive model on an LPS-ordered NIfTI: a foreground click keeps exactly the object
    of the text answer that holds the clicked voxel; a background click on it removes it; an ROI
    (Slicer's [i0, i1, j0, j1, k0, k1]) confines the answer to its voxels."""
    path = lps_nifti(tmp_path / "ct.nii.gz")
    client.upload_image(str(path), "ct")
    # a prompt whose text answer has several objects (file voxel order: answers are in the input's geometry)
    for prompt in ("lesion", "liver", "spleen", "kidney", "aorta", "lung", "bone", "stomach"):
        text = v1(url, path, [prompt])[prompt]
        objects, count = ndimage.label(text, structure=np.ones((3, 3, 3)))
        if count >= 2:
            break
    assert count >= 2, "the test needs several objects to pick one"
    sizes = ndimage.sum(text, objects, range(1, count + 1))
    chosen = int(np.argsort(sizes)[-2]) + 1  # not the largest: picking the right one matters
    click = [int(v) for v in np.argwhere(objects == chosen)[0]]
    result, params = client.infer("a-interactive", "ct", {"label": prompt, "foreground": [click]})
    kept = np.asanyarray(nib.load(result).dataobj)
    assert params["label_names"] == {prompt: 1}
    assert np.array_equal(kept == 1, objects == chosen)
    result, _ = client.infer("a-interactive", "ct", {"label": prompt, "background": [click]})
    assert np.array_equal(np.asanyarray(nib.load(result).dataobj) == 1, text & (objects != chosen))
    lo, hi = np.argwhere(text).min(0), np.argwhere(text).max(0)
    roi = [int(lo[0]), int((lo[0] + hi[0]) // 2), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])]
    result, _ = client.infer("a-interactive", "ct", {"label": prompt, "roi": roi})
    inside = np.zeros(text.shape, bool)
    inside[roi[0]:roi[1] + 1, roi[2]:roi[3] + 1, roi[4]:roi[5] + 1] = True
    answer = np.asanyarray(nib.load(result).dataobj) == 1
    assert answer.any() and not (answer & ~inside).any()


def test_an_roi_seeds_propagation_on_a_tracker_model(client, url, clip_trained, tmp_path):
    """mode=propagate on the video checkpoint: the ROI becomes a box seeded on its middle slice,
    the same answer as /v1's propagate with that box (test_serve: = predict)."""
    data, spacing = ct_volume("CT_Lesion_000009_03_01_036-048.npz", slice(0, 10))
    path = tmp_path / "lesion.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([*spacing, 1.0])), path)  # RAS: display = flipped x, y
    gts = load_recist("CT_Lesion_000009_03_01_036-048.npz")["gts"][:10].transpose(2, 1, 0)
    lo, hi = np.argwhere(gts).min(0), np.argwhere(gts).max(0)
    roi = [int(lo[0]) - 3, int(hi[0]) + 3, int(lo[1]) - 3, int(hi[1]) + 3, int(lo[2]), int(hi[2])]
    trained = sorted(json.loads((clip_trained[1] / "medsam3_export.json").read_text())["prompts"])
    result, params = client.infer("v-interactive", "x", {"label": trained[0], "roi": roi, "mode": "propagate"},
                                  file=str(path))
    answer = np.asanyarray(nib.load(result).dataobj) == 1
    nx, ny = data.shape[:2]
    box = f"{nx - 1 - roi[1]},{ny - 1 - roi[3]},{nx - roi[0]},{ny - roi[2]}@z={(roi[4] + roi[5] + 1) // 2}"
    expected = v1(url, path, [trained[0]], box=[box], mode="propagate", model="v")[trained[0]]
    inside = np.zeros(answer.shape, bool)
    inside[roi[0]:roi[1] + 1, roi[2]:roi[3] + 1, roi[4]:roi[5] + 1] = True
    assert answer.any() and np.array_equal(answer, expected & inside)


def test_clicks_seed_the_tracker_on_a_tracker_model(client, clip_trained, tmp_path):
    """mode=propagate, clicks only: SAM's point prompts seed the tracker on the clicked slice of a
    file stored in LPS order, the same masks as the library seeded at those plane pixels (the
    connected object holding the click kept), which finds the lesion; a click off it keeps nothing
    of it. (This overfitted tracker memorised its lesion: that clicks move its seed is checked
    on a random tracker in test_video.)"""
    from medsam3.inference import Segmenter, inference_config
    from medsam3.io.scan import read_scan
    from medsam3.metrics import dice

    name = "CT_Lesion_000009_03_01_036-048.npz"
    path = lps_nifti(tmp_path / "lesion.nii.gz", name)
    gts = load_recist(name)["gts"][2:10].transpose(2, 1, 0) > 0  # the file's voxel order
    z = int(np.argmax(gts.sum((0, 1))))
    i, j = np.argwhere(gts[..., z]).mean(0).round().astype(int)
    label = sorted(json.loads((clip_trained[1] / "medsam3_export.json").read_text())["prompts"])[0]
    answers = []
    for click in ([int(i), int(j), z], [20, 20, z]):
        result, _ = client.infer("v-interactive", "x", {"label": label, "foreground": [click],
                                                        "background": [[2, 2, z]], "mode": "propagate"},
                                 file=str(path))
        answers.append(np.asanyarray(nib.load(result).dataobj) == 1)
    # LPS storage: the display planes (RAS flipped in x and y) are the file's own (i, j)
    segmenter = Segmenter(clip_trained[1], inference_config([f"threshold={THRESHOLD}"]))
    case = read_scan(path).case
    seed = [[i + 0.5, j + 0.5, 1], [2.5, 2.5, 0]]
    mask = segmenter.segment(case, [label], mode="propagate", clicks=[(seed, z)])[0].mask[::-1, ::-1]
    objects, _ = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    expected = objects == objects[i, j, z]
    assert objects[i, j, z] and np.mean(answers[0] != expected) <= 1e-3
    assert dice(answers[0], gts) > 0.7 and not (answers[1] & answers[0]).any()


def test_concurrent_sessions_with_different_scans_get_their_own_answers(url, tmp_path):
    paths = [lps_nifti(tmp_path / f"{i}.nii.gz", name) for i, name in enumerate(
        ["CT_Lesion_000009_03_01_036-048.npz", None])]
    expected = [v1(url, p, ["lesion"])["lesion"] for p in paths]
    # the two answers differ by several times the tolerance below (0.7 % of the voxels), so a
    # swapped answer cannot pass
    assert np.mean(expected[0] != expected[1]) > 5 * 1e-3

    def one(i: int):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / f"c{i}"))
        (tmp_path / f"c{i}").mkdir()
        client.update_auth(TOKEN)
        session = client.create_session(str(paths[i % 2]))["session_id"]
        result, _ = client.infer("a-interactive", "", {"label": "lesion"}, session_id=session)
        return i % 2, np.asanyarray(nib.load(result).dataobj) == 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        for which, mask in pool.map(one, range(8)):
            assert np.mean(mask != expected[which]) <= 1e-3, f"scan {which} got another scan's answer"


def test_bad_requests_get_clear_answers_and_keys_keep_images_apart(client, url, tmp_path):
    path = lps_nifti(tmp_path / "ct.nii.gz")
    client.upload_image(str(path), "mine")
    other = MONAILabelClient(url, tmpdir=str(tmp_path))
    other.update_auth({"token_type": "bearer", "access_token": OTHER_KEY})
    assert "mine" not in other.datastore()["objects"] and "mine" in client.datastore()["objects"]
    with pytest.raises(MONAILabelClientException) as hidden:
        other.infer("a", "mine", {"labels": ["liver"]})
    assert "404" in hidden.value.msg
    detached = tmp_path / "detached.nrrd"
    detached.write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                        "data file: /etc/passwd\n\n")
    bomb = tmp_path / "bomb.nrrd"
    bomb.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 8 8 8\nencoding: gzip\n\n"
                     + gzip.compress(b"\0" * 2**20))
    auth = {"Authorization": f"Bearer {KEY}"}

    def infer(model="a", params='{"labels": ["liver"]}', file=None, query=""):
        files = {"file": (file.name, file.read_bytes())} if file else None
        return requests.post(f"{url}/infer/{model}?image=mine{query}", data={"params": params}, files=files,
                             headers=auth, timeout=60)

    cases = [
        (infer(model="nope"), 404, "unknown model"),
        (infer(params="{not json"), 422, "params is not JSON"),
        (infer(params=json.dumps({"labels": [f"p{i}" for i in range(20)]})), 422, "at most"),
        (infer(model="a-interactive", params=json.dumps({"label": "x", "foreground": [[999, 0, 0]]})), 422,
         "outside the image"),
        (infer(params="{}"), 422, "name the ones to segment"),  # 90 vocabulary labels by default
        (infer(params=json.dumps({"labels": "liver", "result_extension": ".dcm"})), 422, "DICOM series"),
        (infer(params=json.dumps({"labels": "liver", "mode": "propagate"})), 422, "no tracker"),
        (infer(query="&output=svg"), 422, "output"),
        (infer(file=detached), 422, "detached"),
        (infer(file=bomb), 422, "inflates beyond"),
        (requests.post(f"{url}/infer/a?image=gone", data={"params": '{"labels": "liver"}'}, headers=auth,
                       timeout=30), 404,
         "not found"),
        (requests.get(f"{url}/info/", timeout=30), 401, "API key"),
        (requests.put(f"{url}/datastore/?image=x", files={"file": ("x.txt", b"hello")}, headers=auth,
                      timeout=30), 415, "unsupported file type"),
    ]
    for answer, status, message in cases:
        assert answer.status_code == status and message in answer.json()["detail"], answer.text
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200


def test_the_store_forgets_each_keys_least_recently_used(tmp_path):
    """Unit: the image store's eviction by age, by size and per key, and ids never become paths."""
    from serve.monailabel import ImageStore, ProtocolError

    store = ImageStore(tmp_path / "store", max_bytes=2500, ttl_s=3600)
    for name in ("a", "b", "../../c"):
        upload = tmp_path / f"{name.replace('/', '_')}.nii"
        upload.write_bytes(b"x" * 1000)
        store.put("k", "datastore", name, upload, {})
        store.get("k", "datastore", "a")  # a stays recently used
    assert [m["id"] for m in store.entries("k", "datastore")].count("b") == 0
    assert {m["id"] for m in store.entries("k", "datastore")} == {"a", "../../c"}
    assert all(p.is_relative_to(tmp_path / "store") for p in (tmp_path / "store").rglob("*"))
    # each key has its share: a key's uploads push out its own images, never another key's
    shared = ImageStore(tmp_path / "shared", max_bytes=3500, ttl_s=3600, key_bytes=2000)
    for space, name in [("k1", "a"), ("k2", "b"), ("k1", "c"), ("k1", "d"), ("k1", "e")]:
        upload = tmp_path / f"{space}-{name}.nii"
        upload.write_bytes(b"x" * 1000)
        shared.put(space, "datastore", name, upload, {})
    assert [m["id"] for m in shared.entries("k2", "datastore")] == ["b"]
    assert [m["id"] for m in shared.entries("k1", "datastore")] == ["d", "e"]
    # a third key finds the store full of others' images: refused, and nothing of theirs goes
    upload = tmp_path / "k3-g.nii"
    upload.write_bytes(b"x" * 1000)
    with pytest.raises(ProtocolError, match="full with other keys' images") as refused:
        shared.put("k3", "datastore", "g", upload, {})
    assert refused.value.status == 507 and upload.exists()
    assert len(shared.entries("k1", "datastore")) + len(shared.entries("k2", "datastore")) == 3
    short = ImageStore(tmp_path / "short", max_bytes=10**6, ttl_s=0)
    upload = tmp_path / "d.nii"
    upload.write_bytes(b"y")
    short.put("k", "session", "d", upload, {})
    assert short.get("k", "session", "d") is None
    shutil.rmtree(tmp_path / "short")


def test_the_page_shows_what_a_viewer_lists(url, tmp_path):
    """The page's "3D Slicer / OHIF" panel lists /info's models and labels (its screenshot is in
    the README: MEDSAM3_SCREENSHOT_DIR=docs/images keeps it)."""
    import os

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(url + "/")
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        page.click("#viewers summary")
        page.wait_for_selector("#mlmodels tr", timeout=30_000)
        # Cells' text, not the row's innerText: innerText's tabs depend on layout (flaky in CI).
        rows = page.eval_on_selector_all(
            "#mlmodels tr", "rows => rows.map(r => Array.from(r.cells, c => c.textContent))")
        assert page.inner_text("#server") == url
        folder = Path(os.environ.get("MEDSAM3_SCREENSHOT_DIR", tmp_path))
        page.locator("#viewers").screenshot(path=str(folder / "viewers.png"))
        browser.close()
    assert [r[:2] for r in rows] == [["a", "segmentation"], ["a-interactive", "deepgrow"],
                                     ["v", "segmentation"], ["v-interactive", "deepgrow"]]
    assert "liver (" in " ".join(rows[0]) and (folder / "viewers.png").stat().st_size > 5000
