"""Language models as people build them: a tiny Llama (from a config, no download, CPU) trained by
transformers' `Trainer` with the shipped `GradflowCallback`, by `accelerate.Accelerator`, and a collapsed
one paging `AttentionCollapse` through a real Prometheus that loads the shipped rule file.

MoE routers (a forced router with a dead expert, a balanced one silent) are covered by tests/test_moe.py
(`test_a_router_sending_everything_to_one_expert_is_imbalanced_and_has_dead_experts`,
`test_loads_sum_to_top_k_and_imbalance_matches_a_hand_computation_from_the_router_logits`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradflow_agent
from tests.alerting.test_alerting_e2e import _panels, _substitute
from tests.conftest import config
from tests.support.prometheus import PrometheusServer, require_binary, rules_without_delay

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)

from gradflow_agent.integrations import GradflowCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 64
STEPS = 4
ACCUMULATION = 2
DEPTH = 2
ATTENTION = [f"model.layers.{i}.self_attn" for i in range(DEPTH)]
ATTENTION_CFG = {"attention": {"enabled": True}}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def llama(seed: int = 0, collapsed: bool = False) -> LlamaForCausalLM:
    """A 2-layer Llama of width 32; `collapsed`: q/k weights x100, so that every softmax row is one-hot."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=DEPTH, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=32, attn_implementation="sdpa"))
    if collapsed:
        with torch.no_grad():
            for block in model.model.layers:
                block.self_attn.q_proj.weight.mul_(100.0)
                block.self_attn.k_proj.weight.mul_(100.0)
    return model


def mixtral(seed: int = 0) -> MixtralForCausalLM:
    """A 2-layer Mixtral of width 32, 4 experts, top-2: a freshly initialised, balanced router per layer."""
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=DEPTH, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
                                            attn_implementation="sdpa"))


