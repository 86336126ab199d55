"""Finding mixture-of-experts routers and hooking them: the statistics of stats/moe.py as an agent plug-in.

    agent = gradflow_agent.attach(model, optimizer=opt)   # stats.moe.enabled (default): routers found -> on
    agent.observe_router("blocks.3.moe", logits, top_k=2)  # a hand-written router, from its forward

Routers are found three ways (docs/moe.md):

- transformers 5.x MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...): the
  sparse block's `gate` is a `*TopKRouter` module (`top_k`, `num_experts`, a (E, hidden) `weight`) whose
  forward returns `(router_logits, router_scores, router_indices)`: the top-k is taken inside the router,
  so the chosen experts are read as they are (grouped / biased / sigmoid routers included);
- generically: a module whose class name ends in "Router", or a child named `gate` / `router` of a module
  that also has an `experts` child (older transformers and most hand-written MoE: an `nn.Linear` gate
  returning logits; top-k is then taken from the logits, k from the router's or its parent's `top_k` /
  `num_experts_per_tok`, else `stats.moe.top_k`);
- `stats.moe.routers`: fnmatch globs of module names, for anything else that returns logits or the tuple.

A forward hook (through hooks.add_module_hook: deepcopy/torch.save carry none) on each router reads the
output: a float tensor whose last dimension is E is the logits, an integer tensor the chosen experts. The
hook adds a few device ops (index_add_ of the assignments, softmax entropy of the logits) and no host
sync; it skips inference mode, activation-checkpointing re-runs in backward and the agent's unsampled
steps; under torch.compile it runs in a `torch.compiler.disable` island (a graph break per router call).
Outputs are untouched and no random generator is used, so the loss is bit-identical. A failure is
counted under component "moe" and never raised into the forward.

Router layers are named by the router module (`model.layers.0.mlp.gate`); in the snapshot each is a
layer (the agent's own layer when it hooks the router, as it does for leaf routers, else one added by
the plug-in), so the rule table judges its statistics like any other.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ErrorCounter
from ..export.metrics import Metric
from ..hooks import add_module_hook, in_backward
from ..stats.engine import model_device, transfer
from ..stats.moe import KEYS, MoEStats

log = logging.getLogger("gradflow_agent")

COMPONENT = "moe"
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "k")
_EXPERT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "n_experts")


@dataclass(frozen=True)
class Router:
    """A router found in a model: its name, module, experts and top-k (0: read from its output)."""

    name: str
    module: nn.Module
    num_experts: int
    top_k: int

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


def _int_attr(objs: Iterable[Any], names: tuple[str, ...]) -> int:
    for obj in objs:
        for source in (obj, getattr(obj, "config", None)):
            for name in names:
                value = getattr(source, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return 0


def _experts_of(module: nn.Module, parent: nn.Module | None) -> int:
    n = _int_attr([module] + ([parent] if parent is not None else []), _EXPERT_ATTRS)
    if n:
        return n
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    experts = getattr(parent, "experts", None)
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        return len(experts)
    return 0


def _looks_like_router(name: str, module: nn.Module, parent: nn.Module | None) -> bool:
    if type(module).__name__.lower().endswith("router"):
        return True
    last = name.rsplit(".", 1)[-1]
    return last in ("gate", "router") and parent is not None and isinstance(getattr(parent, "experts", None),
                                                                           nn.Module)


def find_routers(model: nn.Module, globs: Iterable[str] = (), *, top_k: int = 0, auto: bool = True
                 ) -> list[Router]:
    """The routers of `model`, in model order: those `auto` recognises and those named by `globs`.
    `top_k` is the fallback for a router returning logits whose module and parent say nothing."""
    model = getattr(model, "_orig_mod", model)
    globs = list(globs)
    parents: dict[str, nn.Module] = {}
    out: list[Router] = []
    for name, module in model.named_modules():
        for child_name, _child in module.named_children():
            parents.setdefault(f"{name}.{child_name}" if name else child_name, module)
        parent = parents.get(name)
        named = any(fnmatch.fnmatchcase(name, g) for g in globs)
        if not (named or (auto and name and _looks_like_router(name, module, parent))):
            continue
        if any(name.startswith(r.name + ".") for r in out):  # inside a router already found
            continue
        experts = _experts_of(module, parent)
        k = _int_attr([module] + ([parent] if parent is not None else []), _TOP_K_ATTRS) or int(top_k)
        if experts < 2:
            log.warning("gradflow_agent: %s looks like a router but its number of experts is unknown; not "
                        "observed (use agent.observe_router)", name)
            continue
        out.append(Router(name, module, experts, k if k < experts else 0))
    return out


def parse_router_output(output: Any, num_experts: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, chosen experts) of a router's output: a float tensor whose last dim is E is the logits (the
    first one), an integer tensor the chosen experts (the last one); either may be None."""
    tensors = [output] if isinstance(output, torch.Tensor) else \
        [t for t in output if isinstance(t, torch.Tensor)] if isinstance(output, (tuple, list)) else []
    logits = next((t for t in tensors if t.is_floating_point() and t.ndim >= 1 and t.shape[-1] == num_experts),
                  None)
    indices = next((t for t in reversed(tensors) if not t.is_floating_point() and not t.is_complex()
                    and t.dtype != torch.bool and t.ndim >= 1), None)
    return logits, indices


