"""Root conftest: registers the entropy_lab pytest plugin and the hypothesis profiles."""

import os

import pytest
from hypothesis import settings

# entropy_lab.pytest_plugin is loaded through its pytest11 entry point (pyproject.toml).
pytest_plugins = ["pytester"]

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


# The longest modules first: xdist hands tests (and xdist_groups) to the workers in collection
# order, so a long group collected last (the torchrun tests run on one worker) would leave the
# other worker idle at the end. Whole modules move, so module fixtures stay set up once.
_LONG_MODULES = (
    "tests/test_distributed.py",
    "tests/test_suite_behaviour.py",
    "tests/test_resume.py",
    "tests/test_track.py",
)


# This project's run of the cpu linearity suite stays on one worker: spread over two, each
# loaded the tiny checkpoint and computed the same update directions. Sharing the η points
# between workers has its own test with real workers (test_track: the gpu suite on a run
# folder under -n 2).
_CPU_SUITE = "tests/test_linearity.py::"


def _xdist_group(item: pytest.Item) -> str | None:
    """The group xdist's loadgroup gives ``item``: its xdist_group names, sorted, joined."""
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    return "_".join(sorted(names)) if names else None


@pytest.hookimpl(trylast=True)  # after xdist's own attempt at the group suffix
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONG_MODULES))
    # ``--dist loadgroup`` (pytest.ini) sends the tests whose nodeid ends in '@group' to one
    # worker. An xdist worker appends that suffix by assigning ``item._nodeid``, which pytest
    # 9's structured node ids no longer read (pytest-xdist 3.8): every xdist_group was
    # silently dropped, module fixtures were built on both workers and the torchrun tests ran
    # on both at once. Where the suffix is missing, it is appended here, as xdist means to.
    if not getattr(config.option, "loadgroup", False):  # not an xdist worker under loadgroup
        return
    for item in items:
        if item.nodeid.startswith(_CPU_SUITE) and getattr(item.cls, "suite_kind", "") == "cpu":
            item.add_marker(pytest.mark.xdist_group("linearity_cpu"))
        group = _xdist_group(item)
        # pytest 9's NodeId (absent in pytest 8, where xdist's own suffix works)
        parse = getattr(type(getattr(item, "_id", None)), "parse", None)
        if group and not item.nodeid.endswith(f"@{group}") and parse is not None:
            item._id = parse(f"{item.nodeid}@{group}")
