"""A real OTLP/HTTP metrics receiver, run as its own process by the tests.

    python -m tests.support.otlp_receiver PORT OUTFILE

Decodes every ExportMetricsServiceRequest with opentelemetry-proto (gunzipping when asked) and appends
one JSON line per data point: resource attributes, metric name, unit, kind, point attributes, value.
"""

from __future__ import annotations

import gzip
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)


def _attrs(kvs) -> dict:
    out = {}
    for kv in kvs:
        v = kv.value
        out[kv.key] = getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None
    return out


def main(port: int, outfile: str) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            request = ExportMetricsServiceRequest()
            request.ParseFromString(body)
            with open(outfile, "a", encoding="utf-8") as fh:
                for rm in request.resource_metrics:
                    resource = _attrs(rm.resource.attributes)
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            kind = metric.WhichOneof("data")
                            for point in getattr(metric, kind).data_points:
                                value = point.as_double if point.HasField("as_double") else point.as_int
                                fh.write(json.dumps({"resource": resource, "name": metric.name,
                                                     "unit": metric.unit, "kind": kind,
                                                     "attributes": _attrs(point.attributes),
                                                     "value": value}) + "\n")
            payload = ExportMetricsServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
