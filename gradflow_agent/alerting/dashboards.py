"""Grafana dashboards as code, built with Grafana's own `grafana-foundation-sdk`.

The JSON under `grafana/dashboards/` is the output of `build_dashboards(config/default.yaml)` and a test
keeps the two identical, so panel thresholds and metric names stay in step with the config and with the
alert rules (`gradflow-agent dashboards -o grafana/dashboards` regenerates them).

Conventions every panel keeps (tests check them): the `${datasource}` variable on the panel and on each
query, the `job`/`instance`/`run`/`rank`/`layer` template variables as label matchers, `$__rate_interval`
in every `rate()`/`increase()`, a unit and a description, and stable dashboard `uid`s.

Requires `grafana-foundation-sdk` pinned to an epoch version (see `SDK_REQUIREMENT`): an unpinned install
resolves to the Grafana 10.1 target.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from grafana_foundation_sdk.builders import barchart, bargauge, heatmap, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus as prom
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

from gradflow_agent.alerting.rules import ALERTS
from gradflow_agent.config import Section, load_config
from gradflow_agent.detect.health import CRITICAL_MAX, HEALTHY_MIN

SDK_REQUIREMENT = "grafana-foundation-sdk==1769699379!11.6.0"

UID_OVERVIEW = "gradflow-overview"
UID_LAYERS = "gradflow-layers"
UID_LAYER = "gradflow-layer"
TAG = "gradflow"

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label matchers from the template variables. `layer` uses `.+` for "All" so that run-wide series (no
# layer label) never match a per-layer selector.
RUN_SEL = 'job=~"$job", instance=~"$instance", run=~"$run", rank=~"$rank"'
LAYER_SEL = RUN_SEL + ', layer=~"$layer"'
RUN_LEGEND = "{{run}}/{{rank}}"
ALERT_NAMES = "|".join(a.name for a in ALERTS)


class _Panels:
    """Panel factory: gives each panel a stable id and the conventions every panel must keep."""

    def __init__(self) -> None:
        self._next_id = 1

    def _id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def row(self, title: str) -> db.Row:
        return db.Row(title).id(self._id())

    def common(self, panel: Any, title: str, description: str, unit: str, targets: list[prom.Dataquery],
               span: int, height: int) -> Any:
        panel = (panel.id(self._id()).title(title).description(description).unit(unit).datasource(DS)
                 .span(span).height(height))
        for target in targets:
            panel = panel.with_target(target)
        return panel


def _query(expr: str, legend: str | None = None, ref: str = "A", *, instant: bool = False,
           table_format: bool = False) -> prom.Dataquery:
    q = prom.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend is not None:
        q = q.legend_format(legend)
    if instant:
        q = q.instant()
    if table_format:
        q = q.format(pm.PromQueryFormat.TABLE)
    return q


def _steps(*steps: tuple[float | None, str]) -> db.ThresholdsConfig:
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(
        [dm.Threshold(value=value, color=color) for value, color in steps])


def _above(limit: float) -> db.ThresholdsConfig:
    """Green below `limit`, red at or above it (a ratio or pressure that must stay low)."""
    return _steps((None, "green"), (limit, "red"))


def _below(limit: float) -> db.ThresholdsConfig:
    """Red below `limit`, green at or above it (a quantity that must not fall to zero)."""
    return _steps((None, "red"), (limit, "green"))


def _band(low: float, high: float) -> db.ThresholdsConfig:
    """Red below `low` and above `high`: the healthy band of gradient pressure."""
    return _steps((None, "red"), (low, "green"), (high, "red"))


def _health() -> db.ThresholdsConfig:
    """The health score's bands (detect/health.py): red up to CRITICAL_MAX, orange below 100, green at 100."""
    return _steps((None, "red"), (CRITICAL_MAX + 1, "orange"), (HEALTHY_MIN, "green"))


def _log10() -> cb.ScaleDistributionConfig:
    return cb.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(10)


def _last_value() -> cb.ReduceDataOptions:
    return cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def _legend_table() -> cb.VizLegendOptions:
    return (cb.VizLegendOptions().display_mode(cm.LegendDisplayMode.TABLE).placement(cm.LegendPlacement.RIGHT)
            .show_legend(True).calcs(["lastNotNull", "max"]))


def _ts(p: _Panels, title: str, description: str, unit: str, targets: list[prom.Dataquery], *,
        thresholds: db.ThresholdsConfig | None = None, log: bool = False, span: int = 12, height: int = 8,
        min_val: float | None = None, max_val: float | None = None) -> timeseries.Panel:
    panel = p.common(timeseries.Panel(), title, description, unit, targets, span, height)
    panel = panel.line_width(1).fill_opacity(10).show_points(cm.VisibilityMode.NEVER).legend(_legend_table())
    panel = panel.tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING))
    if thresholds is not None:
        panel = panel.thresholds(thresholds).thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.DASHED))
    if log:
        panel = panel.scale_distribution(_log10())
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    return panel


