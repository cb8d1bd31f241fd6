"""Cluster manifests: KubeRay resources against KubeRay's published CRD schemas (read in place from
../shared/data/kuberay-crds), the RayService's Serve config against the project's, and the
cluster-launcher YAML against Ray's own schema."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from tests.builders import SHARED

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "infra" / "kuberay"
CRDS = SHARED / "kuberay-crds"


def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(gzip.decompress((CRDS / f"ray.io_{kind.lower()}s.yaml.gz").read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(instance, schema: dict, where: str = "") -> list[str]:
    """Fields the schema does not declare: Kubernetes would silently drop them (a typo'd key)."""
    found = []
    if isinstance(instance, dict) and "properties" in schema:
        for key, value in instance.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{where}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            found += unknown_fields(value, schema["items"], f"{where}[{i}]")
    return found


@pytest.mark.parametrize("file", sorted(p.name for p in KUBERAY.glob("*.yaml")))
def test_kuberay_manifests_follow_the_crds(file):
    manifest = yaml.safe_load((KUBERAY / file).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    schema = crd_schema(manifest["kind"])
    jsonschema.validate(manifest, schema)
    assert unknown_fields(manifest, schema) == []


def test_the_schema_check_catches_mistakes():
    manifest = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    manifest["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo of maxReplicas
    assert unknown_fields(manifest, crd_schema("RayCluster")) == [".spec.workerGroupSpecs[0].maxReplica"]
    manifest["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, crd_schema("RayCluster"))


def test_rayservice_embeds_the_projects_serve_config_and_cluster():
    from serve.limits import proxy_environment

    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    project = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    settings = embedded["applications"][0]["args"]["settings"]
    assert settings["auth"] == {"api_keys_file": None, "api_keys_env": "MEDSAM3_API_KEYS"}  # keys required
    settings["auth"]["api_keys_env"] = None
    assert embedded == project  # otherwise the very same config
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())["spec"]
    spec = service["spec"]["rayClusterConfig"]
    templates = [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]
    for template in templates:
        for container in template["spec"]["containers"]:
            env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container.pop("env")}
            assert env.pop("MEDSAM3_API_KEYS") == {"secretKeyRef": {"name": "medsam3-api-keys", "key": "keys"}}
            assert env == proxy_environment(project["applications"][0]["args"]["settings"])
    assert spec == cluster
    check = subprocess.run([sys.executable, str(ROOT / "infra" / "render.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_rayjobs_run_the_medsam3_cli_on_the_cluster():
    for name, stage in (("rayjob-prepare.yaml", "prepare"), ("rayjob-train.yaml", "train")):
        job = yaml.safe_load((KUBERAY / name).read_text())
        assert job["spec"]["entrypoint"].startswith(f"medsam3 {stage} ")
        assert "--address auto" in job["spec"]["entrypoint"]
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == yaml.safe_load(
            (KUBERAY / "raycluster.yaml").read_text())["metadata"]["name"]


def test_cluster_launcher_config_follows_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((ROOT / "infra" / "cluster-aws.yaml").read_text()), schema)


def test_dockerfile_uses_the_pinned_torch_on_a_cuda_base():
    text = (ROOT / "infra" / "Dockerfile").read_text()
    pinned = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"torch==' in line)
    version = pinned.split("==")[1].split('"')[0]
    assert f"FROM pytorch/pytorch:{version}-cuda" in text and "pip install" in text
