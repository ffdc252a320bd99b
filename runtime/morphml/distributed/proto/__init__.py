"""Generated protobuf/gRPC code for worker.proto (see regenerate.py). Imports only protobuf and grpc."""
