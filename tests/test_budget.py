"""The per-test time budget (tests/budget.py) fails a test or fixture that runs over it."""

from __future__ import annotations

pytest_plugins = ["pytester"]

INNER = """
import time
import pytest

@pytest.fixture
def slow_fixture():
    time.sleep(0.8)

def test_quick():
    pass

def test_slow_call():
    time.sleep(0.8)

def test_slow_fixture(slow_fixture):
    pass

@pytest.fixture
def part_one():
    time.sleep(0.3)

@pytest.fixture
def part_two():
    time.sleep(0.3)

def test_two_fixtures_each_within_the_budget(part_one, part_two):
    pass
"""


def test_a_test_or_fixture_over_the_budget_fails_naming_it(pytester):
    # a half-second budget on an ordinary day (the workload at its reference time)
    pytester.makeconftest("def pytest_configure(config):\n"
                          "    from tests.budget import REFERENCE_S, Budget\n"
                          "    budget = Budget(budget_s=0.5, measure=lambda: REFERENCE_S)\n"
                          "    config.pluginmanager.register(budget, 'budget')\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1, errors=1)
    text = result.stdout.str()
    assert "its call took 1 s" in text and "fixture slow_fixture took 1 s" in text
    assert "budget of 0 s (0 s × this machine's slowness 1.00" in text
