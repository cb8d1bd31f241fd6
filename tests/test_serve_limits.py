"""The endpoint's guards without a server: body limits while a body streams in, declared shapes
read from headers only, zip extraction limits, and API keys. (test_serve drives them over HTTP.)"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
import zipfile

import numpy as np
import pytest

from medsam3.io.case import CaseError
from medsam3.io.declared import declared
from medsam3.io.nifti import load_canonical
from serve.guard import ApiKeys, AuthError, IngressGuard
from serve.limits import BodyLimit, Budget, BudgetTimeout
from serve.uploads import UploadError, ZipLimits, store_upload
from tests.builders import (
    SAMMED2D,
    big_png,
    dicom_claiming,
    load_recist,
    nifti_4d_zeros,
    nifti_claiming,
    npz_of,
    uint8_to_hu,
    write_ct_series,
    zip_bomb,
)

MB = 2**20


# --- declared sizes --------------------------------------------------------------------------

def test_declared_shapes_come_from_headers_without_decoding(tmp_path):
    started = time.perf_counter()
    assert declared(big_png(tmp_path / "huge.png", 30000, 30000)) == ((30000, 30000), 30000 * 30000)
    assert declared(nifti_claiming(tmp_path / "huge.nii.gz", (2000, 2000, 2000))) == ((2000,) * 3, 2 * 2000**3)
    assert time.perf_counter() - started < 30  # the PNG's 900 MB of pixels are never decoded
    assert declared(SAMMED2D / "images" / "amos_0004_75.png").shape == (512, 512)
    recist = load_recist()
    np.savez_compressed(tmp_path / "CT_case.npz", imgs=recist["imgs"][:5], gts=recist["gts"][:5])
    size = declared(tmp_path / "CT_case.npz")
    assert size.shape == (5, *recist["imgs"].shape[1:])
    assert size.decoded_bytes == recist["imgs"][:5].nbytes + recist["gts"][:5].nbytes
    write_ct_series(tmp_path / "series", uint8_to_hu(recist["imgs"][:4]), recist["spacing"])
    size = declared(tmp_path / "series")
    assert size.shape == (*recist["imgs"].shape[1:], 4) and size.decoded_bytes == size.voxels * (2 + 4)


def test_declared_bytes_count_every_axis_channel_and_type(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((40, 30), np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.zeros((40, 30, 4), np.uint8)).save(tmp_path / "rgba.png")  # read as an RGB copy too
    assert declared(tmp_path / "rgb.png") == ((40, 30), 40 * 30 * 3)
    assert declared(tmp_path / "deep.png").decoded_bytes >= 40 * 30 * 2
    assert declared(tmp_path / "rgba.png").decoded_bytes == 40 * 30 * (4 + 3)
    np.savez(tmp_path / "f64.npz", imgs=np.zeros((3, 8, 8)), gts=np.zeros((3, 8, 8), np.uint8))
    assert declared(tmp_path / "f64.npz") == ((3, 8, 8), 3 * 64 * (8 + 1))
    # a multi-frame DICOM: every frame, its bits allocated and the float32 volume built from it
    multi = declared(dicom_claiming(tmp_path / "multi", 64, 48, 30, bits=32))
    assert multi == ((64, 48, 30), 64 * 48 * 30 * (4 + 4))


def test_a_4d_volume_is_refused_or_read_one_channel_without_decoding_the_rest(tmp_path):
    import tracemalloc

    small = nifti_4d_zeros(tmp_path / "small4d.nii.gz", (32, 32, 16, 6))
    with pytest.raises(CaseError, match=r"4D volume \(32, 32, 16, 6\) and no channel configured"):
        declared(small)
    with pytest.raises(CaseError, match="channel 6 out of range"):
        declared(small, channel=6)
    assert declared(small, channel=2) == ((32, 32, 16), 32 * 32 * 16 * 2)
    # a huge fourth axis in a small gzip: refused from the header (the data is not even there)
    claiming = nifti_claiming(tmp_path / "huge4d.nii.gz", (256, 256, 64, 512))
    assert claiming.stat().st_size < 64 * 1024
    with pytest.raises(CaseError, match="4D volume"):
        declared(claiming)
    # with a channel, the reader takes that channel alone through nibabel's proxy
    big = nifti_4d_zeros(tmp_path / "big4d.nii.gz", (64, 64, 32, 64))
    tracemalloc.start()
    image, _, _, scale = load_canonical(big, channel=5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.shape == (64, 64, 32) and image.dtype == np.int16 and scale == (1.0, 0.0)
    assert peak < 4 * image.nbytes < 64 * 64 * 32 * 64 * 2 / 8, peak


@pytest.mark.parametrize("imgs", [np.zeros(256, dtype="V4096"), np.zeros((8, 8), dtype=[("a", "f4"), ("b", "i2")]),
                                  np.array([{"a": 1}, None], dtype=object), np.array(["x" * 64] * 8)],
                         ids=["void", "structured", "object", "string"])
def test_an_npz_of_anything_but_numbers_is_refused_from_its_header(tmp_path, imgs):
    path = npz_of(tmp_path / "odd.npz", imgs)
    with pytest.raises(CaseError, match=r"odd.npz: array 'imgs' has dtype .*; numbers are expected"):
        declared(path)


def test_a_colour_dicom_and_unread_nifti_types_are_refused_from_the_header(tmp_path):
    import nibabel as nib

    with pytest.raises(CaseError, match="colour DICOM series .3 samples per pixel"):
        declared(dicom_claiming(tmp_path / "rgb", 512, 512, 4, samples=3))
    header = nib.Nifti1Header()
    header.set_data_dtype("RGB")
    header.set_data_shape((8, 8, 8))
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), header.get_data_dtype()), np.eye(4), header), tmp_path / "rgb.nii")
    with pytest.raises(CaseError, match="rgb.nii: NIfTI data type .* is not a number type"):
        declared(tmp_path / "rgb.nii")


def test_bad_headers_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    np.savez(tmp_path / "odd.npz", imgs=np.zeros((2, 2)), gts=np.zeros((50, 50)))
    for path, message in [(tmp_path / "bad.png", "bad.png: not a PNG"), (tmp_path / "odd.npz", "larger than imgs")]:
        with pytest.raises(CaseError, match=message):
            declared(path)


# --- zip extraction --------------------------------------------------------------------------

def test_a_zip_bomb_stops_at_the_ratio_limit_in_chunks(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 2 * MB
    (tmp_path / "out").mkdir()
    started = time.perf_counter()
    with pytest.raises(UploadError) as error, open(bomb, "rb") as source:
        store_upload(source, "series.zip", tmp_path / "out")
    assert error.value.status == 413 and "ratio" in str(error.value)
    assert time.perf_counter() - started < 10
    written = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*") if f.is_file())
    assert written <= 100 * bomb.stat().st_size + MB  # stopped at the ratio, not at 1 GiB


def test_the_total_unzipped_size_is_capped(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for k in range(4):  # incompressible: only the total can stop it
            archive.writestr(f"{k}.dcm", rng.bytes(MB))
    (tmp_path / "out").mkdir()
    with pytest.raises(UploadError, match="at most 3145728 bytes") as error:
        store_upload(io.BytesIO(buffer.getvalue()), "s.zip", tmp_path / "out", ZipLimits(max_bytes=3 * MB))
    assert error.value.status == 413


# --- the body limit, as an ASGI middleware -----------------------------------------------------

class Recorder:
    """An ASGI app that reads the whole body (as a form parser does) and answers 200."""

    def __init__(self):
        self.received = 0

    async def __call__(self, scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")  # as Starlette's ClientDisconnect
            self.received += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


async def exchange(middleware, headers: list[tuple[bytes, bytes]], receive, method: str = "POST",
                   path: str = "/v1/segment", root_path: str = "") -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through ``middleware`` → (status, response headers, body)."""
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": headers}
    await middleware(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start.get("headers") or []), body


