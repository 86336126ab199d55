"""`ParameterChangeMetrics`: how much, and how sparsely, the weights moved over the measurement window.

Keys (seed 002's, `t` formatted as in `format_threshold`):
  param_change/norm_l2, norm_l1, norm_max, mean, std      over every tracked element of Δ
  param_change/sparsity_at_<t>, changed_ratio_at_<t>      fraction of |Δ| <= t, and 1 - that
  param_change/window_steps                               optimizer steps Δ spans
  param_change/layer/<group>/{mean_abs_delta,norm_l2,sparsity_at_<t>}      (param_change_per_layer)
  param_change/component/<name>/{mean_abs_delta,norm_l2,sparsity_at_<t>}   (param_change_track_components)
"""

from __future__ import annotations

import re
from typing import Any

from ..export.metrics import Metric
from .components import component_of, group, layer_of
from .computer import MetricComputer, format_threshold
from .config import DEFAULT_THRESHOLDS

_W = "over the measurement window (dynamics.interval optimizer steps)"
GLOBAL = {
    "norm_l2": Metric("gradflow_param_change_l2_norm", "gauge", f"L2 norm of the parameter change {_W}."),
    "norm_l1": Metric("gradflow_param_change_l1_norm", "gauge", f"L1 norm (sum of |dw|) of the parameter change {_W}."),
    "norm_max": Metric("gradflow_param_change_max_abs", "gauge", f"Largest absolute parameter change {_W}."),
    "mean": Metric("gradflow_param_change_mean", "gauge", f"Mean of the parameter change {_W}."),
    "std": Metric("gradflow_param_change_std", "gauge", f"Standard deviation of the parameter change {_W}."),
    "window_steps": Metric("gradflow_param_change_window_steps", "gauge",
                           "Optimizer steps between the two parameter snapshots the change is measured over.",
                           "{step}"),
}
SPARSITY = Metric("gradflow_param_change_sparsity_ratio", "gauge",
                  "Fraction of parameters whose change is at most the threshold (unchanged at that resolution).",
                  "1", ("threshold",))
CHANGED = Metric("gradflow_param_change_changed_ratio", "gauge",
                 "Fraction of parameters whose change exceeds the threshold (1 - sparsity).", "1", ("threshold",))


def _scoped(scope: str) -> dict[str, Metric]:
    return {
        "mean_abs_delta": Metric(f"gradflow_param_change_{scope}_mean_abs", "gauge",
                                 f"Mean absolute parameter change of the {scope} {_W}.", labels=(scope,)),
        "norm_l2": Metric(f"gradflow_param_change_{scope}_l2_norm", "gauge",
                          f"L2 norm of the parameter change of the {scope} {_W}.", labels=(scope,)),
        "sparsity": Metric(f"gradflow_param_change_{scope}_sparsity_ratio", "gauge",
                           f"Fraction of the {scope}'s parameters whose change is at most the threshold.", "1",
                           (scope, "threshold")),
    }


LAYER = _scoped("layer")
COMPONENT = _scoped("component")
_GLOBAL_KEY = re.compile(r"^param_change/(norm_l2|norm_l1|norm_max|mean|std|window_steps)$")
_THRESH_KEY = re.compile(r"^param_change/(sparsity|changed_ratio)_at_(?P<t>[^/]+)$")
_SCOPED_KEY = re.compile(r"^param_change/(?P<scope>layer|component)/(?P<g>.+)/"
                         r"(?:(?P<s>mean_abs_delta|norm_l2)|sparsity_at_(?P<t>[^/]+))$")


class ParameterChangeMetrics(MetricComputer):
    """Magnitude and sparsity of Δ, globally and optionally per layer group and per component."""

    name = "param_change"
    catalogue = (*GLOBAL.values(), SPARSITY, CHANGED, *LAYER.values(), *COMPONENT.values())

    def __init__(self, thresholds: tuple[float, ...] | list[float] = DEFAULT_THRESHOLDS, per_layer: bool = False,
                 track_components: bool = False, max_layers: int = 64) -> None:
        self.thresholds = tuple(sorted({float(t) for t in thresholds}))
        self.per_layer = per_layer
        self.track_components = track_components
        self.max_layers = max_layers

    def compute(self, delta: Any = None, snapshot: Any = None, context: Any = None, **kwargs: Any) -> dict[str, float]:
        stats = delta.statistics(self.thresholds)
        total = stats.total
        out = {
            "param_change/norm_l2": total.norm_l2,
            "param_change/norm_l1": total.l1,
            "param_change/norm_max": total.max_abs,
            "param_change/mean": total.mean,
            "param_change/std": total.std,
        }
        for i, t in enumerate(self.thresholds):
            s = total.sparsity(i)
            out[f"param_change/sparsity_at_{format_threshold(t)}"] = s
            out[f"param_change/changed_ratio_at_{format_threshold(t)}"] = 1.0 - s
        window = getattr(context, "window_steps", None)
        if window is not None:
            out["param_change/window_steps"] = float(window)
        scopes = []
        if self.per_layer:
            scopes.append(("layer", group(delta.names, layer_of, self.max_layers)))
        if self.track_components:
            scopes.append(("component", group(delta.names, component_of)))
        for scope, groups in scopes:
            for g, names in groups.items():
                st = stats.group(names)
                out[f"param_change/{scope}/{g}/mean_abs_delta"] = st.mean_abs
                out[f"param_change/{scope}/{g}/norm_l2"] = st.norm_l2
                for i, t in enumerate(self.thresholds):
                    out[f"param_change/{scope}/{g}/sparsity_at_{format_threshold(t)}"] = st.sparsity(i)
        return out

    def describe(self, key: str) -> tuple[Metric, dict[str, str]] | None:
        m = _GLOBAL_KEY.match(key)
        if m:
            return GLOBAL[m.group(1)], {}
        m = _THRESH_KEY.match(key)
        if m:
            return (SPARSITY if m.group(1) == "sparsity" else CHANGED), {"threshold": m.group("t")}
        m = _SCOPED_KEY.match(key)
        if m:
            table = LAYER if m.group("scope") == "layer" else COMPONENT
            labels = {m.group("scope"): m.group("g")}
            if m.group("t") is not None:
                return table["sparsity"], {**labels, "threshold": m.group("t")}
            return table[m.group("s")], labels
        return None
