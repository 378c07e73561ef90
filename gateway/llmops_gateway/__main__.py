"""`python -m llmops_gateway` runs the gateway with settings from LLMOPS_GATEWAY_* variables."""

from llmops_gateway.server import main

main()
