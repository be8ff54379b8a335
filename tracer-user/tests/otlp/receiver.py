"""An OTLP logs receiver for the tests: decodes what droptrace sends with the official
opentelemetry-proto definitions (OTLP/HTTP protobuf on POST /v1/logs, or OTLP/gRPC
LogsService/Export with grpcio) and writes one JSON line per LogRecord to --out:

  {"transport", "headers", "resource": {...}, "scope", "time_unix_nano",
   "observed_time_unix_nano", "severity_number", "severity_text", "event_name", "body",
   "attributes": {...}}

--fail N answers the first N requests with a retryable error (HTTP 503 / UNAVAILABLE).
Prints "listening PORT" once it accepts connections.
"""

import argparse
import json
import ssl
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

LOCK = threading.Lock()
FAIL = {"left": 0}


def any_value(v: common_pb2.AnyValue):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind)


def attrs(kvs):
    out = {}
    for kv in kvs:
        if kv.key in out:
            raise ValueError(f"attribute {kv.key} twice")
        out[kv.key] = any_value(kv.value)
    return out


def record(out_path, transport, headers, req: logs_service_pb2.ExportLogsServiceRequest):
    lines = []
    for rl in req.resource_logs:
        resource = attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            for lr in sl.log_records:
                lines.append(
                    json.dumps(
                        {
                            "transport": transport,
                            "headers": headers,
                            "resource": resource,
                            "scope": sl.scope.name,
                            "scope_version": sl.scope.version,
                            "time_unix_nano": lr.time_unix_nano,
                            "observed_time_unix_nano": lr.observed_time_unix_nano,
                            "severity_number": lr.severity_number,
                            "severity_text": lr.severity_text,
                            "event_name": lr.event_name,
                            "body": any_value(lr.body),
                            "attributes": attrs(lr.attributes),
                        },
                        sort_keys=True,
                    )
                )
    with LOCK:
        with open(out_path, "a") as f:
            for line in lines:
                f.write(line + "\n")


def take_failure():
    with LOCK:
        if FAIL["left"] > 0:
            FAIL["left"] -= 1
            return True
    return False


def serve_http(args, port):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path != "/v1/logs" or self.headers.get("Content-Type") != "application/x-protobuf":
                self.reply(404, b"")
                return
            if take_failure():
                self.reply(503, b"try later")
                return
            req = logs_service_pb2.ExportLogsServiceRequest()
            req.ParseFromString(body)
            headers = {k.lower(): v for k, v in self.headers.items()}
            record(args.out, "http", headers, req)
            resp = logs_service_pb2.ExportLogsServiceResponse()
            self.reply(200, resp.SerializeToString())

        def reply(self, code, body):
            self.send_response(code)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.cert, args.key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"listening {server.server_address[1]}", flush=True)
    server.serve_forever()


def serve_grpc(args, port):
    import grpc
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc

    class Logs(logs_service_pb2_grpc.LogsServiceServicer):
        def Export(self, request, context):
            if take_failure():
                context.abort(grpc.StatusCode.UNAVAILABLE, "try later")
            headers = {k: v for k, v in context.invocation_metadata()}
            record(args.out, "grpc", headers, request)
            return logs_service_pb2.ExportLogsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(Logs(), server)
    if args.cert:
        with open(args.cert, "rb") as c, open(args.key, "rb") as k:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"listening {bound}", flush=True)
    server.wait_for_termination()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--transport", choices=["http", "grpc"], required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--fail", type=int, default=0)
    args = p.parse_args()
    FAIL["left"] = args.fail
    if args.transport == "http":
        serve_http(args, args.port)
    else:
        serve_grpc(args, args.port)


if __name__ == "__main__":
    sys.exit(main())