def _stat(p: _Panels, title: str, description: str, unit: str, targets: list[prom.Dataquery], *,
          thresholds: db.ThresholdsConfig | None = None, span: int = 4, height: int = 4,
          text_mode: cm.BigValueTextMode = cm.BigValueTextMode.AUTO) -> stat.Panel:
    panel = p.common(stat.Panel(), title, description, unit, targets, span, height)
    panel = (panel.graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE)
             .text_mode(text_mode)
             .reduce_options(_last_value()))
    return panel.thresholds(thresholds if thresholds is not None else _steps((None, "blue")))


def _heatmap(p: _Panels, title: str, description: str, unit: str, statistic: str, agg: str, *,
             exponential: bool, span: int = 12, height: int = 10) -> heatmap.Panel:
    """Depth bins on the y axis (`gradflow_depth_profile`: every layer of the run, whatever the series
    budget, in a bounded number of rows), time on x, the bin's worst value as colour."""
    fn = "min" if agg == "min" else "max"
    expr = (f'{fn} by (bin) (gradflow_depth_profile{{{RUN_SEL}, statistic="{statistic}", agg="{agg}"}})')
    panel = p.common(heatmap.Panel(), title, description, unit, [_query(expr, "{{bin}}")], span, height)
    color = (heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Spectral")
             .scale(hm.HeatmapColorScale.EXPONENTIAL if exponential else hm.HeatmapColorScale.LINEAR)
             .exponent(0.5).steps(64).reverse(False))
    return (panel.calculate(False).color(color).cell_values(heatmap.CellValues().unit(unit))
            .filter_values(heatmap.FilterValueRange())
            .y_axis(heatmap.YAxisConfig().axis_placement(cm.AxisPlacement.LEFT))
            .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.UNKNOWN).value(title))
            .show_value(cm.VisibilityMode.NEVER).show_legend())


def _depth_profile(p: _Panels, title: str, description: str, unit: str, statistic: str, agg: str,
                   thresholds: db.ThresholdsConfig, *, log: bool, span: int = 8) -> barchart.Panel:
    """One bar per depth bin, input side first: the bin's worst value now, over every layer."""
    fn = "min" if agg == "min" else "max"
    expr = f'{fn} by (bin) (gradflow_depth_profile{{{RUN_SEL}, statistic="{statistic}", agg="{agg}"}})'
    target = _query(expr, "{{bin}}", instant=True, table_format=True)
    panel = p.common(barchart.Panel(), title, description, unit, [target], span, 9)
    panel = (panel.with_transformation(dm.DataTransformerConfig(id_val="sortBy", options={
                 "fields": {}, "sort": [{"field": "bin", "desc": False}]}))
             .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                 "excludeByName": {"Time": True}, "indexByName": {}, "renameByName": {}}))
             .x_field("bin").x_tick_label_rotation(0).x_tick_label_max_length(4)
             .show_value(cm.VisibilityMode.NEVER).thresholds(thresholds)
             .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
             .legend(cb.VizLegendOptions().show_legend(False).display_mode(cm.LegendDisplayMode.LIST)
                     .placement(cm.LegendPlacement.BOTTOM)))
    if log:
        panel = panel.scale_distribution(_log10())
    return panel


def _topk_table(p: _Panels, title: str, description: str, metric: str, worst: str, k: int = 10) -> table.Panel:
    """The k worst named layers of one statistic now (bounded output whatever the depth)."""
    fn = "bottomk" if worst == "min" else "topk"
    expr = f"{fn}({k}, max by (run, rank, layer) ({metric}{{{LAYER_SEL}}}))"
    panel = p.common(table.Panel(), title, description, "none", [_query(expr, instant=True, table_format=True)],
                     8, 8)
    return panel.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {"Time": True}, "indexByName": {"layer": 0, "Value": 1}, "renameByName": {}}))


def _issue_timeline(p: _Panels, title: str, description: str, target: prom.Dataquery,
                    height: int) -> statetimeline.Panel:
    """A full-width state timeline of gradflow_issue: red while the detector flags a series."""
    panel = p.common(statetimeline.Panel(), title, description, "none", [target], 24, height)
    return (panel.show_value(cm.VisibilityMode.NEVER).merge_values(True).fill_opacity(80)
            .thresholds(_steps((None, "transparent"), (1, "red")))
            .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS)))


