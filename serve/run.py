"""``medsam3 serve``: start (or join) Ray, deploy the app from configs/serve.yaml with the given
checkpoints (and LoRA adapters on the first), and print the URL and an example request."""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

from medsam3.config import config_path
from medsam3.errors import StageError
from medsam3.io import storage
from medsam3.ray_local import init_ray


class ServeError(StageError):
    """A checkpoint, an adapter or the Serve config cannot be used."""


def parse_checkpoints(specs: list[str]) -> dict[str, str]:
    """``DIR`` or ``NAME=DIR`` → {id: absolute dir}; the first is the default model ("default")."""
    from medsam3.model import parse_checkpoints as parse

    try:
        return parse(specs, first_name="default")
    except ValueError as exc:
        raise ServeError(str(exc)) from exc


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """``NAME=DIR`` or ``DIR`` (named after the folder) → {id: absolute dir} of LoRA adapters."""
    from medsam3.model import parse_checkpoints as parse

    try:
        return parse(specs, what="adapter") if specs else {}
    except ValueError as exc:
        raise ServeError(str(exc)) from exc


def serve_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The Serve config file (default configs/serve.yaml) as a plain dict."""
    return OmegaConf.to_container(OmegaConf.load(path or config_path("serve")), resolve=True)


def app_args(config: dict[str, Any], checkpoints: dict[str, str], adapters: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """The application's builder args from a Serve config, with these checkpoints and adapters
    (the config's adapters rode on its own checkpoints: replaced too) and its `deployments`
    section passed as options (what `serve run` would apply)."""
    (application,) = config["applications"]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
    return {**application["args"], "checkpoints": checkpoints, "adapters": adapters or {},
            "deployment_options": options}


def start(checkpoints: dict[str, str], port: int = 8000, host: str = "127.0.0.1", address: str | None = None,
          config_file: str | os.PathLike | None = None, overrides: dict[str, dict] | None = None,
          settings: dict[str, Any] | None = None, adapters: dict[str, str] | None = None,
          route_prefix: str | None = None) -> str:
    """Deploy the app and return its URL, route prefix included (Ray and Serve keep running in
    the background). ``adapters`` ({id: LoRA adapter dir}) ride on the first checkpoint.

    ``overrides`` update deployments' options, ``settings`` the app's settings and
    ``route_prefix`` the config's (tests use them)."""
    import ray
    from ray import serve

    from medsam3.adapters import AdapterError
    from medsam3.model import CheckpointError
    from serve.app import build_app
    from serve.guard import ApiKeys, AuthError
    from serve.limits import proxy_environment

    config = serve_config(config_file)
    args = app_args(config, checkpoints, adapters)
    args["settings"] = {**args.get("settings", {}), **(settings or {})}
    # replicas may run on other nodes: they get the storage settings in force here (config or environment)
    effective = {k: v for k, v in storage.settings().items() if v is not None and k != "cache_dir"}
    args["settings"]["storage"] = {**effective, **(args["settings"].get("storage") or {})}
    for name, extra in (overrides or {}).items():
        args["deployment_options"].setdefault(name, {}).update(extra)
    try:  # a missing key file or variable stops here, not in a replica
        ApiKeys.from_settings(args["settings"].get("auth"))
    except AuthError as exc:
        raise ServeError(str(exc)) from exc
    if not ray.is_initialized():
        if not (address or os.environ.get("RAY_ADDRESS")):
            # the HTTP proxies that this Ray will start enforce the body limits (serve/limits.py)
            os.environ.update(proxy_environment(args["settings"]))
        init_ray(address, include_dashboard=False, logging_level="WARNING",
                 num_cpus=None if address else max(os.cpu_count() or 1, 3))
    serve.start(http_options={"host": host, "port": int(port)})
    try:
        app = build_app(args)
    except AdapterError as exc:
        raise ServeError(str(exc)) from exc
    except CheckpointError as exc:
        raise ServeError(f"checkpoint: {exc}") from exc
    (application,) = config["applications"]
    prefix = route_prefix or application.get("route_prefix", "/")
    serve.run(app, name=application["name"], route_prefix=prefix)
    return f"http://{host}:{port}{prefix.rstrip('/')}"
