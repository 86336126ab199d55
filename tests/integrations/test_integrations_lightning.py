"""GradflowLightningCallback with the real Lightning Trainer on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning")

import gradflow_agent  # noqa: E402
from gradflow_agent.integrations import GradflowLightningCallback  # noqa: E402

CLIP = 0.01


class Classifier(L.LightningModule):
    def __init__(self, callback_ref: list | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
        self.losses: list[float] = []
        self.active_during_validation: list[bool] = []
        self.callback_ref = callback_ref or []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        for cb in self.callback_ref:
            if cb.agent is not None:
                self.active_during_validation.append(cb.agent.hooks.active)
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Reference(L.Callback):
    """The global gradient norm at on_before_optimizer_step (unscaled, not yet clipped)."""

    def __init__(self) -> None:
        self.norms: list[float] = []
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(math.sqrt(sum(p.grad.double().square().sum().item() for p in pl_module.parameters())))
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = (x[:, :4]).argmax(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(callbacks, **kwargs):
    return L.Trainer(callbacks=callbacks, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


AGENT_CFG = {"exporters": {"prometheus": {"enabled": False}},
             "sampling": {"export_every_n_steps": 1000, "export_every_seconds": 3600.0}}


@pytest.fixture(scope="module")
def accumulated():
    torch.manual_seed(0)
    callback = GradflowLightningCallback(AGENT_CFG, dynamics={"interval": 2, "sparse_quality_thresholds": [1e-4],
                                                              "momentum_enabled": True}, detach_at_end=False)
    ref = Reference()
    model = Classifier([callback])
    trainer = _trainer([callback, ref], max_steps=4, accumulate_grad_batches=2, gradient_clip_val=CLIP,
                       limit_val_batches=2, val_check_interval=4, num_sanity_val_steps=1)
    trainer.fit(model, _loader(), _loader())
    active_after_fit = callback.agent.hooks.active
    snap = callback.agent.snapshot()
    callback.agent.detach()
    return {"callback": callback, "ref": ref, "model": model, "trainer": trainer, "snap": snap,
            "active_after_fit": active_after_fit}


def _extra(snap, name):
    return {tuple(sorted(labels.items())): value for m, labels, value in snap.extra if m.name == name}


def test_one_agent_step_per_optimizer_step_with_accumulation(accumulated):
    assert accumulated["trainer"].global_step == 4
    assert accumulated["callback"].agent.steps == 4
    assert len(accumulated["ref"].norms) == 4
    assert len(accumulated["model"].losses) == 8  # two micro-batches per step


def test_gradients_are_read_before_clipping_at_on_before_optimizer_step(accumulated):
    snap, ref = accumulated["snap"], accumulated["ref"]
    assert snap.grad_norm == pytest.approx(ref.norms[-1], rel=1e-6)
    assert all(n > 10 * CLIP for n in ref.norms)  # so the reading is really before clipping
    info = _extra(snap, "gradflow_integration_info")
    assert [dict(k)["grad_read_at"] for k in info] == ["on_before_optimizer_step"]
    assert [dict(k)["clipping"] for k in info] == ["before_clipping"]


def test_loss_and_learning_rate_are_forwarded(accumulated):
    snap, model, ref = accumulated["snap"], accumulated["model"], accumulated["ref"]
    assert snap.loss == pytest.approx(sum(model.losses) / len(model.losses), rel=1e-6)
    assert ref.lrs == [0.5, 0.25, 0.125, 0.0625]
    assert _extra(snap, "gradflow_learning_rate")[(("param_group", "0"),)] == ref.lrs[-1]


def test_validation_forwards_do_not_feed_the_agent_and_dynamics_run(accumulated):
    model, snap = accumulated["model"], accumulated["snap"]
    assert model.active_during_validation and not any(model.active_during_validation)
    assert accumulated["active_after_fit"] is True  # restored after the validation at the last step
    assert accumulated["callback"].agent.errors.total == 0
    assert _extra(snap, "gradflow_dynamics_measurements_total")[()] == 2.0
    kl = _extra(snap, "gradflow_sparse_kl_divergence")
    assert set(kl) == {(("mask", "magnitude"), ("threshold", "0.0001")), (("mask", "random"), ("threshold", "0.0001"))}
    assert _extra(snap, "gradflow_dynamics_momentum_l2_norm")[()] > 0  # the real optimizer's state, not the inert one


def test_without_the_callback_an_optimizer_hook_would_read_the_previous_steps_gradients():
    """Why the callback reads at on_before_optimizer_step: Lightning runs backward inside optimizer.step."""
    torch.manual_seed(0)
    callback = GradflowLightningCallback(AGENT_CFG, detach_at_end=False)

    class Naive(L.Callback):
        agent = None

        def on_fit_start(self, trainer, pl_module):
            self.agent = gradflow_agent.attach(pl_module, AGENT_CFG, optimizer=trainer.optimizers[0])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.agent.step()

    naive, ref = Naive(), Reference()
    trainer = _trainer([callback, naive, ref], max_steps=3, limit_val_batches=0)
    trainer.fit(Classifier(), _loader())
    ours, theirs = callback.agent.snapshot(), naive.agent.snapshot()
    callback.agent.detach()
    naive.agent.detach()
    assert ours.grad_norm == pytest.approx(ref.norms[-1], rel=1e-6)
    assert theirs.grad_norm == pytest.approx(ref.norms[-2], rel=1e-6)  # stale by one step
    assert ref.norms[-1] != pytest.approx(ref.norms[-2], rel=1e-3)
