"""Root conftest: registers the entropy_lab pytest plugin and the hypothesis profiles."""

import os

from hypothesis import settings

# entropy_lab.pytest_plugin is loaded through its pytest11 entry point (pyproject.toml).
pytest_plugins = ["pytester"]

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
