"""The compose stack's alert receiver: Alertmanager's webhooks (`alert-receiver:5001` in alertmanager.yml),
printed one line per alert, so that `docker compose logs -f alert-receiver` shows what would page.

Standard library only: it runs in a stock python image. Replace it with your Slack, PagerDuty or e-mail
receivers in alertmanager.yml; the routes (the URL path: /gradflow/page, /default, /ticket) stay.

    python deploy/alertmanager/receiver.py [--port 5001] [--host 0.0.0.0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def describe(route: str, payload: dict) -> list[str]:
    """One line per alert of an Alertmanager webhook payload (version 4)."""
    lines = []
    for alert in payload.get("alerts", []):
        labels = alert.get("labels", {})
        where = " ".join(f"{k}={labels[k]}" for k in ("run", "rank", "layer") if k in labels)
        summary = alert.get("annotations", {}).get("summary", "")
        lines.append(f"[{route}] {alert.get('status', payload.get('status', '?'))} "
                     f"{labels.get('alertname', '?')} severity={labels.get('severity', '?')} {where}"
                     + (f": {summary}" if summary else ""))
    return lines


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        try:
            payload = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            self.send_error(400, "not JSON")
            return
        route = self.path.rstrip("/").rsplit("/", 1)[-1] or "default"
        for line in describe(route, payload):
            print(line, flush=True)
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - a liveness answer
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args: object) -> None:  # the alert lines are the log
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print Alertmanager webhook notifications")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"alert-receiver: listening on {args.host}:{server.server_address[1]}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
