// A small Node client of the Agent Orchestrator Service on @grpc/grpc-js. Its streams resume
// by themselves: on a dropped connection or UNAVAILABLE they reconnect with backoff and
// jitter, continue after the last sequence seen and never yield an event twice.
import * as fs from "node:fs";
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

/** A session event as the client sees it (fields in camelCase, int64 as number). */
export interface ChatEvent {
  sessionId: string;
  jobId: string;
  sequence: number;
  requestId: string;
  /** Which event it is (the oneof case, camelCase): accepted, progress, delta, completed,
   * failed, timedOut, cancelled, historyTruncated, toolCall, workflowStep or planStep. */
  kind: string;
  [field: string]: unknown;
}

export interface Session {
  sessionId: string;
  agentId: string;
  state: string;
  [field: string]: unknown;
}

export const FINAL_KINDS: ReadonlySet<string> = new Set([
  "completed",
  "failed",
  "timedOut",
  "cancelled",
]);

const OPEN_STATES: ReadonlySet<string> = new Set(["SESSION_STATE_ACTIVE", "SESSION_STATE_BUSY"]);

export interface Backoff {
  /** First delay before reconnecting, in milliseconds (default 200). */
  initialMs: number;
  /** Largest delay (default 5000). */
  maxMs: number;
  /** Consecutive failed reconnects before the stream gives up with the last error
   * (default 20); any event received resets the count. */
  maxAttempts: number;
}

export interface TlsOptions {
  /** PEM CA that signed the server certificate (default: the system roots). */
  caFile?: string;
  /** PEM client certificate and key, for mutual TLS. */
  certFile?: string;
  keyFile?: string;
}

export interface ClientOptions {
  /** host:port (default ORCH_ADDRESS, else localhost:50051). */
  address?: string;
  /** An API key ao_<id>_<secret> (default ORCH_API_KEY). */
  apiKey?: string;
  /** TLS; plaintext when unset. */
  tls?: TlsOptions;
  /** Reconnect backoff of streams. */
  backoff?: Partial<Backoff>;
  /** Deadline of unary calls in milliseconds (default 10000). */
  timeoutMs?: number;
  /** Folder holding orchestrator/v1/*.proto (default: this repository's protos/). */
  protoRoot?: string;
}

export interface FollowOptions {
  /** Resume cursor: only events with a greater sequence are yielded (default 0). */
  after?: number;
  /** What to do with historyTruncated: "throw" (default) a HistoryTruncatedError, or
   * "yield" it as an event and go on. */
  onHistoryTruncated?: "throw" | "yield";
  /** Stops the stream; the iterator then ends. */
  signal?: AbortSignal;
}

export interface SendOptions {
  kind?: string;
  model?: string;
  collections?: string[];
  background?: boolean;
  signal?: AbortSignal;
}

/** A call failed: the gRPC status, its message and the request id the server gave it. */
export class OrchestratorError extends Error {
  constructor(
    readonly code: grpc.status,
    readonly details: string,
    readonly requestId: string | undefined,
  ) {
    super(`${grpc.status[code] ?? code}: ${details}`);
    this.name = "OrchestratorError";
  }

  static from(error: unknown, requestId?: string): OrchestratorError {
    if (error instanceof OrchestratorError) return error;
    const e = error as Partial<grpc.ServiceError>;
    const id = requestId ?? headerValue(e.metadata, "x-request-id");
    return new OrchestratorError(e.code ?? grpc.status.UNKNOWN, e.details ?? String(error), id);
  }
}

/** Events after the cursor are no longer retained by the server. */
export class HistoryTruncatedError extends Error {
  constructor(readonly event: ChatEvent) {
    const gap = event.historyTruncated as
      | { requestedAfterSequence?: number; oldestRetainedSequence?: number }
      | undefined;
    super(
      `events after sequence ${String(gap?.requestedAfterSequence)} are no longer retained ` +
        `(the oldest kept is ${String(gap?.oldestRetainedSequence)})`,
    );
    this.name = "HistoryTruncatedError";
  }
}

/** Sent while the connection dropped before the job was accepted: whether it runs is unknown
 * (sending again may start it twice). */
export class AcceptanceUnknownError extends Error {
  constructor(readonly cause: OrchestratorError) {
    super(`the message may or may not have been accepted: ${cause.message}`);
    this.name = "AcceptanceUnknownError";
  }
}

function headerValue(metadata: grpc.Metadata | undefined, name: string): string | undefined {
  const value = metadata?.get(name)[0];
  return value === undefined ? undefined : String(value);
}

/** The status codes after which a stream reconnects. */
export function isRetryable(code: grpc.status): boolean {
  return code === grpc.status.UNAVAILABLE;
}

