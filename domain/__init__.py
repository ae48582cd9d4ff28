"""Business rules of the orchestrator, independent of gRPC and of the storage backend."""
