"""Typed settings, read from environment variables. Every variable is listed in the README."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from domain.api_keys import parse_key
from domain.errors import Unauthenticated
from domain.rate_limits import Rate, RateLimitRules, parse_overrides
from domain.service_caps import (
    MAX_IN_FLIGHT_CAP,
    MAX_TOKENS_PER_MINUTE,
    ServiceCaps,
    parse_cap_overrides,
)
from domain.usage import BudgetRules, parse_budget_overrides
from registry.backend import MAX_QUEUE_SHARDS, redis_url_problem


class SettingsError(ValueError):
    """An environment variable has a value that cannot be used."""


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {raw!r}")


# Longest retry delay ORCH_LIMIT_RETRY_AFTER may name, in seconds.
MAX_LIMIT_RETRY_AFTER_S = 3600.0


def _setting(
    default: Any,
    help: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    env: str | None = None,
) -> Any:
    """Declare a setting: its default (whose type says how the variable is parsed: a boolean
    word, an int, a float or text), its description, and the bounds Settings.validate checks (a
    number ``above`` or ``at_least`` some value, and ``at_most`` another). Its variable is
    ORCH_ and the setting's name in capitals unless ``env`` names another."""
    metadata = {
        "env": env,
        "help": help,
        "above": above,
        "at_least": at_least,
        "at_most": at_most,
    }
    return field(default=default, metadata=metadata)


def _variable(setting: dataclasses.Field[Any]) -> str:
    """The environment variable of a setting declared with _setting."""
    env: str | None = setting.metadata["env"]
    return env or f"ORCH_{setting.name.upper()}"


def _out_of_bounds(name: str, value: float, bounds: Mapping[str, Any]) -> str:
    """What is wrong with ``value`` of setting ``name`` ("" when it is within its bounds, the
    ``above``, ``at_least`` and ``at_most`` of its declaration)."""
    above, at_least, at_most = bounds["above"], bounds["at_least"], bounds["at_most"]
    if above is not None and not value > above:
        return f"{name} must be positive" if above == 0 else f"{name} must be > {above:g}"
    if at_least is not None and not value >= at_least:
        return (
            f"{name} must not be negative" if at_least == 0 else f"{name} must be >= {at_least:g}"
        )
    if at_most is not None and not value <= at_most:
        return f"{name} must be <= {at_most}"
    return ""


