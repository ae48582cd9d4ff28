"""Typed async clients for the platform's downstream services."""

from clients.downstream import DownstreamConfig, GrpcDispatcher

__all__ = ["DownstreamConfig", "GrpcDispatcher"]
