#!/usr/bin/env node
// orchestrator-ts: the TypeScript client from a shell, one JSON object per event on stdout.
//   orchestrator-ts follow SESSION_ID [--after N] [--history-truncated throw|yield]
//   orchestrator-ts send SESSION_ID TEXT
//   orchestrator-ts create-session AGENT_ID
// Address and key: --address / --api-key, or ORCH_ADDRESS / ORCH_API_KEY. TLS: --ca-file,
// --cert-file, --key-file. --backoff-ms sets the first reconnect delay.
import { parseArgs } from "node:util";
import { ChatEvent, OrchestratorClient, OrchestratorError } from "./index";

const USAGE =
  "usage: orchestrator-ts follow SESSION_ID [--after N] [--history-truncated throw|yield] | " +
  "send SESSION_ID TEXT | " +
  "create-session AGENT_ID  [--address HOST:PORT] [--api-key KEY] [--ca-file F] " +
  "[--cert-file F] [--key-file F] [--backoff-ms MS]";

function line(event: ChatEvent): string {
  return JSON.stringify({
    sequence: event.sequence,
    job_id: event.jobId,
    kind: event.kind,
    ...(event.kind === "delta" ? { text: (event.delta as { text: string }).text } : {}),
  });
}

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      address: { type: "string" },
      "api-key": { type: "string" },
      after: { type: "string", default: "0" },
      "ca-file": { type: "string" },
      "cert-file": { type: "string" },
      "key-file": { type: "string" },
      "backoff-ms": { type: "string" },
      "history-truncated": { type: "string", default: "throw" },
    },
  });
  const [command, target, text] = positionals;
  if (!command || !target || (command === "send" && text === undefined)) {
    process.stderr.write(`${USAGE}\n`);
    return 2;
  }
  const tls =
    values["ca-file"] || values["cert-file"]
      ? { caFile: values["ca-file"], certFile: values["cert-file"], keyFile: values["key-file"] }
      : undefined;
  const initialMs = values["backoff-ms"] ? Number(values["backoff-ms"]) : undefined;
  const client = new OrchestratorClient({
    address: values.address,
    apiKey: values["api-key"],
    tls,
    backoff: initialMs === undefined ? {} : { initialMs },
  });
  const stop = new AbortController();
  process.once("SIGTERM", () => stop.abort());
  process.once("SIGINT", () => stop.abort());
  try {
    if (command === "create-session") {
      const session = await client.createSession({ agentId: target });
      process.stdout.write(`${JSON.stringify({ session_id: session.sessionId })}\n`);
    } else if (command === "follow") {
      const onHistoryTruncated = values["history-truncated"] === "yield" ? "yield" : "throw";
      const after = Number(values.after);
      const events = client.follow(target, { after, onHistoryTruncated, signal: stop.signal });
      for await (const event of events) process.stdout.write(`${line(event)}\n`);
    } else if (command === "send") {
      const events = client.send(target, text ?? "", { signal: stop.signal });
      for await (const event of events) process.stdout.write(`${line(event)}\n`);
    } else {
      process.stderr.write(`${USAGE}\n`);
      return 2;
    }
    return 0;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const id = error instanceof OrchestratorError && error.requestId;
    process.stderr.write(`error: ${message}${id ? ` (request ${id})` : ""}\n`);
    return 1;
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(`error: ${String(error)}\n`);
    process.exitCode = 1;
  },
);