def _variables(layer_multi: bool, run_multi: bool) -> list[Any]:
    def query_var(name: str, label: str, query: str, description: str, multi: bool,
                  all_value: str = ".*") -> db.QueryVariable:
        var = (db.QueryVariable(name).label(label).description(description).datasource(DS)
               .query({"query": query, "refId": f"gradflow-{name}", "qryType": 1})
               .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NATURAL_ASC))
        if multi:
            var = var.multi(True).include_all(True).all_value(all_value)
        return var

    layer_desc = ("Layers (module qualified names) to show." if layer_multi
                  else "The layer to drill into (a module qualified name).")
    return [
        db.DatasourceVariable("datasource").label("Data source").type("prometheus")
        .description("The Prometheus that scrapes the gradflow agents."),
        query_var("job", "Job", "label_values(gradflow_steps_total, job)",
                  "Prometheus scrape job of the agents.", True),
        query_var("run", "Run", 'label_values(gradflow_steps_total{job=~"$job"}, run)',
                  "Training run (`run.name` in the agent config).", run_multi),
        query_var("rank", "Rank", 'label_values(gradflow_steps_total{job=~"$job", run=~"$run"}, rank)',
                  "Distributed rank (one agent per rank).", run_multi),
        query_var("instance", "Instance",
                  'label_values(gradflow_steps_total{job=~"$job", run=~"$run", rank=~"$rank"}, instance)',
                  "Scrape target of the agent.", True),
        query_var("layer", "Layer", f"label_values(gradflow_layer_info{{{RUN_SEL}}}, layer)", layer_desc,
                  layer_multi, all_value=".+"),
    ]


def _base(uid: str, title: str, description: str, *, layer_multi: bool, run_multi: bool) -> db.Dashboard:
    dash = (db.Dashboard(title).uid(uid).description(description).tags([TAG]).editable()
            .refresh("30s").time("now-1h", "now").timezone("browser")
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .link(db.DashboardLink("gradflow dashboards").type(dm.DashboardLinkType.DASHBOARDS).tags([TAG])
                  .as_dropdown(True).include_vars(True).keep_time(True)))
    for var in _variables(layer_multi, run_multi):
        dash = dash.with_variable(var)
    return dash


def _layer_link() -> db.DashboardLink:
    return (db.DashboardLink("Open layer ${__field.labels.layer}").type(dm.DashboardLinkType.LINK).url(
        f"/d/{UID_LAYER}/?${{__url_time_range}}&${{datasource:queryparam}}&var-job=${{__field.labels.job}}"
        "&var-run=${__field.labels.run}&var-rank=${__field.labels.rank}"
        "&var-instance=${__field.labels.instance}&var-layer=${__field.labels.layer}"))


