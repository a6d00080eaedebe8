"""Shared fixtures: the tiny checkpoint (built once, cached) and loaded setups."""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)  # tiny matmuls: one thread is faster, and xdist workers don't thrash


@pytest.fixture(scope="session")
def tiny_checkpoint():
    from entropy_lab.tiny import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint()


def make_setup(path, dtype="fp32", eval_size=64, **settings):
    from entropy_lab.checkpoint import load_checkpoint
    from entropy_lab.config import ExperimentConfig
    from entropy_lab.protocol import prepare

    ck = load_checkpoint(path, dtype=dtype)
    cfg = ExperimentConfig.from_training_config(
        ck.training_config, [1e-6], num_repeats=2, dtype=dtype, eval_size=eval_size, **settings
    )
    return prepare(cfg, ck)


@pytest.fixture(scope="session")
def setup64(tiny_checkpoint):
    return make_setup(tiny_checkpoint, dtype="fp64", eval_size=128)


@pytest.fixture(scope="session")
def setup32(tiny_checkpoint):
    return make_setup(tiny_checkpoint, dtype="fp32", eval_size=256)
