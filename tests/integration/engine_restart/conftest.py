"""Runs the engine-restart check after every other test of the session."""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Moves this folder's tests to the end (a stable sort): they kill an engine of the shared
    graph, and though they wait until it serves again, no other test should see the restart."""
    items.sort(key=lambda item: item.path.parent.name == "engine_restart")
