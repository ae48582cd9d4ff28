"""``aorkestra``: the command line for humans, built on the SDK.

Connection settings come from flags or the environment (AORKESTRA_ADDRESS, AORKESTRA_API_KEY,
AORKESTRA_TLS, AORKESTRA_CA_FILE, AORKESTRA_CERT_FILE, AORKESTRA_KEY_FILE,
AORKESTRA_SERVER_NAME). Exit codes: 0 success; 1 the job failed, timed out or was cancelled;
2 a wrong command line or setting; 3 unauthenticated or permission denied; 4 not found;
5 invalid argument or failed precondition; 6 the server is unreachable (unavailable, deadline
exceeded); 7 rate-limited or over quota; 8 history truncated; 10 any other server error;
130 interrupted.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar, cast

try:
    import typer
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table
except ImportError:  # pragma: no cover - the SDK installed without its [cli] extra
    sys.stderr.write("the aorkestra CLI needs its extra: pip install 'aorkestra[cli]'\n")
    raise SystemExit(2) from None

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from aorkestra import events
from aorkestra._proto.orchestrator.admin.v1 import admin_pb2
from aorkestra._proto.orchestrator.v1 import batch_pb2, common_pb2, session_pb2
from aorkestra.client import AsyncClient, BatchProgress, JobFailedError, read_jsonl
from aorkestra.config import ClientConfig, ConfigError
from aorkestra.errors import HistoryTruncatedError, OrchestratorError

T = TypeVar("T")

app = typer.Typer(
    name="aorkestra",
    help="Talk to the Agent Orchestrator Service: chat, send, follow, batches, keys, usage.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
batch_app = typer.Typer(
    help="Submit batches, wait for them, read their results.", no_args_is_help=True
)
keys_app = typer.Typer(help="Create, list and revoke API keys (admin key).", no_args_is_help=True)
tasks_app = typer.Typer(help="Read tasks (admin key).", no_args_is_help=True)
sessions_app = typer.Typer(help="Create, list, read and close sessions.", no_args_is_help=True)
app.add_typer(batch_app, name="batch")
app.add_typer(keys_app, name="keys")
app.add_typer(tasks_app, name="tasks")
app.add_typer(sessions_app, name="sessions")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
_EXIT_CODES: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.UNAUTHENTICATED: 3,
    grpc.StatusCode.PERMISSION_DENIED: 3,
    grpc.StatusCode.NOT_FOUND: 4,
    grpc.StatusCode.INVALID_ARGUMENT: 5,
    grpc.StatusCode.FAILED_PRECONDITION: 5,
    grpc.StatusCode.OUT_OF_RANGE: 5,
    grpc.StatusCode.ALREADY_EXISTS: 5,
    grpc.StatusCode.UNAVAILABLE: 6,
    grpc.StatusCode.DEADLINE_EXCEEDED: 6,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 7,
}
EXIT_TRUNCATED = 8
EXIT_OTHER = 10


def _hint(error: OrchestratorError, config: ClientConfig) -> str:
    code = error.code
    if code == grpc.StatusCode.UNAVAILABLE:
        tls = "TLS" if config.tls else "plaintext"
        return (
            f"is the server running at {config.address} ({tls})? "
            "Set --address / AORKESTRA_ADDRESS, and --tls or --ca-file for a TLS server."
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        if not config.api_key:
            return "no API key given: pass --api-key or set AORKESTRA_API_KEY."
        return "the API key was refused: check --api-key / AORKESTRA_API_KEY."
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return "this key's role may not do that (keys, tasks and usage need an admin key)."
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay_s is not None:
        return f"try again in {error.retry_delay_s:.1f}s."
    return ""


def _fail(error: OrchestratorError, config: ClientConfig) -> int:
    err.print(f"[bold red]error:[/] {error.code.name}: {error.message}", markup=True)
    for violation in error.details.field_violations:
        err.print(f"  field {violation.field}: {violation.description}")
    for quota in error.details.quota_violations:
        err.print(f"  quota {quota.subject}: {quota.description}")
    if error.request_id:
        err.print(f"  request id: {error.request_id}")
    hint = _hint(error, config)
    if hint:
        err.print(f"  hint: {hint}")
    return _EXIT_CODES.get(error.code, EXIT_OTHER)


def _config(ctx: typer.Context) -> ClientConfig:
    config: ClientConfig = ctx.obj
    return config


def _run(
    ctx: typer.Context, work: Callable[[AsyncClient], Coroutine[Any, Any, int | None]]
) -> None:
    """Runs ``work`` with a client; turns errors into a message and an exit code."""
    config = _config(ctx)

    async def main() -> int | None:
        async with AsyncClient(config=config) as client:
            return await work(client)

    try:
        code = asyncio.run(main())
    except JobFailedError as exc:
        err.print(f"[bold red]job {exc.event.kind}:[/] {exc.message}", markup=True)
        raise typer.Exit(EXIT_JOB_FAILED) from None
    except HistoryTruncatedError as exc:
        err.print(f"[bold red]error:[/] {exc.message}", markup=True)
        err.print(f"  hint: resume with --after {exc.oldest_retained - 1} to read what is left.")
        raise typer.Exit(EXIT_TRUNCATED) from None
    except OrchestratorError as exc:
        raise typer.Exit(_fail(exc, config)) from None
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, never closed
        raise typer.Exit(0) from None
    except (ValueError, OSError) as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code or 0)


def _run_printed(ctx: typer.Context, call: Callable[[AsyncClient], Awaitable[Message]]) -> None:
    """Runs one ``call`` with a client (as :func:`_run`) and prints its reply (JSON)."""

    async def work(client: AsyncClient) -> int:
        _print_json(_json(await call(client)))
        return 0

    _run(ctx, work)


def _json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@app.callback()
def connection(
    ctx: typer.Context,
    address: Annotated[
        str | None, typer.Option(help="host:port of the server (env AORKESTRA_ADDRESS)")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key (env AORKESTRA_API_KEY)", show_default=False)
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option("--tls/--plaintext", help="TLS with the system roots (env AORKESTRA_TLS)"),
    ] = None,
    ca_file: Annotated[str | None, typer.Option(help="CA certificate (PEM); implies TLS")] = None,
    cert_file: Annotated[str | None, typer.Option(help="client certificate for mTLS (PEM)")] = None,
    key_file: Annotated[str | None, typer.Option(help="client key for mTLS (PEM)")] = None,
    server_name: Annotated[
        str | None, typer.Option(help="name the server's certificate is checked against")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds per unary call")] = None,
) -> None:
    """Connection settings for every command (flags win over AORKESTRA_* variables)."""
    try:
        ctx.obj = ClientConfig.resolve(
            address=address,
            api_key=api_key,
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_name=server_name,
            timeout_s=timeout,
        )
    except ConfigError as exc:
        err.print(f"[bold red]error:[/] {exc}", markup=True)
        raise typer.Exit(EXIT_USAGE) from None


# -- chat, send, follow ----------------------------------------------------------------------


class EventPrinter:
    """Shows a job as it happens: deltas printed as they arrive, tool calls, workflow and plan
    steps on their own lines, then the outcome."""

    def __init__(self) -> None:
        self.in_text = False  # the cursor is after a delta, mid-line
        self.streamed = False  # deltas came: the completed text is not printed again

    def _line(self, text: str) -> None:
        if self.in_text:
            out.print()
            self.in_text = False
        out.print(text, markup=True, highlight=False)

    def show(self, event: events.Event) -> None:
        if isinstance(event, events.Delta):
            out.print(event.text, end="", markup=False, highlight=False, soft_wrap=True)
            out.file.flush()
            self.in_text = self.streamed = True
        elif isinstance(event, events.Accepted):
            queued = " (queued behind the session's earlier jobs)" if event.queued else ""
            self._line(f"[dim]· accepted job {event.job_id} → {event.service}{queued}[/]")
        elif isinstance(event, events.ToolCall):
            detail = event.result_summary or event.arguments_json
            self._line(f"[cyan]⚙ tool {event.name} {event.phase}[/] [dim]{detail}[/]")
        elif isinstance(event, events.WorkflowStep):
            self._line(
                f"[magenta]▸ step {event.index} {event.name} {event.phase}[/] "
                f"[dim]{event.summary}[/]"
            )
        elif isinstance(event, events.PlanStep):
            self._line(f"[blue]▹ plan {event.index} {event.name} {event.state}[/]")
        elif isinstance(event, events.Progress):
            if event.message:
                self._line(f"[dim]… {event.message} ({event.fraction:.0%})[/]")
        elif isinstance(event, events.Completed):
            if not self.streamed and event.text:
                self._line("")
                out.print(event.text, markup=False, highlight=False)
            if event.embeddings:
                count, size = len(event.embeddings), len(event.embeddings[0])
                self._line(f"[dim]{count} embedding(s) of {size} values[/]")
            usage = event.usage
            self._line(
                f"[green]✓ completed[/] [dim]{usage.total_tokens} tokens "
                f"({usage.prompt_tokens} prompt + {usage.completion_tokens} completion)[/]"
            )
        elif isinstance(event, events.Failed):
            self._line(f"[red]✗ failed: {event.error.code}: {event.error.message}[/]")
        elif isinstance(event, events.TimedOut):
            self._line("[red]✗ timed out[/]")
        elif isinstance(event, events.Cancelled):
            self._line(f"[yellow]✗ cancelled: {event.reason}[/]")
        elif isinstance(event, events.HistoryTruncated):
            self._line(
                f"[yellow]! events {event.requested_after + 1}..{event.oldest_retained - 1} "
                "are no longer retained[/]"
            )


def _event_output(as_json: bool) -> Callable[[events.Event], None]:
    """Where a command's events go: one JSON object per line, or shown for a human."""
    if as_json:
        return lambda event: _print_json(event.to_dict())
    return EventPrinter().show


