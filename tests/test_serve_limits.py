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
from medsam3.io.scan import declared_shape
from serve.guard import ApiKeys, AuthError, IngressGuard
from serve.limits import BodyLimit, Budget
from serve.uploads import UploadError, ZipLimits, store_upload
from tests.builders import SAMMED2D, big_png, load_recist, nifti_claiming, uint8_to_hu, write_ct_series, zip_bomb

MB = 2**20


# --- declared shapes -------------------------------------------------------------------------

def test_declared_shapes_come_from_headers_without_decoding(tmp_path):
    started = time.perf_counter()
    assert declared_shape(big_png(tmp_path / "huge.png", 30000, 30000)) == (30000, 30000)
    assert declared_shape(nifti_claiming(tmp_path / "huge.nii.gz", (2000, 2000, 2000))) == (2000, 2000, 2000)
    assert time.perf_counter() - started < 30  # the PNG's 900 MB of pixels are never decoded
    assert declared_shape(SAMMED2D / "images" / "amos_0004_75.png") == (512, 512)
    recist = load_recist()
    np.savez_compressed(tmp_path / "CT_case.npz", imgs=recist["imgs"][:5], gts=recist["gts"][:5])
    assert declared_shape(tmp_path / "CT_case.npz") == (5, *recist["imgs"].shape[1:])
    write_ct_series(tmp_path / "series", uint8_to_hu(recist["imgs"][:4]), recist["spacing"])
    assert declared_shape(tmp_path / "series") == (*recist["imgs"].shape[1:], 4)


def test_bad_headers_name_the_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    np.savez(tmp_path / "odd.npz", imgs=np.zeros((2, 2)), gts=np.zeros((50, 50)))
    for path, message in [(tmp_path / "bad.png", "bad.png: not a PNG"), (tmp_path / "odd.npz", "larger than imgs")]:
        with pytest.raises(CaseError, match=message):
            declared_shape(path)


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


def call(middleware, headers: list[tuple[bytes, bytes]], chunks: int, chunk: int = MB):
    """Run one POST through ``middleware``; returns (status, body, chunks read from the client)."""
    sent, pulled = [], {"n": 0}

    async def receive():
        pulled["n"] += 1
        return {"type": "http.request", "body": b"x" * chunk, "more_body": pulled["n"] < chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/segment", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, pulled["n"]


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
