"""LoRA adapters at inference (medsam3.adapters): switched per call over one base model, loaded
on first use and evicted least-recently-used, the base weights untouched; bad folders refused."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from medsam3.adapters import WEIGHTS, AdapterError, check_adapter, check_adapters
from medsam3.cli import main
from medsam3.inference import Segmenter, inference_config
from medsam3.io.scan import read_scan
from pipelines.predict import PredictError, run_predict
from tests.builders import SAMMED2D, lora_adapter

PNG = SAMMED2D / "images" / "amos_0004_75.png"
CFG = ["threshold=0.2535"]  # random tiny SAM3: partial masks (see test_predict)


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: lora_adapter(tiny_checkpoint, root / name, seed) for name, seed in (("A", 1), ("B", 2))}


def liver(segmenter: Segmenter, adapter: str | None = None) -> np.ndarray:
    return segmenter.segment(read_scan(PNG).case, ["liver"], adapter=adapter)[0].mask


def test_adapters_switch_and_evict_over_an_untouched_base(tiny_checkpoint, adapters):
    segmenter = Segmenter(tiny_checkpoint, inference_config(CFG), adapters=adapters, max_adapters=1)
    base_params = {name: (param, param.detach().clone()) for name, param in segmenter.model.named_parameters()}
    base = liver(segmenter)
    a = liver(segmenter, "A")
    assert list(segmenter.adapters.loaded) == ["A"]
    b = liver(segmenter, "B")  # max_adapters=1: B evicts A
    assert list(segmenter.adapters.loaded) == ["B"] and list(segmenter.adapters.peft.peft_config) == ["B"]
    assert np.array_equal(liver(segmenter), base)  # the base between adapters
    assert np.array_equal(liver(segmenter, "A"), a)  # A again, from disk
    assert list(segmenter.adapters.loaded) == ["A"]
    assert np.array_equal(liver(segmenter), base)
    # each adapter changes the masks, each differently (a wrong adapter would show)
    assert min(np.mean(a != base), np.mean(b != base), np.mean(a != b)) > 0.01, "adapters change too little"
    assert a.any() and b.any()
    # the base model: the same parameter objects (peft wrapped them in place, copied nothing), bit-identical
    current = {id(p) for p in segmenter.model.parameters()}
    for name, (param, before) in base_params.items():
        assert id(param) in current and torch.equal(param, before), name
    # and a Segmenter that never saw an adapter gives the same base answer
    assert np.array_equal(liver(Segmenter(tiny_checkpoint, inference_config(CFG))), base)


def test_concurrent_calls_each_get_their_adapter(tiny_checkpoint, adapters):
    """Threads (serve's replicas run model calls with asyncio.to_thread) asking for the base and
    two adapters at once each get what they get alone."""
    segmenter = Segmenter(tiny_checkpoint, inference_config(CFG), adapters=adapters)
    alone = {name: liver(segmenter, name) for name in (None, "A", "B")}
    order = [None, "A", "B"] * 4
    with ThreadPoolExecutor(max_workers=6) as pool:
        masks = list(pool.map(lambda name: liver(segmenter, name), order))
    for name, mask in zip(order, masks, strict=True):
        assert np.array_equal(mask, alone[name]), name


def test_predict_with_an_adapter_equals_the_segmenter(tiny_checkpoint, adapters, tmp_path):
    assert main(["predict", str(PNG), "--prompt", "liver", "--checkpoint", str(tiny_checkpoint), "--adapter",
                 str(adapters["A"]), "--out", str(tmp_path / "p"), *CFG]) == 0
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    segmenter = Segmenter(tiny_checkpoint, inference_config(CFG), adapters={"A": adapters["A"]})
    assert summary["adapter"] == "A" and summary["prompts"][0]["pixels"] == liver(segmenter, "A").sum()
    with pytest.raises(AdapterError, match="without adapters"):
        liver(Segmenter(tiny_checkpoint, inference_config(CFG)), "A")
    with pytest.raises(AdapterError, match="unknown adapter 'C'"):
        liver(segmenter, "C")


def test_bad_adapter_folders_are_refused(tiny_checkpoint, adapters, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match=f"adapter {empty}: no adapter_config.json"):
        check_adapter(empty)
    with pytest.raises(AdapterError, match="not a directory"):
        check_adapter(tmp_path / "missing")
    ia3 = shutil.copytree(adapters["A"], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3'; only LORA"):
        check_adapter(ia3)
    weightless = shutil.copytree(adapters["A"], tmp_path / "weightless")
    (weightless / WEIGHTS).unlink()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        check_adapter(weightless)
    # adapters made for another base: a tensor of another shape, a module the base does not have
    assert set(check_adapters(adapters, tiny_checkpoint)) == {"A", "B"}
    for name, change in (("wider", "shape"), ("foreign", "module")):
        folder = shutil.copytree(adapters["A"], tmp_path / name)
        tensors = load_file(folder / WEIGHTS)
        key = next(k for k in tensors if "lora_A" in k)
        if change == "shape":
            tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)
        else:
            tensors[key.replace(".model.", ".model.elsewhere.", 1)] = tensors.pop(key)
        save_file(tensors, folder / WEIGHTS)
        with pytest.raises(AdapterError, match=f"adapter '{name}' .* does not fit the base model"):
            check_adapters({name: folder}, tiny_checkpoint)
    # predict refuses it with the message; a Segmenter that failed to load one still answers
    with pytest.raises(PredictError, match="does not fit"):
        run_predict(PNG, ["liver"], tiny_checkpoint, tmp_path / "p", inference_config(CFG), progress=False,
                    adapter=tmp_path / "wider")
    segmenter = Segmenter(tiny_checkpoint, inference_config(CFG), adapters={"wider": tmp_path / "wider", **adapters})
    with pytest.raises(AdapterError, match="does not fit"):
        liver(segmenter, "wider")
    assert np.array_equal(liver(segmenter, "A"), liver(Segmenter(tiny_checkpoint, inference_config(CFG),
                                                                 adapters=adapters), "A"))


def test_an_adapter_trained_on_other_pixels_gets_its_own_and_dotted_names_are_refused(
        tiny_checkpoint, adapters, tmp_path):
    from medsam3.config import load_config
    from medsam3.plans import Plans

    own = shutil.copytree(adapters["A"], tmp_path / "site.v2")
    Plans.from_prepare_config(load_config("prepare", ["image_size=512"])).save(own)  # as its run's export carries
    segmenter = Segmenter(tiny_checkpoint, inference_config(CFG), adapters={"own": own, **adapters})
    assert segmenter.prep_of("own").square == 512 and segmenter.prep_of("A") is segmenter.prep
    assert segmenter.prep.square != 512
    assert liver(segmenter, "own").shape == liver(segmenter, "A").shape  # masks in the image's own geometry
    with pytest.raises(AdapterError, match="without '.'"):
        Segmenter(tiny_checkpoint, inference_config(CFG), adapters={"site.v2": own})
    # predict names an adapter after its folder: a dotted folder still works
    assert main(["predict", str(PNG), "--prompt", "liver", "--checkpoint", str(tiny_checkpoint), "--adapter",
                 str(own), "--out", str(tmp_path / "p"), *CFG]) == 0
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["adapter"] == "site_v2"