def overview(th: Section) -> db.Dashboard:
    """Runs at a glance: progress, loss, global gradient norm, alerts, worst layers, agent cost."""
    p = _Panels()
    d = _base(UID_OVERVIEW, "gradflow / Overview",
              "Training runs instrumented by gradflow-agent: progress, loss, gradient norm, firing "
              "alerts, the least healthy layers and what the agent itself costs.",
              layer_multi=True, run_multi=True)

    d = d.with_row(p.row("Runs"))
    d = d.with_panel(_stat(p, "Runs reporting",
                           "Number of (run, rank) agents whose metrics Prometheus scrapes now.", "none",
                           [_query(f"count(max by (job, instance, run, rank) (gradflow_steps_total{{{RUN_SEL}}}))",
                                   instant=True)]))
    d = d.with_panel(_stat(p, "Optimizer steps",
                           "Optimizer steps taken so far (gradflow_steps_total), summed over the selected "
                           "runs and ranks.", "none",
                           [_query(f"sum(gradflow_steps_total{{{RUN_SEL}}})", instant=True)]))
    d = d.with_panel(_stat(p, "Steps per second",
                           "Training throughput: optimizer steps per second, summed over the selected "
                           "runs and ranks.", "suffix: steps/s",
                           [_query(f"sum(rate(gradflow_steps_total{{{RUN_SEL}}}[$__rate_interval]))")]))
    d = d.with_panel(_stat(p, "Issues flagged",
                           "Layers the in-process detector flags now (gradflow_issue_layers, every layer "
                           "whatever the series budget), all kinds together, the worst rank of each run. "
                           "Same verdict as the alert rules, but without their `for:` delay.", "none",
                           [_query(f"sum(max by (job, run, kind, severity) (gradflow_issue_layers{{{RUN_SEL}}})) "
                                   "or vector(0)", instant=True)],
                           thresholds=_above(1)))
    d = d.with_panel(_stat(p, "Non-finite values (recent)",
                           "NaN/Inf elements seen in gradients, activations and parameters over the last "
                           "rate interval (gradflow_nonfinite_total); NonFiniteValues fires on the layer where "
                           "the first appeared.", "none",
                           [_query(f"sum(increase(gradflow_nonfinite_total{{{RUN_SEL}}}[$__rate_interval])) "
                                   "or vector(0)", instant=True)],
                           thresholds=_above(1)))
    d = d.with_panel(_stat(p, "Firing gradflow alerts",
                           "gradflow alerts firing now in this Prometheus (ALERTS series).", "none",
                           [_query(f'count(ALERTS{{alertstate="firing", alertname=~"{ALERT_NAMES}", '
                                   f'job=~"$job", run=~"$run"}}) or vector(0)', instant=True)],
                           thresholds=_above(1)))

    d = d.with_panel(_ts(p, "Steps per second",
                         "Optimizer steps per second for each run and rank; a drop to zero while the agent "
                         "is up means the training loop hangs.", "suffix: steps/s",
                         [_query(f"sum by (run, rank) (rate(gradflow_steps_total{{{RUN_SEL}}}[$__rate_interval]))",
                                 RUN_LEGEND)], span=8))
    d = d.with_panel(_ts(p, "Loss",
                         "Training loss as reported to agent.step(loss=...); gaps mean NaN (see the "
                         "NonFiniteValues alert).", "none",
                         [_query(f"gradflow_loss{{{RUN_SEL}}}", RUN_LEGEND)], span=8))
    d = d.with_panel(_ts(p, "Global gradient norm",
                         "L2 norm of the whole model's gradient at the last step (log scale). The dashed "
                         "line is the per-layer exploding threshold.", "none",
                         [_query(f"gradflow_grad_norm{{{RUN_SEL}}}", RUN_LEGEND)],
                         thresholds=_above(th.exploding), log=True, span=8))

    d = d.with_panel(_ts(p, "Forward time by rank",
                         "Mean wall time of the forward pass per step on each rank (gradflow_forward_seconds). "
                         "Lockstep makes step times equal; the forward holds no collective, so a straggling "
                         f"rank stands out here. TrainingStraggler fires {float(th.straggler_skew):.0%} above "
                         "the run's median.", "s",
                         [_query(f"max by (run, rank) (gradflow_forward_seconds{{{RUN_SEL}}})", RUN_LEGEND)],
                         span=24, min_val=0))

    d = d.with_row(p.row("Health"))
    alerts_table = p.common(
        table.Panel(), "Firing alerts",
        "gradflow alerts firing now, one row per alert and layer. The runbook of each alert is linked "
        "from its runbook_url annotation in Alertmanager.", "none",
        [_query(f'ALERTS{{alertstate="firing", alertname=~"{ALERT_NAMES}", job=~"$job", run=~"$run"}}',
                instant=True, table_format=True)], 12, 8)
    alerts_table = alerts_table.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
        "indexByName": {"alertname": 0, "severity": 1, "run": 2, "rank": 3, "layer": 4, "tensor": 5},
        "renameByName": {}}))
    d = d.with_panel(alerts_table)
    worst = p.common(
        bargauge.Panel(), "Worst layers by health score",
        "The ten least healthy layers (gradflow_layer_health_score, 0 = broken, 100 = healthy). Click a "
        "bar to open the layer drill-down.", "none",
        [_query(f"bottomk(10, min by (job, instance, run, rank, layer) "
                f"(gradflow_layer_health_score{{{LAYER_SEL}}}))",
                "{{layer}} ({{run}}/{{rank}})", instant=True)], 12, 8)
    worst = (worst.display_mode(cm.BarGaugeDisplayMode.GRADIENT).orientation(cm.VizOrientation.HORIZONTAL)
             .min(0).max(100).thresholds(_health())
             .reduce_options(_last_value())
             .data_links([_layer_link()]))
    d = d.with_panel(worst)
    d = d.with_panel(_ts(p, "Issues by kind",
                         "Layers flagged by the in-process detector over time, by issue kind (every layer, "
                         "the worst rank of each run).", "none",
                         [_query(f"sum by (kind) (max by (job, run, kind, severity) "
                                 f"(gradflow_issue_layers{{{RUN_SEL}}}))", "{{kind}}")], span=12))
    d = d.with_panel(_ts(p, "Alerts over time",
                         "Firing gradflow alerts by name over time.", "none",
                         [_query(f'count by (alertname) (ALERTS{{alertstate="firing", '
                                 f'alertname=~"{ALERT_NAMES}", job=~"$job", run=~"$run"}})',
                                 "{{alertname}}")], span=12))

    d = d.with_row(p.row("Agent"))
    d = d.with_panel(_ts(p, "Agent overhead",
                         "Share of wall-clock time the training process spends inside the agent (hooks, "
                         "reductions, snapshots): seconds of agent work per second.", "percentunit",
                         [_query(f"sum by (run, rank) (rate(gradflow_agent_overhead_seconds_total"
                                 f"{{{RUN_SEL}}}[$__rate_interval]))", RUN_LEGEND)], span=8, min_val=0))
    d = d.with_panel(_ts(p, "Agent share of the step",
                         "The agent's own time on the training thread as a share of the step time (over its "
                         "last judgment window), which it keeps under sampling.overhead_budget.", "percentunit",
                         [_query(f"max by (run, rank) (gradflow_agent_overhead_ratio{{{RUN_SEL}}})", RUN_LEGEND)],
                         span=8, min_val=0))
    d = d.with_panel(_ts(p, "Statistics cadence",
                         "Activations (then parameters) are measured on every n-th step: the agent raises n "
                         "while its share of the step time stays above sampling.overhead_budget (gradients "
                         "stay on every step).",
                         "short",
                         [_query(f"max by (run, rank) (gradflow_agent_activation_every_steps{{{RUN_SEL}}})",
                                 "activations " + RUN_LEGEND),
                          _query(f"max by (run, rank) (gradflow_agent_parameter_every_steps{{{RUN_SEL}}})",
                                 "parameters " + RUN_LEGEND, "B")], span=8, min_val=0))
    d = d.with_panel(_ts(p, "Agent errors",
                         "Errors the agent caught and survived, by component (an exporter that cannot "
                         "push, a hook that failed). Non-zero means some statistics may be missing.",
                         "short",
                         [_query(f"sum by (run, rank, component) (increase(gradflow_agent_errors_total"
                                 f"{{{RUN_SEL}}}[$__rate_interval]))", "{{component}} " + RUN_LEGEND)],
                         span=8, min_val=0))
    d = d.with_panel(_ts(p, "Snapshot age",
                         "Seconds since the agent last published a snapshot. It grows when the training "
                         "loop stops stepping (a hang, a long evaluation) while the process is alive.", "s",
                         [_query(f"time() - max by (run, rank) (gradflow_last_snapshot_timestamp_seconds"
                                 f"{{{RUN_SEL}}})", RUN_LEGEND)], span=8, min_val=0))
    agents = p.common(
        table.Panel(), "Agents", "One row per agent: version, device and scrape target (gradflow_agent_info).",
        "none", [_query(f"gradflow_agent_info{{{RUN_SEL}}}", instant=True, table_format=True)], 24, 6)
    agents = agents.with_transformation(dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {"Time": True, "Value": True, "__name__": True}, "indexByName": {},
        "renameByName": {}}))
    return d.with_panel(agents)