def call(middleware, headers: list[tuple[bytes, bytes]], chunks: int, chunk: int = MB, **scope):
    """Run one POST of ``chunks`` chunks through ``middleware``; returns (status, body, chunks read
    from the client)."""
    pulled = {"n": 0}

    async def receive():
        pulled["n"] += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": pulled["n"] < chunks}

    status, _, body = asyncio.run(exchange(middleware, headers, receive, **scope))
    return status, body, pulled["n"]


def trickle(chunks: int, every_s: float):
    """A client sending ``chunks`` 1 MB chunks, one every ``every_s`` seconds."""
    pulled = {"n": 0}

    async def receive():
        if pulled["n"] >= chunks:
            await asyncio.sleep(3600)  # the body is done: the client only waits for the answer
        pulled["n"] += 1
        await asyncio.sleep(every_s)
        return {"type": "http.request", "body": b"x" * MB, "more_body": pulled["n"] < chunks}

    return receive


CHUNKED = [(b"transfer-encoding", b"chunked")]


def test_a_chunked_body_is_cut_as_soon_as_it_passes_the_limit():
    app = Recorder()
    status, body, pulled = call(BodyLimit(app, 4 * MB), [], chunks=600)
    assert status == 413 and "exceeds the limit" in json.loads(body)["detail"]
    assert pulled == 5 and app.received == 4 * MB  # the fifth chunk passed it; nothing more was read


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    app = Recorder()
    status, _, pulled = call(BodyLimit(app, 4 * MB), [(b"content-length", str(600 * MB).encode())], chunks=600)
    assert status == 413 and pulled == 0


def test_a_body_within_the_limit_passes_untouched():
    app = Recorder()
    assert call(BodyLimit(app, 4 * MB), [(b"content-length", str(3 * MB).encode())], chunks=3)[:2] == (200, b"ok")
    assert app.received == 3 * MB


def test_the_budget_makes_requests_wait_for_room():
    async def scenario():
        budget, order = Budget(10), []

        async def request(name, size, hold):
            async with budget.hold(size):
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        await asyncio.gather(request("a", 6, 0.05), request("b", 6, 0.0), request("c", 4, 0.0))
        return order, budget.free

    order, free = asyncio.run(scenario())
    assert order.index("b+") > order.index("a-")  # b did not fit beside a
    assert order.index("c+") < order.index("a-") and free == 10  # c did


