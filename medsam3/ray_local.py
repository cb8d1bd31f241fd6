"""Start (or join) Ray for a stage: every CLI stage, ``medsam3 serve``, the tests and benchmarks.

A Ray that a stage starts for itself is a single-node Ray: it has no other node to talk to, so
its GCS, raylet, workers and agents listen on 127.0.0.1 only. Ray binds its servers to the node
address, and ``ray.init`` turns a loopback node address into the machine's network address
unless its "no cluster" mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the switch Ray uses
on laptops); this module turns it on for the Ray it starts. With ``address`` (or RAY_ADDRESS)
the stage joins an existing cluster, whose networking is the cluster's own.
"""

from __future__ import annotations

import os
from typing import Any

NO_CLUSTER = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """``ray.init(address, **kwargs)``; a local Ray started here listens on loopback only."""
    import ray
    from ray._private import ray_constants

    if not (address or os.environ.get("RAY_ADDRESS")):
        # read when ray is imported (by then it may be), and inherited by the processes Ray starts
        os.environ[NO_CLUSTER] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        kwargs.setdefault("_node_ip_address", "127.0.0.1")
    ray.init(address=address, **kwargs)
