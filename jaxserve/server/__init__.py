"""The gRPC front of one replica: our `jaxserve.v1` API, the JetStream-compatible API, health, reflection, limits.

`validation` turns wire requests into engine `Request`s (or a field-named error), `bridge` connects asyncio RPC
handlers to the engine thread, `services` implements the two APIs, `status` is the one place exceptions become gRPC
status codes, `auth` checks bearer tokens, and `app` assembles and runs the grpc.aio server. Nothing here touches KV
state or the runner beyond asking it to warm up.
"""
