"""The on-device suite: runs only where MindSpore can use an Ascend NPU; prints a pass/fail table.

Run it with (docs/ascend.md):  python -m pytest --confcutdir=tests/ascend -rs tests/ascend
`--confcutdir` keeps tests/conftest.py (which pins the CPU) out; under the full `pytest tests` the
suite is collected with the CPU device and skipped, with the reason printed.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))   # tests/: cases.py, test_forward.py


def ascend_unavailable_reason():
    """None when an Ascend device can be used, else why not."""
    import mindspore as ms
    if not os.environ.get("ASCEND_OPP_PATH"):
        return "ASCEND_OPP_PATH is not set (source CANN's set_env.sh)"
    if not any(name.startswith("davinci") for name in os.listdir("/dev")):
        return "no /dev/davinci* device: this machine has no Ascend NPU"
    target = ms.get_context("device_target")
    if target != "Ascend":
        try:
            ms.set_device("Ascend")
        except Exception as err:  # pylint: disable=broad-except  (any failure means: no usable device)
            return f"MindSpore cannot use an Ascend device (device target {target}): {err}"
    return None


REASON = ascend_unavailable_reason()
if REASON:
    print(f"\n[tests/ascend] skipped: {REASON}")

_RESULTS = []


HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = []


def pytest_configure(config):
    _ROOT.append(str(config.rootpath))


def _in_this_suite(path) -> bool:
    # Hooks of a conftest see the whole session's items and reports, not only this folder's; report
    # paths are relative to the rootdir.
    return os.path.abspath(os.path.join(_ROOT[0], str(path))).startswith(HERE + os.sep)


def pytest_collection_modifyitems(items):
    if REASON:
        for item in items:
            if _in_this_suite(item.path):
                item.add_marker(pytest.mark.skip(reason=f"on-device suite: {REASON}"))


def pytest_runtest_logreport(report):
    if not _in_this_suite(report.fspath):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _RESULTS.append((report.nodeid.split("::", 1)[-1], report.outcome))


def pytest_terminal_summary(terminalreporter):
    if REASON or not _RESULTS:
        return
    passed = sum(outcome == "passed" for _, outcome in _RESULTS)
    terminalreporter.section(f"ms_nsa on Ascend: {passed} of {len(_RESULTS)} passed")
    width = max(len(name) for name, _ in _RESULTS)
    for name, outcome in _RESULTS:
        terminalreporter.write_line(f"{name:<{width}}  {outcome.upper()}")
