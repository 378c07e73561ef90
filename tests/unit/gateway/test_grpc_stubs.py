"""The committed gRPC stubs match protos/ (regenerate with llmops_gateway.grpc_api.generate)."""

from __future__ import annotations

from pathlib import Path

from llmops_gateway.grpc_api import generate


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    for fresh in generate.generate(tmp_path):
        committed = Path(generate.__file__).parent / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed.name} is stale: run python -m llmops_gateway.grpc_api.generate"
        )
