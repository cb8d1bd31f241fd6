"""configs/serve.yaml is a valid Ray Serve config, and `medsam3 serve` derives its app from it."""

from __future__ import annotations

import io

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from medsam3.adapters import AdapterError
from medsam3.config import config_path
from serve.app import build_app
from serve.run import ServeError, app_args, parse_adapters, parse_checkpoints, serve_config
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


def test_adapters_are_named_and_checked_before_serving(tiny_checkpoint, tmp_path):
    adapters = parse_adapters([f"liver-siteA={tmp_path / 'x'}", str(tmp_path / "lung")])
    assert adapters == {"liver-siteA": str(tmp_path / "x"), "lung": str(tmp_path / "lung")}
    assert parse_adapters([]) == {} and serve_config()["applications"][0]["args"]["adapters"] == {}
    with pytest.raises(ServeError, match="two adapters named 'x'"):
        parse_adapters([f"x={tmp_path}", f"x={tmp_path}"])
    checkpoints = {"base": str(tiny_checkpoint)}
    assert app_args(serve_config(), checkpoints, adapters)["adapters"] == adapters
    assert app_args(serve_config(), checkpoints)["adapters"] == {}  # they rode on the config's checkpoints
    (tmp_path / "lung").mkdir()
    with pytest.raises(AdapterError, match=f"adapter {tmp_path / 'lung'}: no adapter_config.json"):
        build_app({"checkpoints": checkpoints, "adapters": {"lung": str(tmp_path / "lung")}})
    with pytest.raises(ValueError, match="adapter and checkpoint ids must differ: base"):
        build_app({"checkpoints": checkpoints, "adapters": {"base": str(tmp_path / "lung")}})


def test_uploads_are_stored_under_fixed_names(tmp_path):
    assert upload_suffix("CT.NII.GZ") == ".nii.gz" and upload_suffix("a.b.png") == ".png"
    with pytest.raises(UploadError) as error:
        upload_suffix("../../etc/passwd")
    assert error.value.status == 415
    path = store_upload(io.BytesIO(b"data"), "../../evil.png", tmp_path)
    assert path == tmp_path / "upload.png" and path.read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload.png"]
