"""`gradflow-agent dashboards`: the `main(argv)` the top-level CLI delegates to (see `cli.dashboards_main`)."""

from gradflow_agent.alerting.cli import dashboards_main as main

__all__ = ["main"]
