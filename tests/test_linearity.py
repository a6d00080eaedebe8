"""The linearity suite: the cpu variants run the tiny checkpoint (agreeing and spread update
directions); the gpu variant the user's."""

import pytest

from entropy_lab.pytest_plugin import LinearitySuite


@pytest.mark.cpu
class TestLinearityCPU(LinearitySuite):
    suite_kind = "cpu"


@pytest.mark.cpu
class TestLinearityCPUSpread(LinearitySuite):
    """The same checkpoint with update directions 50 % apart, as on a real RL checkpoint."""

    suite_kind = "cpu"
    suite_variant = "spread"


@pytest.mark.gpu
class TestLinearityGPU(LinearitySuite):
    suite_kind = "gpu"