/** The delay before reconnect ``attempt`` (0-based): exponential, capped, with "equal
 * jitter" (half fixed, half random) so replicas' clients do not reconnect in step. */
export function backoffDelay(
  attempt: number,
  backoff: Backoff,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(backoff.maxMs, backoff.initialMs * 2 ** attempt);
  return ceiling / 2 + (random() * ceiling) / 2;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done);
  });
}

function defaultProtoRoot(): string {
  // dist/index.js -> sdk/typescript -> the repository's protos/
  return path.resolve(__dirname, "..", "..", "..", "protos");
}

type Unary = (
  request: object,
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (error: grpc.ServiceError | null, reply?: Record<string, unknown>) => void,
) => grpc.ClientUnaryCall;
type ServerStreaming = (
  request: object,
  metadata: grpc.Metadata,
  options?: grpc.CallOptions,
) => grpc.ClientReadableStream<{ event: ChatEvent }>;

interface Stub extends grpc.Client {
  [method: string]: unknown;
}

export class OrchestratorClient {
  readonly address: string;
  private readonly metadata: grpc.Metadata;
  private readonly backoff: Backoff;
  private readonly timeoutMs: number;
  private readonly sessions: Stub;
  private readonly chat: Stub;

  constructor(options: ClientOptions = {}) {
    this.address = options.address ?? process.env.ORCH_ADDRESS ?? "localhost:50051";
    const apiKey = options.apiKey ?? process.env.ORCH_API_KEY;
    this.metadata = new grpc.Metadata();
    if (apiKey) this.metadata.set("authorization", `Bearer ${apiKey}`);
    this.backoff = { initialMs: 200, maxMs: 5000, maxAttempts: 20, ...options.backoff };
    this.timeoutMs = options.timeoutMs ?? 10_000;
    const root = options.protoRoot ?? process.env.ORCH_PROTO_ROOT ?? defaultProtoRoot();
    const definition = protoLoader.loadSync(
      ["orchestrator/v1/session.proto", "orchestrator/v1/chat.proto"],
      { includeDirs: [root], longs: Number, enums: String, defaults: true, oneofs: true },
    );
    const loaded = grpc.loadPackageDefinition(definition) as unknown as {
      orchestrator: { v1: Record<string, grpc.ServiceClientConstructor> };
    };
    const credentials = channelCredentials(options.tls);
    const v1 = loaded.orchestrator.v1;
    this.sessions = new v1.SessionService(this.address, credentials) as Stub;
    // One channel for both services: the chat stub shares the session stub's channel.
    this.chat = new v1.ChatService(this.address, credentials, {
      channelOverride: this.sessions.getChannel(),
    }) as Stub;
  }

  close(): void {
    this.sessions.close();
  }

  private unary(stub: Stub, method: string, request: object): Promise<Record<string, unknown>> {
    const call = (stub[method] as Unary).bind(stub);
    return new Promise((resolve, reject) => {
      call(
        request,
        this.metadata,
        { deadline: Date.now() + this.timeoutMs },
        (error, reply) => (error ? reject(OrchestratorError.from(error)) : resolve(reply ?? {})),
      );
    });
  }

  async createSession(request: { agentId: string; userId?: string }): Promise<Session> {
    const reply = await this.unary(this.sessions, "CreateSession", request);
    return reply.session as Session;
  }

  async getSession(sessionId: string): Promise<Session> {
    const reply = await this.unary(this.sessions, "GetSession", { sessionId });
    return reply.session as Session;
  }

  async closeSession(sessionId: string): Promise<Session> {
    const reply = await this.unary(this.sessions, "CloseSession", { sessionId });
    return reply.session as Session;
  }

  async cancelJob(sessionId: string, jobId: string): Promise<ChatEvent> {
    const reply = await this.unary(this.chat, "CancelJob", { sessionId, jobId });
    return flatten(reply.event as ChatEvent);
  }

