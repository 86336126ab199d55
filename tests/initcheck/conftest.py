"""Fixtures for the init-check tests: the repository root and a small, fast analysis config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # a source checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

from gradflow_agent.initcheck import AnalysisConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def quick():
    """AnalysisConfig factory with few samples on the CPU; keyword arguments override."""

    def make(input_shapes=(4, 16), **overrides) -> AnalysisConfig:
        fields = {"device": "cpu", "n_samples": 4, "power_iterations": 20, "quiet": True}
        fields.update(overrides)
        return AnalysisConfig(input_shapes=input_shapes, **fields)

    return make
