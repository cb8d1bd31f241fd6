"""The suite's time budget, enforced: a test (its call or teardown), a single fixture, or a test's
setup apart from its fixtures that runs longer than ``BUDGET_S`` at this machine's ordinary speed
fails the test. A setup is judged fixture by fixture: the first test to need several session
fixtures sets them all up, and each is its own piece of work.

These VMs' speed varies from day to day, so the budget is scaled by the machine's measured
slowness: the time of a fixed CPU workload against its time on an ordinary day here
(``REFERENCE_S``), measured when the session starts and again when a phase runs over, the larger
of the two counting. A slow day gets a longer budget; a test that grew does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

BUDGET_S = 240.0
# seconds the workload took on an ordinary day on the 2-core VM this project is developed on
REFERENCE_S = 0.03


def workload_seconds(repeats: int = 10) -> float:
    """Best of ``repeats`` runs of a fixed single-threaded mix of Python and NumPy work."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((160, 160))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(150_000):
            total += i * i % 7
        for _ in range(40):
            a = np.tanh(a @ a.T / 160.0)
        np.sort(rng.standard_normal(200_000))
        best = min(best, time.perf_counter() - started)
    return best


class Budget:
    def __init__(self, budget_s: float = BUDGET_S, measure: Callable[[], float] = workload_seconds) -> None:
        self.budget_s, self.measure = budget_s, measure
        self.slowness = max(1.0, measure() / REFERENCE_S)
        self.fixtures: list[tuple[str, float]] = []  # set up during the current test's setup
        self.slowest_fixtures: list[tuple[float, str]] = []

    def limit(self) -> float:
        return self.budget_s * self.slowness

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        started = time.perf_counter()
        yield
        self.fixtures.append((f"fixture {fixturedef.argname}", time.perf_counter() - started))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        # a fixture's own time names the one to make faster; the phase's time catches the rest
        timed = [(f"its {report.when}", report.duration)]
        if report.when == "setup":
            self.slowest_fixtures = sorted(self.slowest_fixtures + [(t, name) for name, t in self.fixtures])[-3:]
            outside = report.duration - sum(seconds for _, seconds in self.fixtures)
            timed, self.fixtures = [("its setup outside fixtures", outside), *self.fixtures], []
        if not report.passed or all(seconds <= self.limit() for _, seconds in timed):
            return
        self.slowness = max(self.slowness, self.measure() / REFERENCE_S)
        over = [f"{what} took {seconds:.0f} s" for what, seconds in timed if seconds > self.limit()]
        if over:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid}: {'; '.join(over)}, over the budget of {self.limit():.0f} s "
                               f"({self.budget_s:.0f} s × this machine's slowness {self.slowness:.2f}; "
                               "tests/budget.py)")

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.write_line(f"time budget per test: {self.limit():.0f} s "
                                    f"({self.budget_s:.0f} s × measured slowness {self.slowness:.2f})")
        if self.slowest_fixtures:
            slowest = reversed(self.slowest_fixtures)
            terminalreporter.write_line("slowest fixtures: " + ", ".join(
                f"{name.removeprefix('fixture ')} {seconds:.0f} s" for seconds, name in slowest))