def layers(th: Section) -> db.Dashboard:
    """Every layer of one run at once: heatmaps over time, depth profiles (model order), attention and MoE."""
    p = _Panels()
    d = _base(UID_LAYERS, "gradflow / Layers",
              "Per-layer gradient and activation statistics of one run and rank: heatmaps of each "
              "statistic by layer over time, depth profiles in model order, and the attention and "
              "mixture-of-experts router statistics of the layers that have them.",
              layer_multi=True, run_multi=False)

    d = d.with_row(p.row("Layers over time"))
    d = d.with_panel(_heatmap(
        p, "Gradient pressure by layer",
        "Mean per-step L2 norm of each layer's parameter gradient (gradflow_grad_pressure). Alerts: "
        f"below {th.vanishing:g} vanishing, above {th.exploding:g} exploding. Rows are depth bins "
        "(input side first) holding the smallest pressure of their layers.", "none",
        "grad_pressure", "min", exponential=True))
    d = d.with_panel(_heatmap(
        p, "Activation zero ratio by layer",
        "Fraction of exactly-zero outputs (gradflow_activation_zero_ratio), the largest of each depth bin. "
        f"On ReLU-family layers, above {th.dead_ratio:g} fires DeadNeurons.", "percentunit",
        "activation_zero_ratio", "max", exponential=False))
    d = d.with_panel(_heatmap(
        p, "Activation saturation by layer",
        "Fraction of the outputs of bounded activations (tanh, sigmoid, softmax...) sitting at their "
        f"bounds (gradflow_activation_saturation_ratio), the largest of each depth bin; above "
        f"{th.saturation_ratio:g} fires ActivationSaturation.", "percentunit",
        "activation_saturation_ratio", "max", exponential=False))
    d = d.with_panel(_heatmap(
        p, "Update ratio by layer",
        "Latest update-to-weight ratio ||dw||/||w||, the smallest of each depth bin; healthy training "
        f"is often near 1e-3, below {th.stalled_update_ratio:g} fires TrainingStalled.", "none",
        "update_ratio_last", "min", exponential=True))

    d = d.with_row(p.row("Depth profile (model order)"))
    d = d.with_panel(_depth_profile(
        p, "Smallest gradient pressure by depth",
        "The smallest gradient pressure of each depth bin now, input side first (log scale): vanishing "
        "gradients shrink towards the input. Red: below the vanishing threshold.", "none",
        "grad_pressure", "min", _below(th.vanishing), log=True))
    d = d.with_panel(_depth_profile(
        p, "Largest gradient pressure by depth",
        "The largest gradient pressure of each depth bin now (log scale): exploding gradients grow "
        "towards the input. Red: above the exploding threshold.", "none",
        "grad_pressure", "max", _above(th.exploding), log=True))
    d = d.with_panel(_depth_profile(
        p, "Lowest health score by depth",
        "The lowest health score (0-100) of each depth bin now.", "none", "health", "min", _health(), log=False))

    d = d.with_row(p.row("Worst layers now (named)"))
    d = d.with_panel(_topk_table(
        p, "Smallest gradient pressure", "The ten layers with the smallest gradient pressure now (vanishing "
        "first). Named exactly within the series budget: the worst layers always are.", "gradflow_grad_pressure",
        "min"))
    d = d.with_panel(_topk_table(
        p, "Largest gradient pressure", "The ten layers with the largest gradient pressure now (exploding "
        "first).", "gradflow_grad_pressure", "max"))
    d = d.with_panel(_topk_table(
        p, "Lowest health", "The ten least healthy layers now.", "gradflow_layer_health_score", "min"))

    d = d.with_row(p.row("Stability"))
    d = d.with_panel(_ts(p, "Gradient turbulence",
                         "Coefficient of variation of each layer's gradient pressure over the window "
                         "(gradflow_grad_turbulence); the dashed line is the GradientUnstable threshold.",
                         "none", [_query(f"topk(10, max by (layer) (gradflow_grad_turbulence{{{LAYER_SEL}}}))",
                                         "{{layer}}")], thresholds=_above(th.unstable_cv)))
    d = d.with_panel(_ts(p, "Dead unit ratio",
                         "Fraction of ReLU-family units that never fired over the window "
                         "(gradflow_activation_dead_unit_ratio); the dashed line is the DeadNeurons "
                         "threshold.", "percentunit",
                         [_query(f"topk(10, max by (layer) (gradflow_activation_dead_unit_ratio{{{LAYER_SEL}}}))",
                                 "{{layer}}")], thresholds=_above(th.dead_unit_ratio), min_val=0, max_val=1))
    d = d.with_panel(_issue_timeline(
        p, "Detector issues by layer",
        "When the in-process detector flagged each layer, by issue kind (gradflow_issue).",
        _query(f"max by (layer, kind) (gradflow_issue{{{LAYER_SEL}}})", "{{layer}} {{kind}}"), 8))
    return _plugin_rows(p, d, th)


