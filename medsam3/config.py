"""OmegaConf configuration: one YAML per stage in ``configs/``, merged with user files and overrides.

Precedence (later wins): ``configs/<stage>.yaml`` → ``--config FILE`` → the stage's section of
``--params params.yaml`` (DVC) → ``key=value`` dotlist overrides from the command line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("MEDSAM3_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


class ConfigError(ValueError):
    """A configuration file or override is malformed or names an unknown key."""


def config_path(name: str) -> Path:
    """Path of a built-in config file, e.g. ``config_path("prepare")`` → ``configs/prepare.yaml``."""
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no built-in config {name!r}: {path} does not exist")
    return path


def load_config(
    stage: str,
    overrides: Sequence[str] = (),
    config_file: str | os.PathLike | None = None,
    params_file: str | os.PathLike | None = None,
) -> DictConfig:
    """Load a stage's config with every layer merged.

    Unknown keys are refused so that a typo fails loudly; mappings that are empty in the built-in
    file (user vocabularies, per-label overrides) are open and take any key.
    """
    base = OmegaConf.load(config_path(stage)) or OmegaConf.create()
    if stage != "storage":  # every stage shares the s3:// settings of configs/storage.yaml
        base.storage = OmegaConf.load(config_path("storage"))
    OmegaConf.set_struct(base, True)
    _open_empty_maps(base)
    layers: list[DictConfig] = []
    if config_file is not None:
        layers.append(_load_yaml(config_file))
    if params_file is not None:
        params = _load_yaml(params_file)
        if stage in params:
            layers.append(params[stage])
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        cfg = OmegaConf.merge(base, *layers)
    except Exception as exc:  # omegaconf raises several error types; one message for the user
        raise ConfigError(f"invalid {stage} config: {exc}") from exc
    OmegaConf.set_struct(cfg, False)
    if "storage" in cfg:
        from medsam3.io import storage

        storage.configure(cfg.storage)
    return cfg


def _load_yaml(path: str | os.PathLike) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except Exception as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return cfg


def _open_empty_maps(node: DictConfig) -> None:
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if len(child) == 0:
                OmegaConf.set_struct(child, False)
            else:
                _open_empty_maps(child)
