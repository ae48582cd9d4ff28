"""Test helpers: real redis-server processes and real orchestrator servers on loopback."""