def _plugin_rows(p: _Panels, d: db.Dashboard, th: Section) -> db.Dashboard:
    """Attention (stats.attention) and mixture-of-experts router (stats.moe) panels of the Layers
    dashboard, by layer name: the plug-ins' gauges are per layer (`model.layers.0.self_attn`,
    `model.layers.0.mlp.gate`). Empty for models without attention statistics or routers."""
    d = d.with_row(p.row("Attention"))
    d = d.with_panel(_ts(p, "Lowest attention entropy",
                         "Mean normalised entropy of the sampled attention rows of each attention layer "
                         "(gradflow_attention_entropy_ratio, stats.attention.enabled): 1 uniform, 0 every "
                         "query on one key; the ten lowest. Dashed: the AttentionCollapse threshold "
                         f"({th.attention_collapse_entropy:g}).", "percentunit",
                         [_query(f"bottomk(10, min by (layer) (gradflow_attention_entropy_ratio{{{LAYER_SEL}}}))",
                                 "{{layer}}")],
                         thresholds=_below(th.attention_collapse_entropy), span=8, min_val=0, max_val=1))
    d = d.with_panel(_ts(p, "Largest attention max probability",
                         "Mean largest attention probability of the sampled rows of each attention layer "
                         "(gradflow_attention_max_prob_ratio): near 1 when attention collapsed onto one key; "
                         "the ten largest. Dashed: the AttentionCollapse threshold "
                         f"({th.attention_collapse_max_prob:g}).", "percentunit",
                         [_query(f"topk(10, max by (layer) (gradflow_attention_max_prob_ratio{{{LAYER_SEL}}}))",
                                 "{{layer}}")],
                         thresholds=_above(th.attention_collapse_max_prob), span=8, min_val=0, max_val=1))
    d = d.with_panel(_topk_table(
        p, "Least diverse attention heads", "The ten attention layers whose sampled heads attend most alike "
        "now (gradflow_attention_head_diversity: 0 identical heads, 1 unrelated).",
        "gradflow_attention_head_diversity", "min"))

    d = d.with_row(p.row("Mixture of experts"))
    d = d.with_panel(_ts(p, "Expert load imbalance",
                         "Load imbalance of each MoE router over its latest complete routing window "
                         "(gradflow_moe_load_imbalance_ratio): 0 balanced, 1 the same top-k experts get "
                         "every token; the ten largest. Dashed: the ExpertLoadImbalance threshold "
                         f"({th.expert_imbalance:g}).", "none",
                         [_query(f"topk(10, max by (layer) (gradflow_moe_load_imbalance_ratio{{{LAYER_SEL}}}))",
                                 "{{layer}}")],
                         thresholds=_above(th.expert_imbalance), span=8, min_val=0, max_val=1))
    # The rule is "dead ratio > dead_expert_ratio": at the default 0, any dead expert; a dashed line at 0
    # would paint every healthy router red, so it is drawn only for a positive threshold.
    d = d.with_panel(_ts(p, "Dead expert ratio",
                         "Fraction of each MoE router's experts that received no token over the latest "
                         "complete routing window (gradflow_moe_dead_experts / gradflow_moe_experts); the "
                         f"ten largest. Above {th.dead_expert_ratio:g} fires DeadExperts.", "percentunit",
                         [_query(f"topk(10, max by (layer) (gradflow_moe_dead_experts{{{LAYER_SEL}}} / "
                                 f"gradflow_moe_experts{{{LAYER_SEL}}}))", "{{layer}}")],
                         thresholds=_above(th.dead_expert_ratio) if th.dead_expert_ratio > 0 else None,
                         span=8, min_val=0, max_val=1))
    return d.with_panel(_topk_table(
        p, "Lowest router entropy", "The ten MoE routers whose softmax over the experts is the most peaked now "
        "(gradflow_moe_router_entropy_ratio: 1 uniform router, 0 one expert per token).",
        "gradflow_moe_router_entropy_ratio", "min"))


