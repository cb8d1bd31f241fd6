"""The training driver's pieces that need no Ray run: the train/validation split and the console log."""

from __future__ import annotations

import pytest

from pipelines.settings import TrainError


def test_validation_holds_out_a_case_whenever_there_are_two():
    """split_cases: the seeded draw decides; with validation on and two or more cases at least one
    is held out, one case always trains, and validation on a single case is refused."""
    from pipelines.train import split_cases
    from pipelines.train_data import in_validation

    two = [("ct", "a"), ("ct", "b")]
    none_drawn = [s for s in range(20) if not any(in_validation(*c, 0.2, s) for c in two)]
    assert none_drawn  # at 0.2 the draw alone often holds out neither case
    for seed in range(20):
        train, val = split_cases(two, 0.2, seed, validate=True)
        assert len(val) == 1 and sorted(train + val) == two
        assert split_cases(list(reversed(two)), 0.2, seed, validate=True) == (train, val)
    assert all(split_cases(two, 0.2, s, validate=False) == (two, []) for s in none_drawn)
    many = [("ct", f"case_{i}") for i in range(10)]
    train, val = split_cases(many, 0.3, 0, validate=True)
    assert val == [c for c in many if in_validation(*c, 0.3, 0)] and 0 < len(val) < 10
    train, val = split_cases(many, 0.999, 0, validate=True)  # the draw holds out all ten
    assert len(train) == 1 and len(val) == 9
    with pytest.raises(TrainError, match="hold 1 case"):
        split_cases([("ct", "a")], 0.2, 0, validate=True)
    assert split_cases([("ct", "a")], 0.2, 0, validate=False) == ([("ct", "a")], [])


def test_ray_trains_per_step_report_log_keeps_only_warnings():
    """The logger of Ray Train's per-step "Reporting training result ..." INFO line passes
    warnings and errors only."""
    import inspect
    import logging

    from ray.train.v2._internal.execution import context

    from pipelines.recipe import quiet_report_log

    assert "Reporting training result" in inspect.getsource(context.TrainContext._wait_then_report)
    logger = quiet_report_log()
    assert logger is context.logger
    assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)


def test_a_training_ray_polls_its_workers_often_and_uses_deepspeeds_cpu_accelerator_without_gpus():
    """Ray Train's controller takes each report when it polls; its default interval (2 s) would be
    the shortest step. The controller reads the interval from its environment."""
    from ray.train.v2._internal.constants import HEALTH_CHECK_INTERVAL_S_ENV_VAR

    from pipelines.train import train_environment

    assert HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert float(train_environment(use_gpu=True)["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) <= 0.25
    assert "DS_ACCELERATOR" not in train_environment(use_gpu=True)
    assert train_environment(use_gpu=False)["DS_ACCELERATOR"] == "cpu"