# The session a message goes to (chat, send): an existing one, or a new one of an agent.
_SessionOption = Annotated[
    str | None, typer.Option(help="an existing session (default: a new one)")
]
_AgentOption = Annotated[str, typer.Option(help="agent of a new session")]


async def _session_for(client: AsyncClient, session_id: str | None, agent: str) -> str:
    if session_id:
        return session_id
    session = await client.sessions.create(agent)
    return session.session_id


@app.command()
def chat(
    ctx: typer.Context,
    session: _SessionOption = None,
    agent: _AgentOption = "support-bot",
) -> None:
    """Interactive chat: type a message, watch the answer arrive. /quit or Ctrl-D ends."""

    async def work(client: AsyncClient) -> int:
        session_id = await _session_for(client, session, agent)
        out.print(f"[dim]session {session_id} · /quit or Ctrl-D to leave[/]", markup=True)
        while True:
            try:
                line = await asyncio.to_thread(input, "you> ")
            except EOFError:
                out.print()
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            printer = EventPrinter()
            try:
                async for event in client.chat.send(session_id, text):
                    printer.show(event)
            except OrchestratorError as exc:  # tell, and keep the conversation going
                _fail(exc, _config(ctx))

    _run(ctx, work)


@app.command()
def send(
    ctx: typer.Context,
    message: Annotated[str, typer.Argument(help="the message")],
    session: _SessionOption = None,
    agent: _AgentOption = "support-bot",
    kind: Annotated[str | None, typer.Option(help="llm_query, rag_query or embedding")] = None,
    background: Annotated[bool, typer.Option(help="run through the work queue")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON event per line, for scripts")
    ] = False,
) -> None:
    """Send one message and print its answer (exit code 1 when the job does not complete)."""

    async def work(client: AsyncClient) -> int:
        session_id = await _session_for(client, session, agent)
        show = _event_output(as_json)
        final: events.Event | None = None
        async for event in client.chat.send(
            session_id,
            message,
            kind=cast(Any, kind),
            background=background,
        ):
            show(event)
            final = event
        return 0 if isinstance(final, events.Completed) else EXIT_JOB_FAILED

    _run(ctx, work)


