"""Generates the Python gRPC stubs of the .proto files beside this module (never edited by hand, never committed).

`ensure_stubs()` runs on the first import of `jaxserve.proto` and regenerates when a stub is missing or older than
its .proto, so a fresh clone works without a build step; `python -m jaxserve.proto.build` forces a rebuild. Output:
`<name>_pb2.py`, `<name>_pb2_grpc.py` and `<name>_pb2.pyi`, importable as `jaxserve.proto.<name>_pb2`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from importlib import resources

PROTO_DIR = os.path.dirname(os.path.abspath(__file__))
# protoc resolves imports relative to an include root; rooting it above `jaxserve/` makes the generated modules
# import each other as `jaxserve.proto.<name>_pb2`.
_INCLUDE_ROOT = os.path.dirname(os.path.dirname(PROTO_DIR))
PROTO_NAMES = ("jaxserve", "jetstream")
_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


class StubBuildError(ImportError):
    """The stubs are missing or stale and could not be generated."""


def _outputs(name: str) -> list[str]:
    return [os.path.join(PROTO_DIR, name + s) for s in _SUFFIXES]


def is_stale(name: str) -> bool:
    """Whether any stub of `name`.proto is missing or older than the .proto."""
    source = os.path.getmtime(os.path.join(PROTO_DIR, name + ".proto"))
    return any(not os.path.exists(p) or os.path.getmtime(p) < source for p in _outputs(name))


def generate(names: tuple[str, ...] = PROTO_NAMES) -> None:
    """Runs protoc for `names`, writing into a scratch directory first so a concurrent importer never sees half a file.

    Raises StubBuildError when grpcio-tools is missing, protoc fails, or the package directory is read-only.
    """
    try:
        from grpc_tools import protoc
    except ImportError as e:
        raise StubBuildError(
            "jaxserve.proto: the generated gRPC stubs are missing or stale and grpcio-tools is not installed "
            "(pip install grpcio-tools)") from e
    well_known = str(resources.files("grpc_tools") / "_proto")
    try:
        scratch = tempfile.mkdtemp(prefix=".build-", dir=PROTO_DIR)
    except OSError as e:
        raise StubBuildError(f"jaxserve.proto: cannot write the generated stubs into {PROTO_DIR}: {e}") from e
    try:
        sources = [os.path.join("jaxserve", "proto", n + ".proto") for n in names]
        code = protoc.main(["grpc_tools.protoc", f"-I{_INCLUDE_ROOT}", f"-I{well_known}", f"--python_out={scratch}",
                            f"--grpc_python_out={scratch}", f"--pyi_out={scratch}", *sources])
        if code != 0:
            raise StubBuildError(f"jaxserve.proto: protoc failed (exit {code}) on {', '.join(sources)}")
        for name in names:
            for target in _outputs(name):
                os.replace(os.path.join(scratch, "jaxserve", "proto", os.path.basename(target)), target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def ensure_stubs() -> None:
    """Generates the stubs of every .proto whose stubs are missing or stale; a no-op when they are current."""
    stale = tuple(n for n in PROTO_NAMES if is_stale(n))
    if stale:
        generate(stale)


def main() -> None:
    """`python -m jaxserve.proto.build`: regenerates every stub."""
    generate()
    print(f"generated stubs for {', '.join(p + '.proto' for p in PROTO_NAMES)} in {PROTO_DIR}")


if __name__ == "__main__":
    sys.exit(main())
