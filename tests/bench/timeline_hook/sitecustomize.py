"""Start-up hook for `python -m tests.bench.burst_timeline`: on its PYTHONPATH only."""

import os

if os.environ.get("LLMOPS_TIMELINE_DIR"):
    from tests.bench.burst_timeline import install

    install()