@app.command()
def follow(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION", help="the session to follow")],
    after: Annotated[int, typer.Option(help="start after this sequence")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON event per line")] = False,
) -> None:
    """Print a session's events as they happen (resumes by itself; Ctrl-C to stop)."""

    async def work(client: AsyncClient) -> int:
        show = _event_output(as_json)
        async for event in client.sessions.follow(session_id, after=after, on_truncated="yield"):
            show(event)
        return 0

    _run(ctx, work)


# -- batches ---------------------------------------------------------------------------------


def _result_line(result: Any) -> dict[str, Any]:
    return _json(result)


@batch_app.command("submit")
def batch_submit(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="JSONL: one item per line", exists=True, dir_okay=False)
    ],
    wait: Annotated[
        bool, typer.Option(help="wait with a progress bar, then write the results")
    ] = False,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="results JSONL file (default: stdout)")
    ] = None,
    priority: Annotated[str | None, typer.Option(help="high, normal or low")] = None,
) -> None:
    """Submit a batch from a JSONL file; with --wait, show its progress and write its results
    as JSONL."""

    async def work(client: AsyncClient) -> int:
        items = read_jsonl(file)
        batch = await client.batches.submit(items, priority=priority)  # type: ignore[arg-type]
        err.print(f"batch {batch.batch_id}: {len(items)} items submitted")
        if not wait:
            _print_json({"batch_id": batch.batch_id})
            return 0
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err,
        ) as bar:
            task = bar.add_task("batch", total=len(items), counts="", rate="")

            def progress(p: BatchProgress) -> None:
                c = p.batch.counts
                bar.update(
                    task,
                    completed=p.done,
                    total=p.total or len(items),
                    counts=(
                        f"ok {c.completed} failed {c.failed} running {c.running} queued {c.queued}"
                    ),
                    rate=f"{p.rate_per_s:.1f}/s",
                )

            final = await client.batches.wait(batch.batch_id, progress=progress)
        sink = output.open("w", encoding="utf-8") if output else sys.stdout
        try:
            async for result in client.batches.results(batch.batch_id):
                sink.write(json.dumps(_result_line(result), ensure_ascii=False) + "\n")
        finally:
            if output:
                sink.close()
        c = final.counts
        state = batch_pb2.BatchState.Name(final.state)
        err.print(
            f"batch {batch.batch_id} {state.removeprefix('BATCH_STATE_').lower()}: "
            f"{c.completed} completed, {c.failed} failed, {c.cancelled} cancelled, "
            f"{c.expired} expired" + (f"; results in {output}" if output else "")
        )
        return 0 if c.failed + c.cancelled + c.expired == 0 else EXIT_JOB_FAILED

    _run(ctx, work)


