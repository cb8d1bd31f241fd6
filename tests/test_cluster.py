"""Stages on a real multi-node Ray without a shared disk (``tests/cluster.py``).

Three nodes, each in its own network and mount namespace; the head has no CPUs for tasks, so
every task runs on one of the two worker nodes. S3 (moto, on the bridge) is the only storage
they share. The driver runs the ``medsam3`` CLI on the head's machine with ``--address``, with
the environment docs/cluster.md tells users to give every node.
"""

from __future__ import annotations

import hashlib
import os
import socket

import pytest

from tests.builders import RECIST, SAMMED2D
from tests.cluster import LocalCluster, unavailable

BUCKET = "medsam3-cluster"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The three-node cluster and its S3 server, shared by this module's tests; afterwards nothing
    of it may be left (namespaces, links, processes)."""
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the multi-node harness must run in CI: {reason}")
        pytest.skip(reason)
    from moto.server import ThreadedMotoServer

    cluster = LocalCluster(cpus=[0, 1, 1], work=tmp_path_factory.mktemp("cluster"))
    server = None
    try:
        cluster.create_bridge()
        with socket.socket() as probe:
            probe.bind((cluster.bridge_ip, 0))
            port = probe.getsockname()[1]
        server = ThreadedMotoServer(ip_address=cluster.bridge_ip, port=port, verbose=False)
        server.start()
        endpoint = f"http://{cluster.bridge_ip}:{port}"
        cluster.endpoint = endpoint
        cluster.env = {**CREDENTIALS, "MEDSAM3_S3_ENDPOINT_URL": endpoint}  # every node's, as docs/cluster.md says
        cluster.start_nodes()
        yield cluster
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
        assert cluster.leftovers() == []


def s3(cluster):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": cluster.endpoint},
                             use_listings_cache=False)


def _digests(fs, root: str) -> dict[str, str]:
    return {path.removeprefix(root + "/"): hashlib.sha256(fs.cat_file(path)).hexdigest()
            for path in sorted(fs.find(root)) if not path.endswith("/")}


@pytest.fixture(scope="module")
def scans(cluster, tmp_path_factory):
    """Two real datasets on the cluster's S3 (SAM-Med2D CT slices, CT lesion volumes) and a copy on disk."""
    import shutil

    local = tmp_path_factory.mktemp("scans")
    (local / "ct2d" / "images").mkdir(parents=True)
    (local / "ct2d" / "masks").mkdir()
    for image in ("amos_0004_75", "amos_0006_90", "s0619_32"):
        shutil.copy(SAMMED2D / "images" / f"{image}.png", local / "ct2d" / "images")
        for mask in SAMMED2D.glob(f"masks/{image}_*.png"):
            shutil.copy(mask, local / "ct2d" / "masks")
    (local / "lesions").mkdir()
    for volume in sorted(RECIST.glob("*.npz"))[:2]:
        shutil.copy(volume, local / "lesions")
    fs = s3(cluster)
    fs.mkdir(BUCKET)
    fs.put(str(local), f"{BUCKET}/scans", recursive=True)
    return local


PREPARE = ["image_size=256", "modality=CT", "empty_fraction=0"]


@pytest.fixture(scope="module")
def cluster_shards(cluster, scans) -> str:
    """The scans prepared S3 → S3 by the CLI on the head, every read task on a worker node."""
    cluster.run(0, ["medsam3", "prepare", f"s3://{BUCKET}/scans", f"s3://{BUCKET}/shards", "--address",
                    cluster.address, *PREPARE])
    return f"s3://{BUCKET}/shards"


@pytest.mark.slow
def test_prepare_s3_to_s3_across_nodes_gives_the_single_node_shards(cluster, scans, cluster_shards, tmp_path,
                                                                    ray_local):
    from medsam3.config import load_config
    from preprocessing.prepare import run_prepare

    run_prepare(scans, tmp_path / "shards", load_config("prepare", PREPARE))
    local = {p.relative_to(tmp_path / "shards").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((tmp_path / "shards").rglob("*")) if p.is_file()}
    assert _digests(s3(cluster), cluster_shards.removeprefix("s3://")) == local
    # the read tasks ran on both worker nodes: each fetched case files into its own cache
    for node in (1, 2):
        cached = cluster.run(node, ["find", "/tmp/home/.cache/medsam3", "-type", "f"], check=False).stdout
        assert cached.strip(), f"node {node} fetched no case files"


@pytest.mark.slow
def test_local_paths_the_other_nodes_cannot_see_are_refused_before_any_task(cluster, cluster_shards):
    """The head's /tmp is its own: prepare from it, or a run folder in it, is refused naming the
    path and the node that cannot see it, and nothing is written."""
    cluster.run(0, ["mkdir", "-p", "/tmp/scans/ct2d/images", "/tmp/scans/ct2d/masks"])
    cluster.run(0, ["cp", str(SAMMED2D / "images" / "amos_0004_75.png"), "/tmp/scans/ct2d/images/"])
    cluster.run(0, ["cp", str(SAMMED2D / "masks" / "amos_0004_75_liver_000.png"), "/tmp/scans/ct2d/masks/"])
    done = cluster.run(0, ["medsam3", "prepare", "/tmp/scans", f"s3://{BUCKET}/refused", "--address",
                           cluster.address, *PREPARE], check=False)
    assert done.returncode != 0, done.stdout
    assert "INPUT /tmp/scans: a local path that node" in done.stderr + done.stdout
    assert not s3(cluster).exists(f"{BUCKET}/refused")
    done = cluster.run(0, ["medsam3", "train", cluster_shards, "/tmp/run", "--address", cluster.address,
                           "train.max_steps=1", "train.num_workers=1"], check=False)
    assert done.returncode != 0 and "RUN_DIR /tmp/run: a local path that node" in done.stderr + done.stdout