def _compiling() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


# -- the agent plug-in ---------------------------------------------------------------------------------------
def _metric(name: str, help: str, unit: str = "", labels: tuple[str, ...] = ("layer",)) -> Metric:
    return Metric(name, "gauge", help, unit, labels)


LOAD = _metric("gradflow_moe_expert_load_ratio",
               "Fraction of the MoE layer's tokens routed to this expert over the latest complete window "
               "(top-k aware: the experts of a layer sum to top_k). Exported for layers with at most "
               "stats.moe.max_experts experts.", "1", ("layer", "expert"))
IMBALANCE = _metric("gradflow_moe_load_imbalance_ratio",
                    "Load imbalance of the MoE layer: the busiest expert's excess over its fair share "
                    "(max/mean - 1) divided by the largest possible (E/top_k - 1); 0 balanced, 1 the same "
                    "top_k experts get every token.", "1")
DEAD = _metric("gradflow_moe_dead_experts",
               "Experts of the MoE layer that received no token over the latest complete window.")
ENTROPY = _metric("gradflow_moe_router_entropy_ratio",
                  "Mean normalised router entropy H(softmax(logits)) / ln(experts) over the tokens of the "
                  "latest complete window: 1 uniform router, 0 one expert per token.", "1")
EXPERTS = _metric("gradflow_moe_experts", "Experts of the MoE layer (the denominator of the dead-expert ratio "
                  "the detector judges).")
METRICS = (LOAD, IMBALANCE, DEAD, ENTROPY, EXPERTS)


