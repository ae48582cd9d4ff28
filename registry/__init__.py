"""Storage of the orchestrator's state: the interfaces and their Redis and in-memory backends."""
