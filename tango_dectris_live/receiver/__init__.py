"""Python face of the compiled receiver: ZeroMQ stream into shared-memory frame stacks."""
