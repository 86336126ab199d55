"""The dynamics plug-in inside the agent: Prometheus/OTel/JSONL export, fail-safety, no side effects, config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import gradflow_agent
from gradflow_agent.config import load_default
from gradflow_agent.dynamics import AnalysisConfig, DynamicsPlugin, MetricComputer, attach_dynamics
from gradflow_agent.dynamics.sparse_quality import bits_equal

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**exporters) -> dict:
    return {"exporters": {"prometheus": {"enabled": False}, **exporters},
            "sampling": {"export_every_n_steps": 1000, "export_every_seconds": 3600.0},
            "stats": {"parameters": {"every_n_steps": 1}}, "thresholds": {"warmup_steps": 0}}


class Block(nn.Module):
    """Llama-style names, so that components are recognised."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj",
                                                                                  "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, 2 * d), "up_proj": nn.Linear(d, 2 * d),
                                  "down_proj": nn.Linear(2 * d, d)})

    def forward(self, x):
        a = self.self_attn
        h = x + a["o_proj"](torch.softmax(a["q_proj"](x) @ a["k_proj"](x).transpose(-1, -2), -1) @ a["v_proj"](x))
        m = self.mlp
        return h + m["down_proj"](F.silu(m["gate_proj"](h)) * m["up_proj"](h))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, n: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def _train(model, opt, agent, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 32, (4, 6), generator=g)
        loss = F.cross_entropy(model(ids).reshape(-1, 32), ids.roll(1, 1).reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        agent.step(loss=loss)


DYN = {"interval": 2, "param_change_per_layer": True, "param_change_track_components": True,
       "sparse_quality_thresholds": [1e-6, 1e-4]}


def test_the_agent_exports_param_change_and_sparse_metrics_to_prometheus_and_jsonl(tmp_path):
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, _cfg(prometheus={"enabled": True, "port": 0, "addr": "127.0.0.1"},
                                              jsonl={"enabled": True, "path": str(tmp_path / "s.jsonl")}),
                                  optimizer=opt)
    plugin = attach_dynamics(agent, DYN)
    _train(model, opt, agent, 4)
    agent.snapshot()
    text = urllib.request.urlopen(agent.prometheus_url, timeout=5).read().decode()
    agent.detach()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("run", "rank")))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("gradflow_param_change_l2_norm", ())] > 0
    assert samples[("gradflow_param_change_window_steps", ())] == 2.0
    assert 0 <= samples[("gradflow_param_change_sparsity_ratio", (("threshold", "1e-06"),))] <= 1
    assert samples[("gradflow_param_change_layer_mean_abs", (("layer", "layers.1"),))] > 0
    components = {dict(k[1])["component"] for k in samples if k[0] == "gradflow_param_change_component_l2_norm"}
    assert components == {"embedding", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                          "head"}
    for mask in ("magnitude", "random"):
        assert ("gradflow_sparse_kl_divergence", (("mask", mask), ("threshold", "0.0001"))) in samples
    assert samples[("gradflow_sparse_kept_ratio", (("threshold", "1e-06"),))] > 0.5
    assert samples[("gradflow_dynamics_measurements_total", ())] == 2.0
    assert samples[("gradflow_dynamics_last_measurement_step", ())] == 4.0
    assert {dict(k[1])["computer"] for k in samples if k[0] == "gradflow_dynamics_compute_seconds_total"} >= {
        "param_change", "sparse_quality", "snapshot"}
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    extra = {e["name"] for e in records[-1]["extra"]}
    assert {"gradflow_param_change_l2_norm", "gradflow_sparse_top1_agreement_ratio",
            "gradflow_param_change_component_sparsity_ratio"} <= extra
    assert plugin._handle is None  # the capture hook is gone after detach
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert not [line for line in (lint.stdout + lint.stderr).splitlines()
                    if "gradflow_param_change" in line or "gradflow_sparse" in line or "gradflow_dynamics" in line]


def test_the_plugin_metric_names_survive_the_otel_to_prometheus_translation():
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, generate_latest

    from gradflow_agent.export.otel import OtelExporter

    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
    plugin = attach_dynamics(agent, AnalysisConfig.comprehensive(interval=2))
    _train(model, opt, agent, 4)
    agent.snapshot()
    exporter = OtelExporter(agent, gradflow_agent.load_config(_cfg(otel={"enabled": True})).exporters.otel,
                            reader=PrometheusMetricReader())
    exporter.register(plugin.metrics)
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        exporter.provider.shutdown()
        agent.detach()
    exposed = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    no_data = {"gradflow_dynamics_value", "gradflow_dynamics_skipped_total"}  # no custom keys, nothing skipped
    expected = {m.name for m in plugin.metrics if m.name not in no_data}
    assert expected - exposed == set()
    assert all(re.fullmatch(r"gradflow_(param_change|sparse|dynamics)_[a-z0-9_]+", m.name) for m in plugin.metrics)


