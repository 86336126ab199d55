"""ComparativeAnalyzer (analyses, models, checkpoint files, training timeline) and gradient_scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradflow_agent.analyze import (
    ComparativeAnalyzer,
    GradientScale,
    ScaleGradient,
    gradient_scale,
    load_state_dict,
)
from gradflow_agent.analyze import pathologies as P

X, Y = P.classification_data()


def test_gradient_scale():
    x = torch.randn(5, requires_grad=True)
    y = gradient_scale(x, 0.01)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, 0.01 * torch.arange(5.0))
    x.grad = None
    (GradientScale.apply(x, -1.0) * 2).sum().backward()  # gradient reversal
    assert torch.allclose(x.grad, torch.full((5,), -2.0))
    x.grad = None
    layer = ScaleGradient(0.0)
    layer(x).sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and "factor=0" in repr(layer)


def test_compare_checkpoints_reads_weights_only_and_leaves_the_model(tmp_path):
    healthy, dead = P.healthy_mlp(), P.healthy_mlp()
    with torch.no_grad():
        dead[2].bias[:56] = -20.0  # what a too-large learning rate can do to a ReLU layer
    torch.save(healthy.state_dict(), tmp_path / "epoch1.pt")
    torch.save({"state_dict": dead.state_dict(), "epoch": 9}, tmp_path / "epoch9.pt")
    model = P.healthy_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comp = ComparativeAnalyzer(steps=3)
    diff = comp.compare_checkpoints(model, tmp_path / "epoch1.pt", tmp_path / "epoch9.pt", X, Y, F.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert diff.name_a == "epoch1.pt" and diff.name_b == "epoch9.pt"
    assert diff.verdict == "degraded" and diff.overall_b < diff.overall_a
    assert ("dead", "3") in {(i.kind, i.layer) for i in diff.new_issues}
    assert diff.resolved_issues == [] and "3" in {d.layer for d in diff.degraded()}
    back = comp.compare("epoch9.pt", "epoch1.pt")
    assert back.verdict == "improved" and {(i.kind, i.layer) for i in back.resolved_issues} == \
        {(i.kind, i.layer) for i in diff.new_issues}
    d = diff.to_dict()
    assert d["verdict"] == "degraded" and d["layers"][0]["layer"] == "0"


def test_load_state_dict_refuses_code_and_non_state_dicts(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="no state dict"):
        load_state_dict(tmp_path / "meta.pt")
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")  # a whole module: not weights only
    with pytest.raises(Exception, match="(?i)weights"):
        load_state_dict(tmp_path / "pickled_module.pt")
    torch.save({"model_state_dict": nn.Linear(2, 2).state_dict()}, tmp_path / "ok.pt")
    assert set(load_state_dict(tmp_path / "ok.pt")) == {"weight", "bias"}


def test_compare_models_and_track_training():
    comp = ComparativeAnalyzer(steps=2)
    diff = comp.compare_models(P.dead_relu(), P.healthy_mlp(), X, Y, F.cross_entropy, names=("dead", "fixed"))
    assert diff.verdict == "improved" and "dead" in {i.kind for i in diff.resolved_issues}
    assert set(comp.analyses) == {"dead", "fixed"}

    model = P.healthy_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(0, 30):
        if step % 10 == 0:
            comp.track_training(model, X, Y, F.cross_entropy, step=step)
        opt.zero_grad()
        F.cross_entropy(model(X), Y).backward()
        opt.step()
    health = comp.get_health_evolution()
    pressure = comp.get_pressure_evolution("0")
    assert [s for s, _ in health] == [0, 10, 20] and [s for s, _ in pressure] == [0, 10, 20]
    assert [p for _, p in pressure] == [r.get_layer("0").mean_pressure for _, r in comp.timeline]
    assert len(set(p for _, p in pressure)) == 3  # the model trained between the snapshots
    assert [s for s, _ in comp.get_health_evolution("6")] == [0, 10, 20]
    sec = comp.evolution_section(["0", "6"])
    assert sec["series"][0]["x"] == [0, 10, 20] and set(sec["series"][1]["y"]) == {"0", "6"}
