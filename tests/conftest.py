"""Shared fixtures: configs that keep tests off fixed ports, and small models."""

from __future__ import annotations

import pytest
import torch

QUIET = {"exporters": {"prometheus": {"enabled": False}}}


def config(**sections) -> dict:
    """A test config: no exporter unless asked, every statistic every step, no warmup."""
    cfg = {
        "exporters": {"prometheus": {"enabled": False}},
        "sampling": {"export_every_n_steps": 1000, "export_every_seconds": 3600.0, "window": 10},
        "stats": {"parameters": {"every_n_steps": 1}},
        "thresholds": {"warmup_steps": 0},
    }
    for key, value in sections.items():
        cfg.setdefault(key, {})
        for k, v in value.items():
            if isinstance(v, dict) and isinstance(cfg[key].get(k), dict):
                cfg[key][k] = {**cfg[key][k], **v}
            else:
                cfg[key][k] = v
    return cfg


@pytest.fixture(autouse=True)
def _flight_bundles_in_tmp(tmp_path_factory, monkeypatch):
    """The flight recorder is on by default: tests that plant NaN write their bundles under tmp."""
    monkeypatch.setenv("GRADFLOW_FLIGHT_RECORDER_DIRECTORY", str(tmp_path_factory.mktemp("flight")))
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def train(model, opt, steps=20, agent=None, seed=0) -> list[float]:
    """`steps` optimizer steps of a regression on 8 inputs (the small test models), with `agent.step`."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if agent is not None:
            agent.step(loss=loss)
        losses.append(loss.item())
    return losses