@batch_app.command("get")
def batch_get(ctx: typer.Context, batch_id: str) -> None:
    """Print a batch (JSON)."""
    _run_printed(ctx, lambda client: client.batches.get(batch_id))


@batch_app.command("results")
def batch_results(
    ctx: typer.Context,
    batch_id: str,
    after: Annotated[int, typer.Option(help="start after this result sequence")] = 0,
) -> None:
    """Print a batch's results as JSONL (waits for results still to come)."""

    async def work(client: AsyncClient) -> int:
        async for result in client.batches.results(batch_id, after=after):
            _print_json(_result_line(result))
        return 0

    _run(ctx, work)


@batch_app.command("cancel")
def batch_cancel(ctx: typer.Context, batch_id: str) -> None:
    """Cancel a batch."""
    _run_printed(ctx, lambda client: client.batches.cancel(batch_id))


# -- sessions --------------------------------------------------------------------------------


@sessions_app.command("create")
def sessions_create(
    ctx: typer.Context,
    agent: Annotated[str, typer.Option(help="the session's agent")] = "support-bot",
    ttl: Annotated[float | None, typer.Option(help="seconds the session lives idle")] = None,
) -> None:
    """Create a session; prints it (JSON)."""
    _run_printed(ctx, lambda client: client.sessions.create(agent, ttl=ttl))


@sessions_app.command("get")
def sessions_get(ctx: typer.Context, session_id: str) -> None:
    """Print a session (JSON)."""
    _run_printed(ctx, lambda client: client.sessions.get(session_id))