def layer(th: Section) -> db.Dashboard:
    """One layer in depth: every statistic the agent exports for it, with the alert thresholds."""
    p = _Panels()
    d = _base(UID_LAYER, "gradflow / Layer",
              "Every statistic gradflow-agent exports for one layer of one run and rank, with the alert "
              "thresholds drawn as dashed lines.", layer_multi=False, run_multi=False)

    d = d.with_row(p.row("Layer"))
    d = d.with_panel(_stat(p, "Health score",
                           "Health score of the layer, 0 (broken) to 100 (healthy).", "none",
                           [_query(f"min(gradflow_layer_health_score{{{LAYER_SEL}}})", instant=True)],
                           thresholds=_health(), span=6))
    d = d.with_panel(_stat(p, "Layer type and depth",
                           "Module class and position in model order (gradflow_layer_info).", "none",
                           [_query(f"gradflow_layer_info{{{LAYER_SEL}}}", "{{layer_type}} #{{index}}",
                                   instant=True)], text_mode=cm.BigValueTextMode.NAME, span=6))
    d = d.with_panel(_stat(p, "Non-finite values (recent)",
                           "NaN/Inf elements seen in this layer's tensors over the last rate interval.", "none",
                           [_query(f"sum(increase(gradflow_nonfinite_total{{{LAYER_SEL}}}[$__rate_interval])) "
                                   "or vector(0)", instant=True)],
                           thresholds=_above(1), span=6))
    d = d.with_panel(_stat(p, "Firing alerts",
                           "gradflow alerts firing on this layer now.", "none",
                           [_query(f'count(ALERTS{{alertstate="firing", alertname=~"{ALERT_NAMES}", '
                                   f'{LAYER_SEL}}}) or vector(0)', instant=True)],
                           thresholds=_above(1), span=6))

    d = d.with_row(p.row("Gradient"))
    d = d.with_panel(_ts(p, "Gradient pressure",
                         "Mean and maximum per-step L2 norm of the layer's parameter gradient over each "
                         "export interval (log scale). Dashed: the vanishing and exploding thresholds.",
                         "none",
                         [_query(f"gradflow_grad_pressure{{{LAYER_SEL}}}", "mean " + RUN_LEGEND),
                          _query(f"gradflow_grad_pressure_max{{{LAYER_SEL}}}", "max " + RUN_LEGEND, "B")],
                         thresholds=_band(th.vanishing, th.exploding), log=True))
    d = d.with_panel(_ts(p, "Gradient turbulence",
                         "Coefficient of variation of the pressure over the window; dashed: the "
                         "GradientUnstable threshold.", "none",
                         [_query(f"gradflow_grad_turbulence{{{LAYER_SEL}}}", RUN_LEGEND)],
                         thresholds=_above(th.unstable_cv), min_val=0))
    d = d.with_panel(_ts(p, "Gradient velocity",
                         "Relative change of the interval pressure against the previous interval.",
                         "percentunit", [_query(f"gradflow_grad_velocity{{{LAYER_SEL}}}", RUN_LEGEND)]))
    d = d.with_panel(_ts(p, "Gradient zero ratio",
                         "Fraction of exactly-zero gradient elements.", "percentunit",
                         [_query(f"gradflow_grad_zero_ratio{{{LAYER_SEL}}}", RUN_LEGEND)], min_val=0, max_val=1))

    d = d.with_row(p.row("Activations"))
    d = d.with_panel(_ts(p, "Activation statistics",
                         "Mean, standard deviation and largest absolute value of the layer's output.",
                         "none",
                         [_query(f"gradflow_activation_mean{{{LAYER_SEL}}}", "mean " + RUN_LEGEND),
                          _query(f"gradflow_activation_std{{{LAYER_SEL}}}", "std " + RUN_LEGEND, "B"),
                          _query(f"gradflow_activation_absmax{{{LAYER_SEL}}}", "absmax " + RUN_LEGEND, "C")]))
    d = d.with_panel(_ts(p, "Zero and dead-unit ratios",
                         "Fraction of zero outputs and (ReLU family only) of units that never fired over "
                         "the window. Dashed: the DeadNeurons dead-unit threshold.", "percentunit",
                         [_query(f"gradflow_activation_zero_ratio{{{LAYER_SEL}}}", "zero " + RUN_LEGEND),
                          _query(f"gradflow_activation_dead_unit_ratio{{{LAYER_SEL}}}", "dead units " + RUN_LEGEND,
                                 "B")],
                         thresholds=_above(th.dead_unit_ratio), min_val=0, max_val=1))
    d = d.with_panel(_ts(p, "Saturation ratio",
                         "Fraction of outputs at the bounds of a bounded activation (tanh, sigmoid, "
                         "softmax...). Dashed: the ActivationSaturation threshold.", "percentunit",
                         [_query(f"gradflow_activation_saturation_ratio{{{LAYER_SEL}}}", RUN_LEGEND)],
                         thresholds=_above(th.saturation_ratio), min_val=0, max_val=1))
    d = d.with_panel(_ts(p, "Non-finite values",
                         "NaN/Inf elements counted per interval, by tensor (grad, activation, param).",
                         "short",
                         [_query(f"sum by (tensor) (increase(gradflow_nonfinite_total{{{LAYER_SEL}}}"
                                 f"[$__rate_interval]))", "{{tensor}}")], min_val=0))

    d = d.with_row(p.row("Parameters"))
    d = d.with_panel(_ts(p, "Parameter norm",
                         "L2 norm of the layer's parameters.", "none",
                         [_query(f"gradflow_param_norm{{{LAYER_SEL}}}", RUN_LEGEND)]))
    d = d.with_panel(_ts(p, "Update ratio",
                         "||dw||/||w|| per optimizer step (log scale); dashed: the TrainingStalled "
                         "threshold.", "none",
                         [_query(f"gradflow_update_ratio{{{LAYER_SEL}}}", RUN_LEGEND)],
                         thresholds=_below(th.stalled_update_ratio), log=True))
    return d.with_panel(_issue_timeline(
        p, "Detector issues",
        "When the in-process detector flagged this layer, by issue kind (gradflow_issue).",
        _query(f"max by (kind) (gradflow_issue{{{LAYER_SEL}}})", "{{kind}}"), 5))


#: File name under grafana/dashboards/ -> builder.
DASHBOARDS = {
    "gradflow-overview.json": overview,
    "gradflow-layers.json": layers,
    "gradflow-layer.json": layer,
}


def build_dashboards(config: Section | Mapping[str, Any] | str | os.PathLike | None = None
                     ) -> dict[str, dm.Dashboard]:
    """File name -> dashboard model, with thresholds from `config`'s `thresholds:` section."""
    cfg = config if isinstance(config, Section) else load_config(config)
    return {name: build(cfg.thresholds).build() for name, build in DASHBOARDS.items()}


def to_json(dashboard: dm.Dashboard) -> str:
    """Canonical JSON text of a dashboard model (sorted keys, so diffs stay small)."""
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