def test_a_full_budget_answers_503_with_retry_after_by_its_deadline():
    """Uploads trickling in hold the budget (a chunked body reserves the whole limit); a request
    that finds no room waits at most ``wait_s``; one without a body holds nothing."""
    limit = BodyLimit(Recorder(), 4 * MB, budget_bytes=4 * MB, where="proxy", wait_s=0.3)

    async def scenario():
        slow = asyncio.create_task(exchange(limit, CHUNKED, trickle(4, 0.4)))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        refused = await exchange(limit, [(b"content-length", str(MB).encode())], trickle(1, 0))
        waited = asyncio.get_running_loop().time() - started
        bodiless = await exchange(limit, [], trickle(1, 0), method="GET", path="/healthz")
        return await slow, refused, waited, bodiless, await exchange(limit, CHUNKED, trickle(2, 0))

    slow, refused, waited, bodiless, later = asyncio.run(scenario())
    assert slow[0] == 200 and bodiless[0] == 200 and later[0] == 200
    status, headers, body = refused
    assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"x-medsam3-limit"] == b"proxy"
    assert "retry" in json.loads(body)["detail"] and 0.3 <= waited < 1.2


def test_a_body_that_stops_arriving_is_answered_408():
    app = Recorder()
    limit = BodyLimit(app, 4 * MB, budget_bytes=8 * MB, idle_s=0.3)

    async def stalls():
        if app.received:
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": b"x" * MB, "more_body": True}

    started = time.perf_counter()
    status, headers, body = asyncio.run(exchange(limit, CHUNKED, stalls))
    assert status == 408 and "stopped arriving" in json.loads(body)["detail"]
    assert headers[b"x-medsam3-limit"] == b"ingress"
    assert time.perf_counter() - started < 2 and limit.budget.free == limit.budget.total


def test_any_method_with_a_body_is_limited():
    status, _, pulled = call(BodyLimit(Recorder(), 4 * MB), CHUNKED, chunks=600, method="GET", path="/healthz")
    assert status == 413 and pulled == 5


def test_the_budget_refuses_after_its_deadline():
    async def scenario():
        budget = Budget(10)
        async with budget.hold(8):
            with pytest.raises(BudgetTimeout):
                async with budget.hold(4, timeout=0.1):
                    pass
        async with budget.hold(4, timeout=0.1):
            return budget.free

    assert asyncio.run(scenario()) == 6


# --- API keys ---------------------------------------------------------------------------------

def test_api_keys_from_a_file_and_the_environment(tmp_path, monkeypatch):
    digest = hashlib.sha256(b"stored-as-digest").hexdigest()
    (tmp_path / "keys").write_text(f"# hospital keys\nplain-key-1\nsha256:{digest}\n")
    monkeypatch.setenv("TEST_KEYS", "env-key-1, env-key-2")
    keys = ApiKeys.from_settings({"api_keys_file": str(tmp_path / "keys"), "api_keys_env": "TEST_KEYS"})
    for good in ("plain-key-1", "stored-as-digest", "env-key-2"):
        assert keys.allows(f"Bearer {good}")
    for bad in (None, "", "Bearer", "Bearer ", "Bearer wrong", "Basic plain-key-1", "plain-key-1",
                f"Bearer sha256:{digest}"):
        assert not keys.allows(bad)
    assert ApiKeys.from_settings({}) is None and ApiKeys.from_settings({"api_keys_file": None}) is None
    monkeypatch.delenv("TEST_KEYS")
    with pytest.raises(AuthError, match="TEST_KEYS"):
        ApiKeys.from_settings({"api_keys_env": "TEST_KEYS"})
    with pytest.raises(AuthError, match="not a file"):
        ApiKeys.from_settings({"api_keys_file": str(tmp_path / "missing")})


def test_the_guard_refuses_a_missing_key_before_the_body(monkeypatch):
    monkeypatch.setenv("TEST_KEYS", "k1")
    monkeypatch.setattr(IngressGuard, "keys", ApiKeys.from_settings({"api_keys_env": "TEST_KEYS"}))
    app = Recorder()
    status, body, pulled = call(IngressGuard(app), [], chunks=3)
    assert status == 401 and pulled == 0 and "API key" in json.loads(body)["detail"]
    assert call(IngressGuard(app), [(b"authorization", b"Bearer k1")], chunks=3)[0] == 200
    # mounted under a route prefix (Serve passes the full path and the prefix as root_path)
    for path in ("/m/v1/segment", "/m/info/", "/m/datastore/"):
        assert call(IngressGuard(app), [], chunks=1, path=path, root_path="/m")[0] == 401, path
    assert call(IngressGuard(app), [], chunks=1, path="/m/healthz", root_path="/m")[0] == 200
    # two Authorization headers: refused even when one of them holds the key
    two = [(b"authorization", b"Bearer k1"), (b"authorization", b"Bearer other")]
    for headers in (two, two[::-1]):
        status, body, pulled = call(IngressGuard(app), headers, chunks=1)
        assert status == 400 and pulled == 0 and "more than one Authorization" in json.loads(body)["detail"]
