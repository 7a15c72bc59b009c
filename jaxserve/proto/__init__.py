"""The gRPC contracts (`jaxserve.v1` and the JetStream-compatible `jetstream_proto`) and their generated stubs.

Importing this package generates the stubs on first use when they are missing or older than the .proto files
(see `build.py`); afterwards `from jaxserve.proto import jaxserve_pb2, jaxserve_pb2_grpc` works as usual.
"""

from jaxserve.proto.build import ensure_stubs

ensure_stubs()
