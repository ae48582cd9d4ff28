"""The orchestrator process: configuration, server assembly, interceptors, health, CLI."""
