"""Generates the Python gRPC stubs from protos/ (run after editing a .proto file).

    python -m llmops_gateway.grpc_api.generate

The stubs are committed; a test regenerates them into a temporary folder and fails when the
committed ones differ.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

PROTO = "llmops/v1/gateway.proto"
OUTPUTS = ("gateway_pb2.py", "gateway_pb2.pyi", "gateway_pb2_grpc.py")
HERE = Path(__file__).resolve().parent
PROTOS = HERE.parents[2] / "protos"


def generate(out_dir: Path, protos: Path = PROTOS) -> list[Path]:
    """Runs protoc (grpcio-tools) and rewrites the imports to this package.

    Returns:
        The generated files.

    Raises:
        RuntimeError: protoc failed.
    """
    from grpc_tools import protoc

    well_known = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as raw:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{protos}",
                f"-I{well_known}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                str(protos / PROTO),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed with exit code {code}")
        written = []
        for name in OUTPUTS:
            text = (Path(raw) / "llmops" / "v1" / name).read_text()
            text = text.replace(
                "from llmops.v1 import gateway_pb2 as",
                "from llmops_gateway.grpc_api import gateway_pb2 as",
            )
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(HERE):
        sys.stdout.write(f"wrote {path}\n")