@sessions_app.command("list")
def sessions_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="active, busy, closed or expired")] = None,
) -> None:
    """List the tenant's sessions."""

    async def work(client: AsyncClient) -> int:
        table = Table("session", "agent", "state", "messages", "tokens")
        async for s in client.sessions.iterate(state=state):
            table.add_row(
                s.session_id,
                s.agent_id,
                session_pb2.SessionState.Name(s.state).removeprefix("SESSION_STATE_").lower(),
                str(s.message_count),
                str(s.token_usage.total_tokens),
            )
        out.print(table)
        return 0

    _run(ctx, work)


@sessions_app.command("close")
def sessions_close(ctx: typer.Context, session_id: str) -> None:
    """Close a session."""
    _run_printed(ctx, lambda client: client.sessions.close(session_id))


# -- admin -----------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="the key's tenant")],
    role: Annotated[str, typer.Option(help="client, service or admin")] = "client",
    description: Annotated[str, typer.Option(help="what the key is for")] = "",
    service: Annotated[
        list[str] | None,
        typer.Option(help="a service a service key speaks for (repeatable; default: every one)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
) -> None:
    """Create an API key. Its secret is shown once."""

    async def work(client: AsyncClient) -> int:
        created = await client.keys.create(
            tenant,
            cast(Any, role),
            description,
            services=service or (),
        )
        if as_json:
            _print_json(_json(created))
        else:
            out.print(f"key id:  {created.key_id}")
            out.print(f"api key: {created.api_key}")
            err.print("store the api key now: it is not shown again")
        return 0

    _run(ctx, work)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="only this tenant's keys")] = "",
) -> None:
    """List API keys (never their secrets)."""

    async def work(client: AsyncClient) -> int:
        table = Table("key id", "tenant", "role", "revoked", "description")
        token = ""
        while True:
            page = await client.keys.list(tenant, page_token=token)
            for key in page.keys:
                role = admin_pb2.ApiKeyRole.Name(key.role)
                table.add_row(
                    key.key_id,
                    key.tenant_id,
                    role.removeprefix("API_KEY_ROLE_").lower(),
                    "yes" if key.revoked else "",
                    key.description,
                )
            token = page.next_page_token
            if not token:
                break
        out.print(table)
        return 0

    _run(ctx, work)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: str) -> None:
    """Revoke an API key."""

    async def work(client: AsyncClient) -> int:
        key = await client.keys.revoke(key_id)
        out.print(f"revoked {key.key_id} (tenant {key.tenant_id})")
        return 0

    _run(ctx, work)


@tasks_app.command("get")
def tasks_get(
    ctx: typer.Context,
    job_id: str,
    tenant: Annotated[str, typer.Option(help="the job's tenant")],
) -> None:
    """Print a task (a job's record, with its plan), as JSON."""
    _run_printed(ctx, lambda client: client.admin.task(tenant, job_id))


def _token_cells(usage: common_pb2.TokenUsage) -> tuple[str, str, str]:
    return str(usage.prompt_tokens), str(usage.completion_tokens), str(usage.total_tokens)


@app.command()
def usage(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option(help="the tenant")],
    start: Annotated[str, typer.Option(help="first day, YYYY-MM-DD (UTC)")] = "",
    end: Annotated[str, typer.Option(help="last day, YYYY-MM-DD (UTC)")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="print the response as JSON")] = False,
) -> None:
    """A tenant's token usage per day (admin key)."""

    async def work(client: AsyncClient) -> int:
        report = await client.admin.usage(tenant, start_date=start, end_date=end)
        if as_json:
            _print_json(_json(report))
            return 0
        table = Table("day", "prompt", "completion", "total", "tasks", title=f"tenant {tenant}")
        for day in report.days:
            table.add_row(day.date, *_token_cells(day.usage), str(day.completed_tasks))
        table.add_row(
            "total", *_token_cells(report.total), str(report.completed_tasks), style="bold"
        )
        out.print(table)
        if report.daily_token_budget:
            out.print(f"today {report.tokens_today} of {report.daily_token_budget} tokens")
        return 0

    _run(ctx, work)


@app.command()
def health(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(help="a service name; default the whole server")] = "",
) -> None:
    """Check the server's health (exit code 0 when SERVING)."""

    async def work(client: AsyncClient) -> int:
        status = await client.health(service)
        out.print(status)
        return 0 if status == "SERVING" else 6

    _run(ctx, work)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