  /** Every event of the session after ``options.after``, live, until the session closes.
   * Reconnects on UNAVAILABLE (a dropped connection, a restarting server) and after a stream
   * that ended while the session is still open (a server shutting down), resuming after the
   * last sequence yielded. */
  async *follow(sessionId: string, options: FollowOptions = {}): AsyncGenerator<ChatEvent> {
    let after = options.after ?? 0;
    let failures = 0;
    const signal = options.signal;
    while (!signal?.aborted) {
      const call = (this.chat.StreamSession as ServerStreaming).call(
        this.chat,
        { sessionId, afterSequence: after },
        this.metadata,
      );
      const abort = (): void => call.cancel();
      signal?.addEventListener("abort", abort);
      let failure: OrchestratorError | undefined;
      try {
        for await (const message of call) {
          const event = flatten(message.event);
          if (event.sequence <= after) continue; // never yield an event twice
          failures = 0;
          if (event.kind === "historyTruncated" && options.onHistoryTruncated !== "yield") {
            throw new HistoryTruncatedError(event);
          }
          after = event.sequence;
          yield event;
        }
      } catch (error) {
        if (error instanceof HistoryTruncatedError) throw error;
        if (signal?.aborted) return;
        failure = OrchestratorError.from(error);
        if (!isRetryable(failure.code)) throw failure;
      } finally {
        signal?.removeEventListener("abort", abort);
        call.cancel(); // a no-op when the call has ended; ends it when the caller broke off
      }
      if (failure === undefined) {
        // The server ended the stream: the session closed, or the server is stopping.
        const open = await this.stillOpen(sessionId, signal);
        if (!open) return;
      }
      if (failures >= this.backoff.maxAttempts) {
        throw failure ?? new OrchestratorError(grpc.status.UNAVAILABLE, "gave up", undefined);
      }
      await sleep(backoffDelay(failures, this.backoff), signal);
      failures += 1;
    }
  }

  /** Whether the session is still open, asking again (with backoff) while the server is
   * unavailable. */
  private async stillOpen(sessionId: string, signal?: AbortSignal): Promise<boolean> {
    for (let attempt = 0; ; attempt += 1) {
      try {
        return OPEN_STATES.has((await this.getSession(sessionId)).state);
      } catch (error) {
        const failure = OrchestratorError.from(error);
        if (!isRetryable(failure.code) || attempt >= this.backoff.maxAttempts) throw failure;
      }
      if (signal?.aborted) return false;
      await sleep(backoffDelay(attempt, this.backoff), signal);
    }
  }

  /** Sends a message and yields the events of its job, from accepted to the final event.
   * When the connection drops after the job was accepted, it goes on from the session's
   * stream after the last sequence seen (the job runs whatever happens to this call). A drop
   * before the job was accepted raises AcceptanceUnknownError: sending again might start the
   * work twice. */
  async *send(
    sessionId: string,
    content: string,
    options: SendOptions = {},
  ): AsyncGenerator<ChatEvent> {
    const request = {
      sessionId,
      content,
      kind: options.kind,
      model: options.model ?? "",
      collections: options.collections ?? [],
      background: options.background ?? false,
    };
    const call = (this.chat.SendMessage as ServerStreaming).call(
      this.chat,
      request,
      this.metadata,
    );
    const abort = (): void => call.cancel();
    options.signal?.addEventListener("abort", abort);
    let jobId: string | undefined;
    let after = 0;
    try {
      for await (const message of call) {
        const event = flatten(message.event);
        jobId = event.jobId;
        after = Math.max(after, event.sequence);
        yield event;
        if (FINAL_KINDS.has(event.kind)) return;
      }
    } catch (error) {
      if (options.signal?.aborted) return;
      const failure = OrchestratorError.from(error);
      if (!isRetryable(failure.code)) throw failure;
      if (jobId === undefined) throw new AcceptanceUnknownError(failure);
    } finally {
      options.signal?.removeEventListener("abort", abort);
      call.cancel();
    }
    if (jobId === undefined) {
      throw new AcceptanceUnknownError(
        new OrchestratorError(grpc.status.UNAVAILABLE, "the stream ended with no event", undefined),
      );
    }
    // The call ended before the final event: follow the session from where it stopped.
    for await (const event of this.follow(sessionId, {
      after,
      onHistoryTruncated: "throw",
      signal: options.signal,
    })) {
      if (event.jobId !== jobId) continue;
      yield event;
      if (FINAL_KINDS.has(event.kind)) return;
    }
  }

  /** The text of a job's deltas, or its result, once it completed. */
  static async collectText(events: AsyncIterable<ChatEvent>): Promise<string> {
    let text = "";
    for await (const event of events) {
      if (event.kind === "delta") text += String((event.delta as { text: string }).text);
      if (event.kind === "failed") {
        const error = (event.failed as { error?: { message?: string } }).error;
        throw new Error(`the job failed: ${error?.message ?? "unknown error"}`);
      }
      if (event.kind === "timedOut" || event.kind === "cancelled") {
        throw new Error(`the job ended ${event.kind}`);
      }
    }
    return text;
  }
}

/** proto-loader puts the oneof's case in ``kind``; keep int64 sequences as numbers. */
function flatten(event: ChatEvent): ChatEvent {
  return { ...event, sequence: Number(event.sequence) };
}

function channelCredentials(tls: TlsOptions | undefined): grpc.ChannelCredentials {
  if (tls === undefined) return grpc.credentials.createInsecure();
  const read = (file: string | undefined): Buffer | null =>
    file ? fs.readFileSync(file) : null;
  return grpc.credentials.createSsl(read(tls.caFile), read(tls.keyFile), read(tls.certFile));
}
