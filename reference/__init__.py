"""Reference platform services (Query, Embedding, Conversation, Agent Management, Tool Registry,
Agent Execution, Workflow Engine): deterministic stand-ins, one module each, that report job
notices to the orchestrator, for `make run`, end-to-end tests and benchmarks."""
