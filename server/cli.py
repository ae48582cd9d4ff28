"""The ``orchestrator`` command: ``serve`` runs the server, ``worker`` runs queue workers only,
``health`` probes a server (for container health checks), ``settings`` prints the configuration
in effect."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import event_loop, supervisor
from server.app import OrchestratorServer
from server.config import Settings, SettingsError
from server.listen import EXIT_ADDRESS_IN_USE, ListenError
from server.logging_setup import configure_logging
from server.memory_probe import MemoryProbe, probing
from server.tracing import configure_tracer_provider


def _channel(address: str, args: argparse.Namespace) -> grpc.aio.Channel:
    """Plaintext, or TLS when a CA file is given (mTLS with a client certificate and key)."""
    if not args.ca_file:
        return grpc.aio.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.ca_file).read_bytes(),
        private_key=Path(args.key_file).read_bytes() if args.key_file else None,
        certificate_chain=Path(args.cert_file).read_bytes() if args.cert_file else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else None
    return grpc.aio.secure_channel(address, credentials, options=options)


WILDCARD_HOSTS = {"", "0.0.0.0", "[::]", "::", "*"}


def local_probe(settings: Settings) -> tuple[str, str | None, str | None, str | None, str | None]:
    """Where and how `orchestrator health` without --address reaches this host's server, as
    ``(address, ca_file, cert_file, key_file, server_name)``: the port of ORCH_LISTEN_ADDRESS on
    loopback (or its host when it binds one address), with TLS when the server serves TLS."""
    host, _, port = settings.listen_address.rpartition(":")
    address = f"{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"
    if not settings.tls_cert_file:
        return address, None, None, None, None
    return (
        address,
        settings.healthcheck_ca_file or settings.tls_cert_file,
        settings.healthcheck_cert_file,
        settings.healthcheck_key_file,
        settings.healthcheck_server_name,
    )


async def _health(args: argparse.Namespace) -> int:
    """Health and reflection are public: no API key is needed."""
    address, service, timeout_s = args.address, args.service, args.timeout
    async with _channel(address, args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            print(f"health check failed: {exc.code().name} {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _worker(settings: Settings, concurrency: int) -> int:
    """Queue workers only (batch items and queued chat messages): they share the Redis work
    queues with every server and worker."""
    import dataclasses

    from server.services import default_dispatcher
    from server.workers import run_workers

    if not settings.redis_url:
        print("configuration error: orchestrator worker needs REDIS_URL", file=sys.stderr)
        return 2
    if concurrency > 0:
        settings = dataclasses.replace(settings, batch_worker_concurrency=concurrency)
    event_loop.run(run_workers(settings, default_dispatcher(settings)), settings.event_loop)
    return 0


async def _serve(settings: Settings, probe: MemoryProbe | None, interval_s: float) -> None:
    async with probing(probe, interval_s):
        if settings.embedded_reference:
            # `make run` only: the production server never loads the reference services.
            from server.dev_stack import serve_with_reference

            await serve_with_reference(settings)
        else:
            await OrchestratorServer(settings).serve_until_signalled()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gRPC server (configured by environment variables)"
    )
    serve.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N server processes on the same port (SO_REUSEPORT) sharing REDIS_URL; "
        "SIGTERM stops them all",
    )
    serve.add_argument(
        "--tracemalloc",
        metavar="FILE",
        help="diagnostic: trace allocations and append a memory report to FILE on SIGUSR1 "
        "(slow; not for production)",
    )
    serve.add_argument(
        "--tracemalloc-interval",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --tracemalloc, also write a report at this interval (0: on SIGUSR1 only)",
    )
    probe = commands.add_parser("health", help="check a running server's health; exit 0 if SERVING")
    probe.add_argument(
        "--address",
        help="host:port to probe; unset: this host's server as configured (the port of "
        "ORCH_LISTEN_ADDRESS on loopback, TLS per ORCH_TLS_* and ORCH_HEALTHCHECK_*)",
    )
    probe.add_argument(
        "--server-name", help="with TLS: the name to verify in the server certificate"
    )
    probe.add_argument(
        "--service",
        default="",
        help="a service name; empty for the server (readiness), liveness for liveness",
    )
    probe.add_argument("--timeout", type=float, default=3.0)
    probe.add_argument("--ca-file", help="PEM CA that signed the server certificate: use TLS")
    probe.add_argument("--cert-file", help="PEM client certificate, for mutual TLS")
    probe.add_argument("--key-file", help="PEM key of the client certificate, for mutual TLS")
    settings_command = commands.add_parser(
        "settings",
        help="print every configuration variable with the value in effect "
        "(from the environment, else the default)",
    )
    settings_command.add_argument(
        "--defaults", action="store_true", help="print the defaults and descriptions instead"
    )
    worker_help = (
        "run queue workers only (no gRPC server) against REDIS_URL: batch items and queued "
        "chat messages (background, or behind a busy session)"
    )
    worker = commands.add_parser("worker", help=worker_help, description=worker_help)
    worker.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="items run at once (default: ORCH_BATCH_WORKER_CONCURRENCY)",
    )
    args = parser.parse_args(argv)

    if args.command == "health":
        if args.address is None:  # this host's server, as configured (the image HEALTHCHECK)
            try:
                local = local_probe(Settings.from_env())
            except SettingsError as exc:
                print(f"configuration error: {exc}", file=sys.stderr)
                return 2
            args.address, args.ca_file, args.cert_file, args.key_file, args.server_name = local
        return asyncio.run(_health(args))
    if args.command == "settings" and args.defaults:
        for name, default, help_text in Settings.documentation():
            print(f"{name:32} {default or '(unset)':20} {help_text}")
        return 0
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "settings":
        for name, value, from_env in settings.in_effect():
            source = "(environment)" if from_env else "(default)"
            print(f"{name:32} {value or '(unset)':24} {source}")
        return 0
    configure_logging(settings.log_level, settings.log_format)
    if settings.otel_enabled:
        configure_tracer_provider()
    if args.command == "worker":
        return _worker(settings, args.concurrency)
    refused = supervisor.refusal(settings, args.processes, bool(args.tracemalloc))
    if refused:
        print(f"configuration error: {refused}", file=sys.stderr)
        return 2
    if args.processes > 1:
        command = supervisor.serve_command([])
        return asyncio.run(supervisor.supervise(settings, args.processes, command))
    memory_probe = MemoryProbe(Path(args.tracemalloc)) if args.tracemalloc else None
    if memory_probe is not None:
        memory_probe.start()
    try:
        event_loop.run(
            _serve(settings, memory_probe, args.tracemalloc_interval), settings.event_loop
        )
    except SettingsError as exc:  # e.g. an unreadable ORCH_API_KEYS_FILE, found at start
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:
        print(f"orchestrator: {exc}", file=sys.stderr)
        return EXIT_ADDRESS_IN_USE
    return 0


if __name__ == "__main__":
    sys.exit(main())