@dataclass(frozen=True, slots=True)
class Settings:
    """Service configuration. Durations are in seconds."""

    listen_address: str = _setting("[::]:50051", "host:port the gRPC server binds")
    redis_url: str | None = _setting(
        None,
        "Redis URL (redis://, rediss://), or redis+cluster://host:port[,host:port...] "
        "(rediss+cluster: TLS) for a Redis Cluster; unset runs the single-process in-memory "
        "registry",
        env="REDIS_URL",
    )
    redis_key_prefix: str = _setting("ao", "prefix of every Redis key")
    redis_socket_timeout: float = _setting(
        2.0, "Redis command timeout (not used for blocking reads)", above=0
    )
    redis_connect_timeout: float = _setting(1.0, "Redis connect timeout", above=0)
    redis_max_connections: int = _setting(
        64, "Redis connection pool size (the stores' pool and the work queues' pool each)"
    )
    queue_shards: int = _setting(
        0,
        "shards of each work queue, each in a cluster slot of its own, at most 256; 0: 1 on one "
        "Redis, 8 on a cluster. Every process must use the same count; raise it, never lower it "
        "(the shards dropped would keep their items)",
        at_least=0,
    )
    session_default_ttl: float = _setting(
        3600.0, "sliding session TTL when a request sets none", above=0
    )
    session_max_ttl: float = _setting(
        7 * 24 * 3600.0, "largest session TTL a request may ask for", above=0
    )
    session_retention: float = _setting(
        3600.0, "how long closed and expired sessions stay readable before they vanish", at_least=0
    )
    max_message_bytes: int = _setting(
        4 * 1024 * 1024, "largest gRPC message sent or received", at_least=1024
    )
    max_concurrent_rpcs: int = _setting(
        20000,
        "cap on RPCs in flight (open streams count); beyond it calls get RESOURCE_EXHAUSTED",
        at_least=1,
    )
    keepalive_time: float = _setting(
        30.0, "HTTP/2 keepalive ping interval on idle connections", above=0
    )
    keepalive_timeout: float = _setting(
        10.0, "time to wait for a keepalive ack before closing", above=0
    )
    so_reuseport: bool = _setting(False, "let several processes bind the same port")
    event_loop: str = _setting(
        "uvloop", "event loop of `orchestrator serve` and `worker`: uvloop (faster) or asyncio"
    )
    gc_young_threshold: int = _setting(
        50_000,
        "once serving, freeze the start-up heap and run young GC collections every this many"
        " allocations (0: Python's defaults)",
        at_least=0,
    )
    shutdown_grace: float = _setting(
        10.0, "time in-flight calls get to finish on SIGTERM/SIGINT", at_least=0
    )
    health_interval: float = _setting(
        1.0, "how often the backend is probed for the health service", above=0
    )
    query_service_address: str = _setting("localhost:50061", "host:port of the Query Service")
    embedding_service_address: str = _setting(
        "localhost:50061", "host:port of the Embedding Service"
    )
    agent_execution_address: str | None = _setting(
        None,
        "host:port of the Agent Execution Service; unset: ORCH_QUERY_SERVICE_ADDRESS (where the "
        "embedded reference serves every service)",
    )
    workflow_engine_address: str | None = _setting(
        None, "host:port of the Workflow Engine; unset: ORCH_QUERY_SERVICE_ADDRESS"
    )
    conversation_address: str | None = _setting(
        None, "host:port of the Conversation Service; unset: ORCH_QUERY_SERVICE_ADDRESS"
    )
    agent_management_address: str | None = _setting(
        None, "host:port of the Agent Management Service; unset: ORCH_QUERY_SERVICE_ADDRESS"
    )
    tool_registry_address: str | None = _setting(
        None, "host:port of the Tool Registry; unset: ORCH_QUERY_SERVICE_ADDRESS"
    )
    plans: bool = _setting(
        True,
        "run each chat message as an orchestration plan of its session's agent (Agent "
        "Management, Conversation, Tool Registry, then Query, Agent Execution or Workflow "
        "Engine); false: one call to Query or Embedding per message (a deployment without "
        "the other platform services)",
    )
    downstream_timeout: float = _setting(
        5.0, "longest wait for one downstream call attempt", above=0
    )
    downstream_attempts: int = _setting(
        3, "downstream call attempts (retried on UNAVAILABLE only)", at_least=1
    )
    downstream_check_interval: float = _setting(
        10.0,
        "how often each configured downstream address is checked for a connection (a "
        "warning at start and when one becomes unreachable; health entry "
        "downstream:<service>); 0 turns the check off",
        at_least=0,
    )
    job_deadline: float = _setting(300.0, "a job times out this long after it started", above=0)
    job_heartbeat: float = _setting(
        60.0,
        "...or this long after its service last reported (progress and deltas extend it)",
        above=0,
    )
    job_retention: float = _setting(86400.0, "how long finished jobs stay readable", at_least=0)
    job_queue_timeout: float = _setting(
        3600.0,
        "a queued message (background, or behind a busy session) times out if its turn has not "
        "come by then",
        above=0,
    )
    reaper_interval: float = _setting(
        1.0,
        "how often each process looks for timed-out jobs and for interrupted hand-offs",
        above=0,
    )
    handoff_grace: float = _setting(
        5.0,
        "a started job whose hand-off to its service is not confirmed this long after it began "
        "(the lease is renewed while a submit goes on) is handed over again by any process",
        above=0,
    )
    handoff_attempts: int = _setting(
        3,
        "hand-offs a job gets (the first included) before it fails with handoff_failed",
        at_least=1,
    )
    internal_max_calls: int = _setting(
        64,
        "calls of the internal API one job may make (each Complete, and each text of an Embed "
        "not answered from the cache); beyond it RESOURCE_EXHAUSTED",
        at_least=1,
    )
    event_log_max_events: int = _setting(
        1000, "events kept per session for resuming streams", at_least=1
    )
    event_log_ttl: float = _setting(
        86400.0, "a session's event log is dropped this long after its last event", above=0
    )
    event_heartbeat_interval: float = _setting(
        1.0,
        "how often each live event reader (one per Redis shard node) is sent a heartbeat",
        above=0,
    )
    event_heartbeat_timeout: float = _setting(
        5.0,
        "an event reader that heard no heartbeat this long is silent: health entry events and "
        "readiness NOT_SERVING, the reader reconnected; must exceed the interval",
        above=0,
    )
    event_pubsub_legacy: bool = _setting(
        False,
        "rolling upgrade from a release with classic pub/sub: also PUBLISH and SUBSCRIBE each "
        "session's classic channel (README, Scaling out); off once no older process runs",
    )
    ws_address: str = _setting(
        "0.0.0.0:8000",
        "host:port of the WebSocket bridge for JSON notices (/ws/task_updates); empty: off",
    )
    embedded_reference: bool = _setting(
        False, "also run the reference Query/Embedding services in this process (for `make run`)"
    )
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting("text", "text or json (one object per line)")
    demo_keys: bool = _setting(
        True,
        "in-memory registry only: seed the fixed demo API keys listed in the README "
        "(local use only)",
    )
    api_keys_file: str | None = _setting(
        None,
        "in-memory registry only: JSON file of API keys to accept (plaintext or SHA-256 "
        "hashed secrets)",
    )
    bootstrap_admin_key: str | None = _setting(
        None,
        "an admin API key (ao_<key_id>_<secret>) stored at start unless its id exists; "
        "creates the first admin key of a Redis deployment",
    )
    bootstrap_service_key: str | None = _setting(
        None,
        "a service API key (ao_<key_id>_<secret>, tenant platform) stored at start unless its "
        "id exists; lets the platform services of a Redis deployment report "
        "(docker-compose.yml)",
    )
    tls_cert_file: str | None = _setting(
        None, "PEM server certificate chain; set with the key to serve TLS"
    )
    tls_key_file: str | None = _setting(None, "PEM private key of the certificate")
    tls_client_ca_file: str | None = _setting(
        None, "PEM CA bundle; when set, every client must present a certificate it signed (mTLS)"
    )
    healthcheck_ca_file: str | None = _setting(
        None,
        "`orchestrator health` without --address, when the server serves TLS: PEM CA that "
        "signed its certificate; unset: ORCH_TLS_CERT_FILE (a self-signed certificate, or a "
        "chain that holds its CA)",
    )
    healthcheck_cert_file: str | None = _setting(
        None, "`orchestrator health` without --address, under mTLS: PEM client certificate"
    )
    healthcheck_key_file: str | None = _setting(
        None, "`orchestrator health` without --address, under mTLS: PEM key of that certificate"
    )
    healthcheck_server_name: str | None = _setting(
        None,
        "`orchestrator health` without --address, under TLS: the name to verify in the "
        "server certificate (it connects to loopback); unset: the loopback address",
    )
    rate_limit_enabled: bool = _setting(True, "enforce the per-tenant and per-key request rates")
    rate_limit_rps: float = _setting(50.0, "sustained requests per second per tenant")
    rate_limit_burst: int = _setting(100, "requests a tenant may make at once above its rate")
    rate_limit_key_rps: float = _setting(
        0.0, "requests per second per API key; 0: no per-key limit", at_least=0
    )
    rate_limit_key_burst: int = _setting(0, "burst per API key; 0: twice the key rate", at_least=0)
    rate_limit_overrides: str = _setting(
        "", "per-tenant rate:burst, e.g. tenantA=5:10,tenantB=1000:2000"
    )
    unary_request_id: str = _setting(
        "trailing",
        "where unary calls return x-request-id: trailing (response trailers, sent with the "
        "response at no extra cost) or initial (response headers, like streams; grpc.aio "
        "sends them in a batch of their own)",
    )
    max_streams_per_tenant: int = _setting(
        1000,
        "open server-streaming calls per tenant and process; beyond it RESOURCE_EXHAUSTED",
        at_least=1,
    )
    revocation_check_interval: float = _setting(
        1.0,
        "how often each process checks whether the API keys of its open streams were revoked "
        "(one read for all of them) and ends those streams; 0: never",
        at_least=0,
    )
    auth_failure_limit: int = _setting(
        20,
        "failed authentications one client address may make per ORCH_AUTH_FAILURE_WINDOW; "
        "beyond it its calls get RESOURCE_EXHAUSTED without a key check; 0: no limit",
        at_least=0,
    )
    auth_failure_window: float = _setting(
        60.0,
        "the window of ORCH_AUTH_FAILURE_LIMIT (failures are forgiven at limit/window per second)",
        above=0,
    )
    token_budget_daily: int = _setting(
        0,
        "tokens a tenant may use per UTC day before new work is refused; 0: unlimited",
        at_least=0,
    )
    token_budget_overrides: str = _setting(
        "", "per-tenant daily token budgets, e.g. tenantA=100000,tenantB=0 (0: unlimited)"
    )
    service_in_flight_cap: int = _setting(
        0,
        "jobs one tenant may have in flight at each service (query, embedding, ...), shared by "
        "all replicas; beyond it SendMessage gets RESOURCE_EXHAUSTED and queued messages and "
        f"batch items wait in their queue; 0: unlimited (at most {MAX_IN_FLIGHT_CAP})",
        at_least=0,
        at_most=MAX_IN_FLIGHT_CAP,
    )
    service_in_flight_overrides: str = _setting(
        "",
        "per-tenant caps on jobs in flight per service, e.g. tenantA=20,tenantB=0 (0: unlimited)",
    )
    tokens_per_minute: int = _setting(
        0,
        "tokens a tenant may be charged per minute before new work waits or is refused, as "
        f"ORCH_SERVICE_IN_FLIGHT_CAP; 0: unlimited (at most {MAX_TOKENS_PER_MINUTE})",
        at_least=0,
        at_most=MAX_TOKENS_PER_MINUTE,
    )
    tokens_per_minute_overrides: str = _setting(
        "", "per-tenant tokens-per-minute limits, e.g. tenantA=50000,tenantB=0 (0: unlimited)"
    )
    limit_retry_after: float = _setting(
        1.0,
        "the retry delay RESOURCE_EXHAUSTED names over the in-flight cap, and how long a queued "
        "message or batch item over it waits before it is tried again (at most "
        f"{MAX_LIMIT_RETRY_AFTER_S:g})",
        above=0,
        at_most=MAX_LIMIT_RETRY_AFTER_S,
    )
    embedding_cache_ttl: float = _setting(
        86400.0,
        "how long embedding results are cached per (tenant, model, text); 0 disables the cache",
        at_least=0,
    )
    embedding_model_version: str = _setting(
        "1", "part of every embedding cache key: change it when the embedding model changes"
    )
    agent_check: bool = _setting(
        True,
        "CreateSession checks that the agent exists at Agent Management (NOT_FOUND otherwise); "
        "false takes any agent id (only for tests of the session rules without Agent Management)",
    )
    agent_cache_ttl: float = _setting(
        300.0,
        "how long an agent's configuration from Agent Management is cached (shared by every "
        "replica on the backend; dropped earlier by AdminService.InvalidateAgent or an "
        "AGENT_CHANGED notice); 0 asks Agent Management on every lookup",
        at_least=0,
    )
    metrics_address: str = _setting(
        "0.0.0.0:9464", "host:port of the Prometheus /metrics endpoint; empty disables it"
    )
    metrics_max_tenants: int = _setting(
        1000,
        "distinct tenant label values per metric (rate limits, tokens); later tenants are "
        'counted under tenant="_other"',
        at_least=1,
    )
    metrics_sample_interval: float = _setting(
        5.0,
        "how often each process reads the tasks-by-state and queue-depth gauges from the "
        "registry (only while the /metrics endpoint is enabled)",
        above=0,
    )
    batch_max_items: int = _setting(10_000, "most items one SubmitBatch may carry", at_least=1)
    batch_completion_window: float = _setting(
        86400.0,
        "time a batch may take when the request sets no completion_window; then unfinished "
        "items expire",
        above=0,
    )
    batch_max_completion_window: float = _setting(
        7 * 24 * 3600.0, "largest completion_window a request may ask for", above=0
    )
    batch_retention: float = _setting(
        7 * 24 * 3600.0,
        "a finished batch (its results and idempotency key too) is dropped this long after it "
        "became final",
        above=0,
    )
    batch_worker_enabled: bool = _setting(
        True, "run a batch worker inside the server process (`orchestrator worker` runs more)"
    )
    batch_worker_concurrency: int = _setting(16, "batch items each worker runs at once", at_least=1)
    chat_worker_enabled: bool = _setting(
        True,
        "run the worker of queued chat messages inside the server process (`orchestrator "
        "worker` runs more)",
    )
    chat_worker_concurrency: int = _setting(
        64, "queued chat messages each worker runs (or waits for their turn) at once", at_least=1
    )
    batch_worker_lease: float = _setting(
        30.0,
        "work queue lease of a running item; renewed while it runs, reclaimed when a worker dies",
        above=0,
    )
    batch_worker_poll: float = _setting(
        1.0,
        "longest wait of an idle worker for work; also bounds how long stopping it takes",
        above=0,
    )
    batch_expiry_interval: float = _setting(
        1.0, "how often each server process looks for batches past their completion window", above=0
    )
    otel_enabled: bool = _setting(
        False, "trace every RPC with OpenTelemetry (needs the tracing extra)"
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from ``environ`` (default: os.environ) and validate it."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = _variable(f)
            raw = environ.get(name)
            if raw is None or (raw == "" and f.default is None):
                continue
            try:
                values[f.name] = _parser_for(f.default)(raw)
            except ValueError as exc:
                raise SettingsError(f"{name}={raw!r}: {exc}") from None
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            problem = _out_of_bounds(f.name, getattr(self, f.name), f.metadata)
            if problem:
                problems.append(problem)
        if self.session_default_ttl > self.session_max_ttl:
            problems.append("session_default_ttl must not exceed session_max_ttl")
        if self.event_heartbeat_timeout <= self.event_heartbeat_interval:
            problems.append("event_heartbeat_timeout must exceed event_heartbeat_interval")
        if self.ws_address and ":" not in self.ws_address:
            problems.append("ws_address must be host:port (or empty)")
        if self.queue_shards > MAX_QUEUE_SHARDS:
            problems.append(f"ORCH_QUEUE_SHARDS must be at most {MAX_QUEUE_SHARDS}")
        if self.log_format not in ("text", "json"):
            problems.append("log_format must be text or json")
        if self.event_loop not in ("uvloop", "asyncio"):
            problems.append("event_loop must be uvloop or asyncio")
        if self.unary_request_id not in ("initial", "trailing"):
            problems.append("unary_request_id must be initial or trailing")
        if ":" not in self.listen_address:
            problems.append("listen_address must be host:port")
        url_problem = redis_url_problem(self.redis_url) if self.redis_url else None
        if url_problem:
            problems.append(url_problem)
        if self.api_keys_file and self.redis_url:
            problems.append(
                "ORCH_API_KEYS_FILE applies to the in-memory registry only; on Redis use "
                "ORCH_BOOTSTRAP_ADMIN_KEY and AdminService"
            )
        if self.bootstrap_admin_key and not _looks_like_api_key(self.bootstrap_admin_key):
            problems.append("ORCH_BOOTSTRAP_ADMIN_KEY must look like ao_<key_id>_<secret>")
        if self.bootstrap_service_key and not _looks_like_api_key(self.bootstrap_service_key):
            problems.append("ORCH_BOOTSTRAP_SERVICE_KEY must look like ao_<key_id>_<secret>")
        if bool(self.healthcheck_cert_file) != bool(self.healthcheck_key_file):
            problems.append(
                "ORCH_HEALTHCHECK_CERT_FILE and ORCH_HEALTHCHECK_KEY_FILE must be set together"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            problems.append("ORCH_TLS_CERT_FILE and ORCH_TLS_KEY_FILE must be set together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            problems.append(
                "ORCH_TLS_CLIENT_CA_FILE needs ORCH_TLS_CERT_FILE and ORCH_TLS_KEY_FILE"
            )
        if self.metrics_address and ":" not in self.metrics_address:
            problems.append("metrics_address must be host:port or empty")
        try:
            self.rate_limit_rules()
        except ValueError as exc:
            problems.append(f"rate limits: {exc}")
        if self.batch_completion_window > self.batch_max_completion_window:
            problems.append("batch_completion_window must not exceed batch_max_completion_window")
        try:
            parse_budget_overrides(self.token_budget_overrides)
        except ValueError as exc:
            problems.append(f"token budgets: {exc}")
        try:
            self.service_caps()
        except ValueError as exc:
            problems.append(f"service limits: {exc}")
        if problems:
            raise SettingsError("; ".join(problems))

    def rate_limit_rules(self) -> RateLimitRules:
        """The request-rate rules these settings describe (ValueError when invalid)."""
        key: Rate | None = None
        if self.rate_limit_key_rps > 0:
            burst = self.rate_limit_key_burst or max(1, math.ceil(2 * self.rate_limit_key_rps))
            key = Rate(self.rate_limit_key_rps, burst)
        return RateLimitRules(
            default=Rate(self.rate_limit_rps, self.rate_limit_burst),
            key=key,
            overrides=parse_overrides(self.rate_limit_overrides),
        )

    def service_caps(self) -> ServiceCaps:
        """The limits toward the services these settings describe (ValueError when invalid)."""
        return ServiceCaps(
            in_flight=self.service_in_flight_cap,
            in_flight_overrides=parse_cap_overrides(
                self.service_in_flight_overrides, "jobs", MAX_IN_FLIGHT_CAP
            ),
            tokens_per_minute=self.tokens_per_minute,
            tokens_per_minute_overrides=parse_cap_overrides(
                self.tokens_per_minute_overrides, "tokens", MAX_TOKENS_PER_MINUTE
            ),
            retry_after_ms=max(1, int(self.limit_retry_after * 1000)),
        )

    def budget_rules(self) -> BudgetRules:
        """The daily token budgets these settings describe."""
        return BudgetRules(
            default=self.token_budget_daily,
            overrides=parse_budget_overrides(self.token_budget_overrides),
        )

    def in_effect(self, environ: Mapping[str, str] | None = None) -> list[tuple[str, str, bool]]:
        """(variable, value in effect, whether the environment set it) for every setting;
        secrets are masked (the bootstrap admin key's secret, a Redis URL's password)."""
        environ = os.environ if environ is None else environ
        rows = []
        for f in dataclasses.fields(self):
            name = _variable(f)
            value = getattr(self, f.name)
            shown = "" if value is None else str(value)
            if f.name == "bootstrap_admin_key" and value:
                shown = _mask_api_key(value)
            elif f.name == "redis_url" and value:
                shown = _mask_url_password(value)
            rows.append((name, shown, name in environ and environ[name] != ""))
        return rows

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting, for the README and --help."""
        return [
            (_variable(f), "" if f.default is None else str(f.default), f.metadata["help"])
            for f in dataclasses.fields(cls)
        ]


def _mask_api_key(value: str) -> str:
    """``ao_<key_id>_***``: the key id identifies it, the secret stays hidden."""
    key_id = value.split("_")[1] if value.count("_") >= 2 else ""
    return f"ao_{key_id}_***" if key_id else "***"


def _mask_url_password(url: str) -> str:
    """A URL with the password of its user info replaced by ***."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _looks_like_api_key(value: str) -> bool:
    try:
        parse_key(value)
    except Unauthenticated:
        return False
    return True


def _parser_for(default: Any) -> Callable[[str], Any]:
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str