class Tokens(torch.utils.data.Dataset):
    """Random token ids, the labels a copy (causal LM)."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


def train_with_trainer(model: PreTrainedModel, callback: GradflowCallback, out: Path) -> Trainer:
    """STEPS optimizer steps of ACCUMULATION micro-batches each, through the real Trainer."""
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                             gradient_accumulation_steps=ACCUMULATION, logging_steps=1, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback])
    trainer.train()
    return trainer


def _extra(snap: Any, name: str) -> dict[str, float]:
    """layer -> value of one plug-in gauge in the snapshot."""
    return {labels["layer"]: value for m, labels, value in snap.extra if m.name == name}


# -- a) the Trainer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model = llama()
    callback = GradflowCallback(config(stats=ATTENTION_CFG), detach_at_end=False)
    micro_batches: list[int] = []
    handle = model.register_forward_hook(lambda *_: micro_batches.append(1))
    trainer = train_with_trainer(model, callback, tmp_path_factory.mktemp("hf-trainer"))
    handle.remove()
    agent = callback.agent
    snap = agent.snapshot()
    agent.detach()
    return {"model": model, "trainer": trainer, "agent": agent, "snap": snap, "micro_batches": len(micro_batches)}


def test_trainer_layer_names_are_the_modules_names_users_read(trainer_run: dict[str, Any]) -> None:
    snap, model = trainer_run["snap"], trainer_run["model"]
    modules = dict(model.named_modules())
    assert all(name in modules for name in snap.layers), [n for n in snap.layers if n not in modules]
    expected = {"model.embed_tokens", "lm_head", "model.norm", *ATTENTION}
    for i in range(DEPTH):
        expected |= {f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        expected |= {f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert expected <= set(snap.layers), sorted(expected - set(snap.layers))
    assert len(set(snap.layers)) == len(snap.layers)
    q = snap.layers.index("model.layers.0.self_attn.q_proj")
    assert snap.layer_types[q] == "Linear" and snap.stats["grad_pressure"][q] > 0


def test_trainer_attention_layers_have_attention_statistics(trainer_run: dict[str, Any]) -> None:
    snap = trainer_run["snap"]
    exported = _extra(snap, "gradflow_attention_entropy_ratio")
    assert sorted(exported) == ATTENTION  # only the attention layers, named as the modules
    for name in ATTENTION:
        i = snap.layers.index(name)
        assert snap.layer_types[i] == "LlamaAttention"
        entropy, max_prob = snap.stats["attention_entropy"][i], snap.stats["attention_max_prob"][i]
        assert 0.9 < entropy <= 1.0 and 0.0 < max_prob < 0.5  # a fresh Llama attends broadly
        assert 0.0 < snap.stats["attention_head_diversity"][i] <= 1.0
        assert exported[name] == pytest.approx(entropy)
        assert _extra(snap, "gradflow_attention_max_prob_ratio")[name] == pytest.approx(max_prob)
    others = [n for n in snap.layers if n not in ATTENTION]
    assert all(math.isnan(snap.stats["attention_entropy"][snap.layers.index(n)]) for n in others)


def test_trainer_run_is_healthy_with_one_agent_step_per_optimizer_step(trainer_run: dict[str, Any]) -> None:
    snap, agent, trainer = trainer_run["snap"], trainer_run["agent"], trainer_run["trainer"]
    assert trainer.state.global_step == STEPS and trainer_run["micro_batches"] == STEPS * ACCUMULATION
    assert agent.steps == STEPS and snap.step == STEPS
    assert not [i for i in snap.issues if i.kind == "attention_collapse"]
    assert not snap.issues, [str(i) for i in snap.issues]  # warmup 0: every rule judged every layer
    assert all(snap.health[snap.layers.index(n)] == 100.0 for n in ATTENTION)
    assert snap.errors == {}


# -- b) Accelerate ----------------------------------------------------------------------------------------------
def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (4, 12), generator=g) for _ in range(STEPS)]


def _plain(with_agent: bool) -> tuple[list[torch.Tensor], Any]:
    """Plain PyTorch: AdamW on the same seed and batches, the agent optionally attached with the optimizer."""
    model = llama(seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    agent = gradflow_agent.attach(model, config(stats=ATTENTION_CFG), optimizer=opt) if with_agent else None
    losses = []
    for ids in _batches():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if agent is not None:
            agent.step(loss=loss)
        losses.append(loss.detach())
    snap = agent.snapshot() if agent is not None else None
    if agent is not None:
        agent.detach()
    return losses, snap


def _accelerated(with_agent: bool, *, wrapped_optimizer: bool = False) -> tuple[list[torch.Tensor], Any]:
    """The same run through `Accelerator.prepare` and `accelerator.backward`; the agent on the unwrapped
    model with the torch optimizer inside accelerate's wrapper (or, `wrapped_optimizer`, the wrapper)."""
    accelerator = Accelerator(cpu=True)
    model = llama(seed=3)
    prepared, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    agent = None
    if with_agent:
        given = opt if wrapped_optimizer else opt.optimizer
        agent = gradflow_agent.attach(accelerator.unwrap_model(prepared), config(stats=ATTENTION_CFG),
                                      optimizer=given)
    losses = []
    for ids in _batches():
        loss = prepared(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        if agent is not None:
            agent.step(loss=loss)
        losses.append(loss.detach())
    snap = agent.snapshot() if agent is not None else None
    if agent is not None:
        assert agent.steps == STEPS
        agent.detach()
    return losses, snap


def test_accelerate_run_has_the_statistics_of_the_plain_pytorch_run() -> None:
    bare, _ = _accelerated(False)
    watched, acc = _accelerated(True)
    plain, ref = _plain(True)
    assert all(torch.equal(a, b) for a, b in zip(bare, watched))  # bit-identical with and without the agent
    assert all(torch.equal(a, b) for a, b in zip(bare, plain))  # and equal to plain PyTorch
    assert acc.layers == ref.layers and acc.step == ref.step == STEPS
    assert acc.loss == ref.loss and acc.grad_norm == ref.grad_norm
    for statistic, values in ref.stats.items():
        assert np.array_equal(acc.stats[statistic], values, equal_nan=True), statistic
    for name in ATTENTION:  # measured, not two NaN columns that happen to match
        assert math.isfinite(acc.stats["attention_entropy"][acc.layers.index(name)])
    assert _extra(acc, "gradflow_attention_entropy_ratio") == _extra(ref, "gradflow_attention_entropy_ratio")


def test_accelerate_optimizer_wrapper_can_be_given_to_attach() -> None:
    """attach() unwraps accelerate's AcceleratedOptimizer (a torch Optimizer subclass without hook dicts)."""
    watched, snap = _accelerated(True, wrapped_optimizer=True)
    assert snap.step == STEPS


# -- c) a real Prometheus with the shipped rules -----------------------------------------------------------------
def _exporting_run(name: str, model: PreTrainedModel, out: Path) -> Any:
    """A Trainer run with the Prometheus exporter on; the agent is left attached (it keeps serving)."""
    cfg = config(stats=ATTENTION_CFG, run={"name": name},
                 exporters={"prometheus": {"enabled": True, "port": 0, "addr": "127.0.0.1"}})
    callback = GradflowCallback(cfg, detach_at_end=False)
    train_with_trainer(model, callback, out)
    callback.agent.snapshot()  # publish the final state
    return callback.agent


def test_attention_collapse_pages_once_for_the_collapsed_run_and_never_for_the_healthy_one(tmp_path: Path) -> None:
    require_binary("prometheus", "prometheus")
    agents = {}
    try:
        for run, model in (("llama-collapsed", llama(collapsed=True)), ("llama-healthy", llama()),
                           ("mixtral", mixtral())):
            agents[run] = _exporting_run(run, model, tmp_path / run)
        collapsed_issues = {(i.kind, i.layer) for i in agents["llama-collapsed"].latest.issues}
        assert collapsed_issues == {("attention_collapse", n) for n in ATTENTION}, collapsed_issues
        assert not agents["llama-healthy"].latest.issues and not agents["mixtral"].latest.issues
        targets = [a.prometheus_url.split("/")[2] for a in agents.values()]
        cfg = {"scrape_configs": [{"job_name": "gradflow-hf", "static_configs": [{"targets": targets}]}]}
        started = time.time()
        with PrometheusServer(cfg, rule_files=[rules_without_delay(tmp_path)]) as prom:
            prom.wait_for_targets(len(agents), timeout=30)

            def of(run: str) -> list[dict[str, Any]]:
                return [a for a in prom.alerts() if a["labels"].get("run") == run]

            prom.wait_until(lambda: [a for a in of("llama-collapsed") if a["state"] == "firing"], timeout=30,
                            what="AttentionCollapse for the collapsed run")
            for run in ("llama-healthy", "mixtral"):
                prom.wait_until(lambda run=run: prom.query(f'job_run:gradflow_issue_layers:max{{run="{run}"}}'),
                                timeout=15, what=f"the recorded issue counts of {run}")
            time.sleep(2.5)  # the alert group evaluates the healthy runs' records at least twice
            collapsed = of("llama-collapsed")
            assert [(a["labels"]["alertname"], a["labels"]["severity"], a["state"]) for a in collapsed] == [
                ("AttentionCollapse", "critical", "firing")], collapsed
            assert "First: model.layers.0.self_attn (" in collapsed[0]["annotations"]["description"]
            assert of("llama-healthy") == [] and of("mixtral") == []
            window = f"[{int(time.time() - started) + 5}s:1s]"
            ever = prom.query(f'max_over_time(ALERTS{{job="gradflow-hf"}}{window})')
            assert {(s["metric"]["run"], s["metric"]["alertname"]) for s in ever} == {
                ("llama-collapsed", "AttentionCollapse")}, ever
            _plugin_panels_have_data(prom)
    finally:
        for agent in agents.values():
            agent.detach()


def _plugin_panels_have_data(prom: PrometheusServer) -> None:
    """The Layers dashboard's attention and MoE panels return data for these runs (the demo runs of the
    dashboard e2e test have neither, and skip them)."""
    dashboard = json.loads((ROOT / "grafana/dashboards/gradflow-layers.json").read_text(encoding="utf-8"))
    values = {"job": "gradflow-hf", "run": "(llama-collapsed|mixtral)", "rank": "0", "instance": ".+",
              "layer": ".+", "__rate_interval": "10s", "datasource": "prometheus"}
    panels = {p["title"]: [_substitute(t["expr"], values) for t in p["targets"]] for p in _panels(dashboard)}
    plugin = {title: exprs for title, exprs in panels.items()
              if re.search(r"gradflow_(attention|moe)_", " ".join(exprs))}
    families = {m for exprs in plugin.values() for m in re.findall(r"gradflow_(attention|moe)_", " ".join(exprs))}
    assert families == {"attention", "moe"}, sorted(plugin)
    empty = [title for title, exprs in plugin.items() if not any(prom.query(e) for e in exprs)]
    assert not empty, empty
