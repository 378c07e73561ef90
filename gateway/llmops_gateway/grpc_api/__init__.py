"""Generated gRPC stubs of protos/llmops/v1/gateway.proto, and the generator."""
