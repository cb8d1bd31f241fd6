"""LoRA adapters at inference: many adapters over one base SAM3, switched per call, with peft.

An adapter folder is what peft's ``PeftModel.save_pretrained`` writes (``adapter_config.json`` +
``adapter_model.safetensors``) for transformers' ``Sam3Model`` (the detector; module names relative
to it). :class:`AdapterSet` wraps a loaded base in a ``PeftModel`` only when the first adapter is
needed: peft injects the LoRA layers in place into the base's linears, so every call through the
original ``Sam3Model`` object (``get_vision_features``, ``forward``, a video model's detector) goes
through them, and loading an adapter never reloads or copies the base weights. The base is the
model with the adapter layers disabled. Every model call goes through :meth:`AdapterSet.using`,
which switches only when the adapter asked for differs from the last one.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from medsam3.io import storage
from medsam3.model import CheckpointError, check_checkpoint

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """An adapter folder is missing, is not a LoRA adapter, or does not fit its base model."""


def check_adapter(path: str | os.PathLike) -> Path:
    """The local folder of a LoRA adapter (an ``s3://`` one is fetched into the cache); a folder
    that is not one is refused, naming it and the problem."""
    try:
        folder = storage.local_copy(path)
    except (OSError, FileNotFoundError) as exc:
        raise AdapterError(f"adapter {path}: {exc}") from exc
    if not folder.is_dir():
        raise AdapterError(f"adapter {folder}: not a directory")
    if not (folder / CONFIG).is_file():
        raise AdapterError(f"adapter {folder}: no {CONFIG}; not a peft adapter folder "
                           "(what PeftModel.save_pretrained or `medsam3 export` of a LoRA run writes)")
    try:
        peft_type = json.loads((folder / CONFIG).read_text()).get("peft_type")
    except (ValueError, AttributeError) as exc:
        raise AdapterError(f"adapter {folder}: {CONFIG} is not a JSON object ({exc})") from exc
    if peft_type != "LORA":
        raise AdapterError(f"adapter {folder}: {CONFIG} has peft_type {peft_type!r}; only LORA adapters are served")
    if not (folder / WEIGHTS).is_file():
        raise AdapterError(f"adapter {folder}: no {WEIGHTS} (the adapter's weights)")
    return folder


class AdapterSet:
    """Named LoRA adapters over one base model (already loaded), at most ``max_adapters`` of
    them in memory (least recently used evicted), one active at a time.

    Model calls run inside :meth:`using`, which holds a lock: calls of several threads (serve's
    replicas run model calls off the event loop) are serialised, so no call sees another's adapter.
    """

    def __init__(self, model: torch.nn.Module, adapters: Mapping[str, str | os.PathLike], max_adapters: int = 8):
        if int(max_adapters) < 1:
            raise ValueError(f"max_adapters={max_adapters}: at least 1")
        self.model = model
        dotted = [str(name) for name in adapters if "." in str(name) or not str(name)]
        if dotted:  # peft keeps adapters in a ModuleDict, whose keys cannot hold a "."
            raise AdapterError(f"adapter name(s) {', '.join(map(repr, dotted))}: use a name without '.' "
                               "(NAME=DIR)")
        self.paths = {str(name): check_adapter(path) for name, path in adapters.items()}
        self.max_adapters = int(max_adapters)
        self.peft = None  # the PeftModel around `model`, made by the first load
        self.loaded: OrderedDict[str, None] = OrderedDict()  # the adapters in memory, least recently used first
        self.active: str | None = None  # the adapter the model runs with now (None: the base)
        self.lock = threading.Lock()

    def folder(self, name: str) -> Path:
        """Adapter ``name``'s folder; AdapterError for a name this set does not have."""
        if name not in self.paths:
            raise AdapterError(f"unknown adapter {name!r}; known: {', '.join(self.paths)}")
        return self.paths[name]

    def load(self, name: str) -> None:
        """Bring adapter ``name`` into memory (from disk unless loaded), evicting the least
        recently used one beyond ``max_adapters``. A load leaves the model at the base. Call it
        under :attr:`lock` when other threads use the model."""
        from peft import LoraConfig, PeftModel

        folder = self.folder(name)
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return
        while len(self.loaded) >= self.max_adapters:
            self._drop(self.loaded.popitem(last=False)[0])
        # adapter tensors made here stay ordinary ones when the caller is under inference_mode
        with torch.inference_mode(False):
            try:
                if self.peft is None:  # injects this adapter's LoRA layers into the model, in place
                    config = LoraConfig.from_pretrained(os.fspath(folder))
                    config.inference_mode = True
                    self.peft = PeftModel(self.model, config, adapter_name=name)
                # check_adapters' base is on `meta`: its adapters are read on the CPU and assigned
                meta = next(self.model.parameters()).device.type == "meta"
                device = "cpu" if meta else str(next(self.model.parameters()).device)
                result = self.peft.load_adapter(os.fspath(folder), adapter_name=name, torch_device=device,
                                                low_cpu_mem_usage=meta)
            except OSError as exc:  # its files changed since the folder was checked
                self._drop(name)
                raise AdapterError(f"adapter {name!r} ({folder}) cannot be read: {exc}") from exc
            except (RuntimeError, ValueError, KeyError) as exc:
                self._drop(name)
                raise AdapterError(f"adapter {name!r} ({folder}) does not fit the base model: {exc}") from exc
        # peft only reports these; a half-loaded adapter must not answer requests
        missing = [k for k in result.missing_keys if f".{name}." in k]
        if missing or result.unexpected_keys:
            self._drop(name)
            raise AdapterError(f"adapter {name!r} ({folder}) does not fit the base model: "
                               f"{len(missing)} adapter tensors missing (e.g. {missing[:2]}), "
                               f"{len(result.unexpected_keys)} unused (e.g. {result.unexpected_keys[:2]})")
        self._to_base()  # layers injected for a new adapter start enabled
        self.loaded[name] = None

    def _drop(self, name: str) -> None:
        if self.peft is not None and name in self.peft.peft_config:
            with warnings.catch_warnings():  # "…was active, setting active adapter to …": using() sets its own
                warnings.filterwarnings("ignore", message="Adapter .* was active")
                self.peft.delete_adapter(name)
            self._to_base()

    def _to_base(self) -> None:
        self.peft.base_model.disable_adapter_layers()
        self.active = None

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Model calls inside run with adapter ``name`` (loaded on first use), or with the base
        model for None. Not reentrant: do not nest it in one thread."""
        with self.lock:
            if name is not None:
                self.load(name)
            if name != self.active:  # a switch walks every module: only when the adapter changes
                if name is None:
                    self._to_base()
                else:
                    self.peft.set_adapter(name, inference_mode=True)
                    if self.active is None:
                        self.peft.base_model.enable_adapter_layers()
                    self.active = name
            yield


def check_adapters(adapters: Mapping[str, str | os.PathLike], checkpoint: str | os.PathLike) -> dict[str, Path]:
    """Refuse, before serving, adapters that are not LoRA folders or do not fit the detector of
    ``checkpoint``: each is loaded with peft onto the base's architecture built on the ``meta``
    device (no base weights read, no memory for them). Returns {name: local folder}."""
    from transformers import AutoConfig, Sam3Model

    if not adapters:
        return {}
    config = AutoConfig.from_pretrained(os.fspath(check_checkpoint(checkpoint)), local_files_only=True)
    with torch.device("meta"):
        model = Sam3Model(getattr(config, "detector_config", config))  # a video checkpoint: its detector
    fits = AdapterSet(model, adapters, max_adapters=1)
    for name in fits.paths:
        fits.load(name)
    return dict(fits.paths)
