"""Reference Query and Embedding services: deterministic stand-ins that report job notices to
the orchestrator, for `make run`, end-to-end tests and benchmarks."""
