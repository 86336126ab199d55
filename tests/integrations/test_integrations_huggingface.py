"""GradflowCallback with the real transformers.Trainer: a tiny Llama built from a config (no download), CPU."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from gradflow_agent.dynamics import DynamicsPlugin  # noqa: E402
from gradflow_agent.integrations import GradflowCallback  # noqa: E402

VOCAB = 64
STEPS = 4
MAX_GRAD_NORM = 0.05


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids.clone()}


class Recorder(TrainerCallback):
    """What the Trainer itself says: logged losses/learning rates, and the gradient norm at the step pre-hook."""

    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.pre_step_norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.pre_step_norms.append(math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()
                                                 if p.grad is not None)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    callback = GradflowCallback({"exporters": {"prometheus": {"enabled": False}},
                                 "sampling": {"export_every_n_steps": 1000, "export_every_seconds": 3600.0},
                                 "stats": {"parameters": {"every_n_steps": 1}}},
                                dynamics={"interval": 2, "param_change_track_components": True,
                                          "param_change_per_layer": True, "sparse_quality_thresholds": [1e-4]},
                                detach_at_end=False)
    recorder = Recorder()
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("hf")), max_steps=STEPS,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                             learning_rate=1e-2, max_grad_norm=MAX_GRAD_NORM, report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, recorder])
    trainer.train()
    agent = callback.agent
    snap = agent.snapshot()
    hooks_during = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    captured = set(callback.dynamics_plugin.inputs.kwargs)
    agent.detach()
    hooks_after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return {"trainer": trainer, "callback": callback, "recorder": recorder, "agent": agent, "snap": snap,
            "hooks": (hooks_during, hooks_after),
            "captured": captured}


def _extra(snap, name):
    return {tuple(sorted(labels.items())): value for m, labels, value in snap.extra if m.name == name}


def test_one_agent_step_per_optimizer_step_with_gradient_accumulation(run):
    assert run["trainer"].state.global_step == STEPS
    assert run["agent"].steps == STEPS
    assert run["snap"].counters["optimizer_steps_skipped_total"] == 0
    assert run["agent"].hooks.optimizer is run["trainer"].optimizer.optimizer  # the torch optimizer inside


def test_gradients_are_read_after_clipping_and_after_the_pre_optimizer_step_callback(run):
    pre = run["recorder"].pre_step_norms
    assert len(pre) == STEPS and all(n <= MAX_GRAD_NORM * 1.001 for n in pre)  # the Trainer clipped them
    assert run["snap"].grad_norm == pytest.approx(pre[-1], rel=1e-5)  # the agent saw the same gradients
    raw = [log["grad_norm"] for log in run["recorder"].logs]
    assert all(r > 2 * MAX_GRAD_NORM for r in raw)  # clipping really changed them
    assert _extra(run["snap"], "gradflow_grad_norm_before_clip")[()] == pytest.approx(raw[-1], rel=1e-5)
    info = _extra(run["snap"], "gradflow_integration_info")
    assert list(info) == [(("clipping", "after_clipping"), ("framework", "transformers"),
                           ("framework_version", transformers.__version__),
                           ("grad_read_at", "optimizer_step_pre_hook"))]


def test_the_trainer_loss_and_learning_rate_are_forwarded(run):
    logs = run["recorder"].logs
    assert len(logs) == STEPS
    agent_loss = run["snap"].loss  # mean over the steps since the last snapshot (all of them)
    assert agent_loss == pytest.approx(sum(log["loss"] for log in logs) / STEPS, rel=1e-5)
    lr = _extra(run["snap"], "gradflow_learning_rate")
    assert lr[(("param_group", "0"),)] == pytest.approx(logs[-1]["learning_rate"])


def test_dynamics_metrics_name_the_llama_components(run):
    snap = run["snap"]
    components = {dict(k)["component"] for k in _extra(snap, "gradflow_param_change_component_l2_norm")}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embedding", "head",
            "norm"} == components
    layers = {dict(k)["layer"] for k in _extra(snap, "gradflow_param_change_layer_l2_norm")}
    assert {"model.layers.0", "model.layers.1", "model.embed_tokens", "lm_head", "model.norm"} == layers
    kl = _extra(snap, "gradflow_sparse_kl_divergence")
    assert kl[(("mask", "random"), ("threshold", "0.0001"))] > kl[(("mask", "magnitude"), ("threshold", "0.0001"))]
    plugin = run["callback"].dynamics_plugin
    assert isinstance(plugin, DynamicsPlugin) and plugin.manager.measurements == STEPS // 2
    assert run["captured"] >= {"input_ids", "labels"}  # the captured Trainer batch
    assert snap.errors == {}


def test_detach_removes_every_hook(run):
    during, after = run["hooks"]
    assert during > 0 and after == 0
