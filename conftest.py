"""Root conftest: registers the entropy_lab pytest plugin and the hypothesis profiles."""

import os

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


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONG_MODULES))
