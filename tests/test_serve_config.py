"""configs/serve.yaml is a valid Ray Serve config, and `medsam3 serve` derives its app from it."""

from __future__ import annotations

import io

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from medsam3.config import config_path
from serve.run import ServeError, app_args, parse_checkpoints, serve_config
from serve.uploads import UploadError, store_upload, upload_suffix


def test_serve_config_is_valid_for_serve_run_and_deploy():
    schema = ServeDeploySchema(**yaml.safe_load(config_path("serve").read_text()))
    (application,) = schema.applications
    assert application.import_path == "serve.app:build_app"
    names = {d.name: d for d in application.deployments}
    assert set(names) == {"SegmentModel", "SegmentAPI"}
    assert names["SegmentModel"].autoscaling_config["max_replicas"] >= names["SegmentModel"].autoscaling_config[
        "min_replicas"]
    assert names["SegmentModel"].user_config["max_batch_size"] > 1


def test_medsam3_serve_keeps_the_config_and_replaces_the_checkpoints(tmp_path):
    checkpoints = parse_checkpoints([str(tmp_path / "a"), f"b={tmp_path / 'b'}"])
    assert list(checkpoints) == ["default", "b"] and checkpoints["b"] == str(tmp_path / "b")
    args = app_args(serve_config(), checkpoints)
    assert args["checkpoints"] == checkpoints
    assert args["deployment_options"]["SegmentModel"]["ray_actor_options"]["num_cpus"] == 1
    assert args["settings"]["max_upload_mb"] > 0
    with pytest.raises(ServeError, match="two checkpoints"):
        parse_checkpoints([f"x={tmp_path}", f"x={tmp_path}"])


def test_uploads_are_stored_under_fixed_names(tmp_path):
    assert upload_suffix("CT.NII.GZ") == ".nii.gz" and upload_suffix("a.b.png") == ".png"
    with pytest.raises(UploadError) as error:
        upload_suffix("../../etc/passwd")
    assert error.value.status == 415
    path = store_upload(io.BytesIO(b"data"), "../../evil.png", tmp_path)
    assert path == tmp_path / "upload.png" and path.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.png"]