def test_the_analysis_has_no_side_effect_on_training_or_on_the_agent_statistics():
    torch.manual_seed(0)
    a_model = TinyLM()
    b_model = TinyLM()
    b_model.load_state_dict(a_model.state_dict())
    a_opt = torch.optim.Adam(a_model.parameters(), lr=1e-2)
    b_opt = torch.optim.Adam(b_model.parameters(), lr=1e-2)
    a = gradflow_agent.attach(a_model, _cfg(), optimizer=a_opt)
    b = gradflow_agent.attach(b_model, _cfg(), optimizer=b_opt)
    attach_dynamics(b, AnalysisConfig.comprehensive(interval=2))
    rng = torch.get_rng_state()
    torch.manual_seed(1)
    _train(a_model, a_opt, a, 6)
    rng_a = torch.get_rng_state()
    torch.manual_seed(1)
    _train(b_model, b_opt, b, 6)
    assert torch.equal(torch.get_rng_state(), rng_a)
    torch.set_rng_state(rng)
    sa, sb = a.snapshot(), b.snapshot()
    a.detach()
    b.detach()
    for (name, pa), pb in zip(a_model.named_parameters(), b_model.parameters()):
        assert bits_equal(pa, pb), name
    for key in ("activation_mean", "activation_absmax", "grad_pressure", "update_ratio"):
        assert sa.stats[key].tolist() == sb.stats[key].tolist(), key
    assert sb.errors == {} and any(m.name.startswith("gradflow_sparse") for m, _, _ in sb.extra)


def test_errors_are_counted_by_the_agent_and_a_changed_architecture_recovers():
    class Broken(MetricComputer):
        name = "broken"

        def compute(self, **kwargs):
            raise RuntimeError("plug-in bug")

    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
    plugin = DynamicsPlugin({"interval": 2, "sparse_quality_enabled": False})
    plugin.manager.add_metric(Broken())
    plugin.bind(agent)
    agent.add_plugin(plugin)
    _train(model, opt, agent, 4)
    assert agent.errors.counts["dynamics.broken"] == 2
    model.layers.append(Block(16))  # not called in forward, but its parameters are new
    opt.add_param_group({"params": list(model.layers[2].parameters())})
    _train(model, opt, agent, 4)
    snap = agent.snapshot()
    agent.detach()
    assert snap.errors["dynamics"] == 1  # the mismatch at step 6, then a new baseline at step 7
    assert plugin.manager.last_step == 8 and plugin.manager.last_results["param_change/window_steps"] == 1.0
    assert any(m.name == "gradflow_param_change_l2_norm" for m, _, _ in snap.extra)


def test_a_probe_batch_is_used_instead_of_the_captured_call():
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, _cfg(), optimizer=opt)
    probe = torch.randint(0, 32, (2, 3))
    seen = []
    plugin = attach_dynamics(agent, {"interval": 2, "sparse_quality_thresholds": [1e-4],
                                     "sparse_quality_include_random": False}, inputs=probe)
    plugin.manager.metrics[1].forward_fn = lambda m, inputs: (seen.append(inputs.shape), m(inputs))[1]
    _train(model, opt, agent, 2)
    agent.detach()
    assert seen == [(2, 3), (2, 3)] and plugin._handle is None
    with pytest.raises(ValueError, match="already runs a dynamics plug-in"):
        attach_dynamics(agent, {"interval": 5})


DEFAULT_YAML = Path(gradflow_agent.__file__).with_name("default.yaml")


def _dynamics_yaml() -> dict:
    return load_default()["dynamics"]


def test_the_config_section_matches_the_plugin_and_seed_002_defaults():
    text = DEFAULT_YAML.read_text()
    text = text[text.index("\ndynamics:"):text.index("\nlog:")]
    block = _dynamics_yaml()
    cfg = AnalysisConfig.from_mapping(block)
    assert cfg == AnalysisConfig(enabled=False)  # every default as in the dataclass, off in the agent
    assert set(block) == set(AnalysisConfig().to_dict())
    seed = {"interval": 100, "snapshot_device": "cpu", "snapshot_dtype": "float32", "param_change_enabled": True,
            "param_change_thresholds": [1e-8, 1e-6, 1e-4], "param_change_per_layer": False,
            "param_change_track_components": False, "sparse_quality_enabled": True,
            "sparse_quality_thresholds": [1e-8, 1e-6, 1e-4], "sparse_quality_include_random": True,
            "gradient_enabled": False, "momentum_enabled": False}
    assert {k: block[k] for k in seed} == seed  # floats in YAML, not strings
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^  \w+:", line):
            assert lines[i - 1].strip().startswith("#"), f"key without a comment: {line}"


def test_the_agent_reads_the_dynamics_section():
    model = TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    agent = gradflow_agent.attach(model, {**_cfg(), "dynamics": {"enabled": True, "interval": 2,
                                                                 "snapshot_dtype": "bfloat16"}}, optimizer=opt)
    assert agent.config.dynamics.interval == 2
    plugin = next(p for p in agent.plugins if isinstance(p, DynamicsPlugin))
    assert plugin.config.snapshot_dtype == "bfloat16" and plugin.config.param_change_thresholds == (1e-8, 1e-6, 1e-4)
    _train(model, opt, agent, 2)
    snap = agent.snapshot()
    agent.detach()
    assert any(m.name == "gradflow_param_change_l2_norm" for m, _, _ in snap.extra)
    with pytest.raises(gradflow_agent.ConfigError, match="dynamics.intervall"):
        gradflow_agent.attach(model, {**_cfg(), "dynamics": {"intervall": 2}})
    cfg = gradflow_agent.load_config({"dynamics": {"param_change_thresholds": [1e-5, 1e-3]}})
    assert AnalysisConfig.from_mapping(cfg.dynamics).param_change_thresholds == (1e-5, 1e-3)
    with pytest.raises(gradflow_agent.ConfigError, match="dynamics.param_change_thresholds"):
        gradflow_agent.load_config({"dynamics": {"param_change_thresholds": ["small"]}})
