"""Where and how to connect: address, API key, TLS/mTLS, from arguments or the environment.

Environment (arguments win): ``AORKESTRA_ADDRESS`` (default ``localhost:50051``),
``AORKESTRA_API_KEY``, ``AORKESTRA_TLS`` (``true`` for TLS with the system roots),
``AORKESTRA_CA_FILE`` (TLS with this CA; implies TLS), ``AORKESTRA_CERT_FILE`` and
``AORKESTRA_KEY_FILE`` (a client certificate for mTLS), ``AORKESTRA_SERVER_NAME`` (the name to
check the server's certificate against when it differs from the address's host),
``AORKESTRA_TIMEOUT`` (seconds per unary call, default 30).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from aorkestra.retry import RetryPolicy

DEFAULT_ADDRESS = "localhost:50051"
ENV_PREFIX = "AORKESTRA_"
_TRUE = {"1", "true", "yes", "on"}


class ConfigError(ValueError):
    """A connection setting that cannot work (a missing certificate file, a half mTLS pair)."""


@dataclass(frozen=True)
class ClientConfig:
    address: str = DEFAULT_ADDRESS
    api_key: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def resolve(
        cls,
        *,
        address: str | None = None,
        api_key: str | None = None,
        tls: bool | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        server_name: str | None = None,
        timeout_s: float | None = None,
        retry: RetryPolicy | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ClientConfig:
        """Arguments, then ``AORKESTRA_*`` variables, then defaults."""
        env = os.environ if env is None else env

        def pick(value: str | None, name: str) -> str | None:
            return value if value is not None else (env.get(ENV_PREFIX + name) or None)

        ca = pick(ca_file, "CA_FILE")
        cert = pick(cert_file, "CERT_FILE")
        key = pick(key_file, "KEY_FILE")
        if tls is None:
            tls = (env.get(ENV_PREFIX + "TLS", "").strip().lower() in _TRUE) or bool(
                ca or cert or key
            )
        raw_timeout = env.get(ENV_PREFIX + "TIMEOUT")
        if timeout_s is None:
            try:
                timeout_s = float(raw_timeout) if raw_timeout else 30.0
            except ValueError:
                raise ConfigError(f"{ENV_PREFIX}TIMEOUT must be a number of seconds") from None
        config = cls(
            address=pick(address, "ADDRESS") or DEFAULT_ADDRESS,
            api_key=pick(api_key, "API_KEY"),
            tls=tls,
            ca_file=ca,
            cert_file=cert,
            key_file=key,
            server_name=pick(server_name, "SERVER_NAME"),
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
        )
        config.validate()
        return config

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("mTLS needs both a client certificate and its key (cert and key)")
        for name in (self.ca_file, self.cert_file, self.key_file):
            if name and not Path(name).is_file():
                raise ConfigError(f"no such file: {name}")
        if self.timeout_s <= 0:
            raise ConfigError("timeout must be positive")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if not self.tls:
            return None

        def read(name: str | None) -> bytes | None:
            return Path(name).read_bytes() if name else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            # Notice a silently dead connection under a long stream; 5 minutes is the least a
            # gRPC server accepts by default (more frequent pings get the connection closed).
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # The SDK retries by itself, with the server's advertised delays.
            ("grpc.enable_retries", 0),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options
