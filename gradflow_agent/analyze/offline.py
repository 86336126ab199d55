"""Reports of recorded runs: the JSONL flight record, with the issues the agent recorded.

A recording holds the agent's statistics and its detector's issues (no effective ranks, attention maps
or gradients through time). The report shows the recorded issues - never a recomputation from whole-run
averages, which would disagree with what the agent said during the run - plus the depth structure,
which only a whole-run view shows; health is the one formula over those issues and the overall status
follows the worst issue. The report is built by `FlowReport.from_history` / `from_records`; this module keeps
the functional names (it depends on report.flow_report, never the other way round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..report.flow_report import FlowReport
from .base import FROM_AGENT_KIND, FlowIssue, FlowThresholds
from .detectors import recorded_issues
from .health import DEFAULT_POLICY, HealthPolicy
from .history import History

#: The agent's issue kinds as analyzer issue types (the former name of base.FROM_AGENT_KIND).
AGENT_KINDS = FROM_AGENT_KIND

__all__ = ["AGENT_KINDS", "recorded_issues", "report_from_history", "report_from_records"]


def report_from_history(history: History, *, thresholds: FlowThresholds | None = None, title: str = "",
                        policy: HealthPolicy = DEFAULT_POLICY, meta: dict[str, Any] | None = None,
                        recorded: list[FlowIssue] | None = None) -> FlowReport:
    """`FlowReport.from_history` (see there)."""
    return FlowReport.from_history(history, thresholds=thresholds, title=title, policy=policy, meta=meta,
                                   recorded=recorded)


def report_from_records(records: Sequence[dict[str, Any]], *, thresholds: FlowThresholds | None = None,
                        title: str | None = None) -> FlowReport:
    """A FlowReport of `Snapshot.to_dict()` records (e.g. `gradflow_agent.export.jsonl.read_snapshots(path)`)."""
    return FlowReport.from_records(records, thresholds=thresholds, title=title)
