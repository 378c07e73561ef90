"""The llmops gateway: authenticated, rate-limited OpenAI-compatible REST and gRPC edge."""
