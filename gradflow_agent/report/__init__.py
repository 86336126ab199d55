"""Reports of analyses and recorded runs: FlowReport (console, HTML, JSON, text) and the `report` command."""

from .console import ConsoleReporter
from .flow_report import FlowReport, section, series, table
from .html import HTMLReportGenerator

__all__ = ["ConsoleReporter", "FlowReport", "HTMLReportGenerator", "section", "series", "table"]
