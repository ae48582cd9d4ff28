"""Typed async clients for the platform's downstream services."""