class MoEPlugin:
    """Agent plug-in: router statistics per MoE layer (see the module docstring).

    `layers` are the routers' names and types (the agent adds those it does not hook to the snapshot);
    `collect()` reads every router buffer with one transfer per snapshot and returns the gauges;
    `layer_statistics()` the same window's values for the rule table (KEYS of stats/moe.py).
    """

    name = COMPONENT
    metrics = METRICS

    def __init__(self, model: nn.Module | None = None, routers: Iterable[Router] | None = None, *,
                 globs: Iterable[str] = (), top_k: int = 0, max_experts: int = 64,
                 min_assignments_per_expert: int = 32, device: torch.device | str | None = None) -> None:
        base = getattr(model, "_orig_mod", model)
        if device is None:
            device = model_device(base) if base is not None else "cpu"
        self.stats = MoEStats(device, min_assignments_per_expert=min_assignments_per_expert)
        self.max_experts = int(max_experts)
        self.errors = ErrorCounter()
        self._agent: Any = None
        self._types: dict[str, str] = {}
        self._hooks: list[Any] = []
        self._warned: set[str] = set()
        if routers is None:
            routers = find_routers(base, globs, top_k=top_k) if base is not None else []
        self.routers = list(routers)
        try:
            for r in self.routers:
                self.stats.add_layer(r.name, r.num_experts, r.top_k or 1)
                self._types[r.name] = r.type_name
                self._hooks.append(add_module_hook(r.module, self._hook(r)))
        except BaseException:
            self.close()
            raise
        wide = [r.name for r in self.routers if r.num_experts > self.max_experts]
        if wide:
            log.info("gradflow_agent: %d MoE layers have more than stats.moe.max_experts=%d experts: no "
                     "per-expert series for them (%s, ...)", len(wide), self.max_experts, wide[0])

    # -- hot path ---------------------------------------------------------------------------------------
    def _active(self) -> bool:
        if not self.errors.enabled(COMPONENT):
            return False
        agent = self._agent
        return agent is None or bool(getattr(agent.hooks, "active", True))

    def _hook(self, router: Router) -> Callable[..., None]:
        name, E, k = router.name, router.num_experts, router.top_k

        def observe(output: Any) -> None:
            logits, indices = parse_router_output(output, E)
            if indices is None and not k:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("gradflow_agent: router %s returns no expert indices and its top-k is unknown: "
                                "set stats.moe.top_k or call agent.observe_router", name)
                return
            self.stats.observe(name, logits, indices, k)

        island: list[Callable[[Any], None]] = []

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not self._active() or torch.is_inference_mode_enabled() or in_backward():
                return
            try:
                if _compiling():
                    if not island:
                        disable = getattr(getattr(torch, "compiler", None), "disable", None)
                        island.append(disable(observe) if disable is not None else observe)
                    island[0](output)
                else:
                    with self._clock():
                        observe(output)
            except Exception as exc:  # never hurt the run
                self.errors.record(COMPONENT, exc)
        return hook

    def observe(self, name: str, logits: torch.Tensor | None, top_k: int | None = None,
                indices: torch.Tensor | None = None) -> None:
        """One call of a hand-written router: logits (tokens, E) and top_k, or the chosen experts (tokens, k).
        Skipped like the hooks (inference mode, checkpoint re-runs, unsampled steps); failures counted."""
        if not self._active() or torch.is_inference_mode_enabled() or in_backward() or _compiling():
            return
        try:
            with self._clock():
                self.stats.observe(name, logits, indices, top_k)
            self._types.setdefault(name, "Router")
        except Exception as exc:
            self.errors.record(COMPONENT, exc)

    def _clock(self) -> Any:
        """The agent's clock once the plug-in has seen it (its overhead budget then counts the routers'
        statistics as the agent's own time); before the first step, nothing."""
        clock = getattr(self._agent, "clock", None)
        return clock if clock is not None else contextlib.nullcontext()

    # -- plug-in protocol -------------------------------------------------------------------------------
    @property
    def layers(self) -> tuple[tuple[str, str], ...]:
        """(name, type) of every router layer the plug-in reports statistics for."""
        return tuple((name, self._types.get(name, "Router")) for name in self.stats.layers)

    def on_step(self, agent: Any) -> None:
        if self._agent is not agent:
            self._agent = agent
            self.errors = agent.errors

    def collect(self) -> list[tuple[Metric, dict[str, str], float]]:
        parts = self.stats.device_parts()
        host = transfer([parts], self.stats.device)[0] if parts else []
        rows: list[tuple[Metric, dict[str, str], float]] = []
        for name, E, s in zip(self.stats.layers, self.stats.experts, self.stats.finish(host)):
            rows.append((EXPERTS, {"layer": name}, float(E)))
            for metric, key in ((IMBALANCE, "moe_load_imbalance_ratio"), (DEAD, "dead"),
                                (ENTROPY, "moe_router_entropy_ratio")):
                if math.isfinite(s[key]):
                    rows.append((metric, {"layer": name}, float(s[key])))
            if self.max_experts >= E:
                for e, v in enumerate(s["load"]):
                    if math.isfinite(v):
                        rows.append((LOAD, {"layer": name, "expert": str(e)}, float(v)))
        return rows

    def layer_statistics(self) -> dict[str, dict[str, float]]:
        """statistic -> {layer: value} of the latest complete windows, for the rule table."""
        return self.stats.values()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def moe_plugin(model: nn.Module, cfg: Any) -> MoEPlugin | None:
    """The plug-in for `stats.moe` (a config Section), or None when the model has no router (no cost)."""
    routers = find_routers(model, cfg.routers, top_k=cfg.top_k)
    if not routers:
        return None
    log.info("gradflow_agent: %d MoE routers observed (%s, ...)", len(routers), routers[0].name)
    return MoEPlugin(model, routers, max_experts=cfg.max_experts,
                     min_assignments_per_expert=cfg.min_assignments_per_expert)


def observe_router(agent: Any, name: str, logits: torch.Tensor | None, top_k: int | None = None,
                   indices: torch.Tensor | None = None) -> None:
    """`agent.observe_router`: hand one router call to the agent's MoE plug-in (added on first use)."""
    if getattr(agent, "_closed", False):
        return
    plugin = next((p for p in agent.plugins if isinstance(p, MoEPlugin)), None)
    if plugin is None:
        cfg = agent.config.stats.moe
        plugin = MoEPlugin(None, [], max_experts=cfg.max_experts,
                           min_assignments_per_expert=cfg.min_assignments_per_expert, device=agent.device)
        agent.add_plugin(plugin)
        plugin.on_step(agent)
    plugin.observe(name, logits, top_k, indices)


__all__ = ["METRICS", "MoEPlugin", "Router", "find_routers", "moe_plugin", "observe_router",
           "parse_router_output", "KEYS"]
