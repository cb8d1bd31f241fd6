"""Start (or join) Ray for a stage: every CLI stage, ``medsam3 serve``, the tests and benchmarks.

A Ray that a stage starts for itself is a single-node Ray: it has no other node to talk to, so
its GCS, raylet, workers and agents listen on 127.0.0.1 only. Ray binds its servers to the node
address, and ``ray.init`` turns a loopback node address into the machine's network address
unless its "no cluster" mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the switch Ray uses
on laptops); this module turns it on for the Ray it starts. With ``address`` (or RAY_ADDRESS)
the stage joins an existing cluster, whose networking is the cluster's own; a loopback address
is a single-node Ray on this machine, joined from 127.0.0.1 as well.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

NO_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """``ray.init(address, **kwargs)``; a local Ray started here listens on loopback only.

    ``env``: environment variables for every Ray worker. A local Ray's processes inherit this
    process's environment, so they are set here; a cluster gets them as a runtime_env. A
    runtime_env on a local Ray would start every worker through Ray's runtime-env agent: 8 actors
    took 20-26 s that way and 12-13 s inheriting the variables (measured on a 2-CPU machine).
    """
    import ray
    from ray._private import ray_constants

    joining = address or os.environ.get("RAY_ADDRESS")
    if not joining or joining.startswith(("127.", "localhost:")):
        # read when ray is imported (by then it may be), and inherited by the processes Ray starts
        os.environ[NO_CLUSTER] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
    if not joining:
        os.environ.update(env or {})
    else:
        for key in ("num_cpus", "num_gpus"):  # the size of a Ray started here; a cluster has its own
            kwargs.pop(key, None)
        if env:
            runtime_env = dict(kwargs.get("runtime_env") or {})
            runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
            kwargs["runtime_env"] = runtime_env
    ray.init(address=address, **kwargs)


def require_reachable(paths: Mapping[str, str | os.PathLike | None], error: type[Exception]) -> None:
    """Refuse, before any task runs, a local path that another node of the Ray cluster cannot see.

    ``paths``: what each path is (named in the error) → the path. ``s3://`` URIs reach every node;
    on a single-node Ray so does every local path. Otherwise the driver leaves a marker file in
    each path's nearest existing folder, and a zero-CPU task on every other node looks for it: a
    path on the driver's own disk, or on a file system that some nodes do not mount, is refused
    with the node's address. A folder the driver cannot write in is looked for itself."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from medsam3.io import storage

    local = {what: Path(p).absolute() for what, p in paths.items() if p is not None and not storage.is_remote(p)}
    if not local:
        return
    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not nodes:
        return
    token, looked_for = uuid.uuid4().hex, {}
    try:
        for what, path in local.items():
            folder = path if path.is_dir() else next(p for p in path.parents if p.is_dir())
            try:
                (folder / f".medsam3-reach-{token}").write_bytes(b"")
                looked_for[what] = folder / f".medsam3-reach-{token}"
            except OSError:
                looked_for[what] = path

        @ray.remote(num_cpus=0)
        def seen(candidates: list[str]) -> list[bool]:
            return [os.path.exists(c) for c in candidates]

        answers = {node["NodeManagerAddress"]: seen.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node["NodeID"], soft=False)).remote([str(p) for p in looked_for.values()]) for node in nodes}
        for address, answer in answers.items():
            for what, found in zip(looked_for, ray.get(answer, timeout=120), strict=True):
                if not found:
                    raise error(f"{what} {local[what]}: a local path that node {address} of the Ray cluster "
                                "cannot see; give an s3:// URI, or a path on a file system every node mounts")
    finally:
        for marker in looked_for.values():
            if marker.name == f".medsam3-reach-{token}":
                marker.unlink(missing_ok=True)


def keep_serve_replicas_on_loopback() -> None:
    """On a loopback-only Ray, make Serve replicas' inter-deployment gRPC server listen on 127.0.0.1.

    Ray Serve 2.60 starts that server on ``[::]:0`` whatever the node address (``replica.py``,
    ``_on_initialized``); every other Ray server follows the node address. Called where the
    deployment classes are imported (``serve/model.py``), i.e. in each replica before it starts the
    server; replicas on a cluster node (not loopback) are left as Ray made them."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "loopback_aware", False):
        return

    def add_port(server, address: str):
        import ray

        if address.startswith("[::]:") and ray.is_initialized() and ray.util.get_node_ip_address() == "127.0.0.1":
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port.loopback_aware = True
    replica.add_port_to_grpc_server = add_port


def driver_groups(data: Any, keys: list[str]) -> list[Any]:
    """A small dataset's groups by ``keys``, formed in the driver: pandas frames in key order.

    Ray Data's ``groupby`` starts a hash shuffle whose fixed cost (seconds to tens of seconds on
    a small cluster) dwarfs the work for a few cases; callers form groups here when the rows fit
    in the driver's memory, and with the ``groupby`` otherwise."""
    frame = data.to_pandas()
    return [part.reset_index(drop=True) for _, part in frame.groupby(keys, sort=True)]


def group_arrays(frame: Any) -> dict[str, Any]:
    """A pandas group as the numpy batch Ray Data's ``map_groups`` hands its function."""
    return {key: frame[key].to_numpy() for key in frame.columns}


def map_groups(data: Any, keys: list[str], fn: Any, in_driver: bool, **kwargs: Any) -> Any:
    """``data.groupby(keys).map_groups(fn, **kwargs)`` on numpy batches: each group of rows in
    one call of ``fn`` (a function or an actor class). With ``in_driver`` the groups are formed
    by :func:`driver_groups`, one block each, and mapped whole."""
    import ray

    if in_driver:
        parts = driver_groups(data, keys)
        if parts:
            return ray.data.from_pandas(parts).map_batches(fn, batch_size=None, batch_format="numpy", **kwargs)
    return data.groupby(keys, num_partitions=group_partitions()).map_groups(fn, batch_format="numpy", **kwargs)


def group_partitions() -> int:
    """Hash-shuffle partitions for a Ray Data ``groupby``: one per CPU of the cluster.

    Ray Data's default is 200, which on a small cluster means 200 reduce tasks for a handful of
    groups: a clip-training groupby of one volume took 26-30 s with it and 13 s with 2 (measured
    on a 2-CPU machine).
    """
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))
