"""The linearity suite: the cpu variant runs the tiny checkpoint; the gpu variant the user's."""

import pytest

from entropy_lab.pytest_plugin import LinearitySuite


@pytest.mark.cpu
class TestLinearityCPU(LinearitySuite):
    suite_kind = "cpu"


@pytest.mark.gpu
class TestLinearityGPU(LinearitySuite):
    suite_kind = "gpu"
