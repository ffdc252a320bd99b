"""A gRPC health service for probe tests: NOT_SERVING for a while, then SERVING; logs SIGTERM.

Run by the process node as a pod's command. Binds to $POD_IP (or 0.0.0.0).
Imports: grpcio, grpcio-health-checking, the standard library.
"""

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--not-serving-for", type=float, default=0.0)
args = parser.parse_args()

servicer = health.HealthServicer()
servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
server.add_insecure_port(f"{os.environ.get('POD_IP', '0.0.0.0')}:{args.port}")
server.start()
print("listening", flush=True)
stop = threading.Event()


def on_term(*_):
    print("got SIGTERM", flush=True)
    stop.set()


signal.signal(signal.SIGTERM, on_term)
if not stop.wait(args.not_serving_for):
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("serving", flush=True)
stop.wait()
server.stop(0.5).wait()
sys.exit(0)
