"""Reports of analyses and recorded runs: FlowReport (console, HTML, JSON, text) and the `report` command.

Names are imported on first use (PEP 562): FlowReport, its JSON and HTML need only the core, while the
console and text renderings (ConsoleReporter) need rich, the `report` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "ConsoleReporter": "console",
    "FlowReport": "flow_report", "section": "flow_report", "series": "flow_report", "table": "flow_report",
    "HTMLReportGenerator": "html",
}

__all__ = ["ConsoleReporter", "FlowReport", "HTMLReportGenerator", "section", "series", "table"]

if TYPE_CHECKING:
    from .console import ConsoleReporter
    from .flow_report import FlowReport, section, series, table
    from .html import HTMLReportGenerator


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
