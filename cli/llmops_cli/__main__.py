"""`python -m llmops_cli` runs the `llmops` command."""

from llmops_cli.main import main

main()
