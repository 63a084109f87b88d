"""pytest plugin (`-p noskip`): any skip fails the run. tools/test.sh loads it so CI never counts a skip as a pass.

A skip can happen while collecting a module (`pytest.importorskip` or `pytest.skip(allow_module_level=True)` at
module level) or in a test's setup, call or teardown; each becomes a failure naming the reason.
"""

import pytest

_WHY = "skipped, and skips fail this suite (tools/test.sh)"


def _reason(report) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid}: {_WHY}: {_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{_WHY}: {_reason(report)}"
