// Unit tests of the reconnect rule's pure parts; tests/e2e/test_typescript_client.py runs the
// client against real servers that are killed and restarted.
import { test } from "node:test";
import * as assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";
import { backoffDelay, isRetryable } from "../index";

const backoff = { initialMs: 100, maxMs: 1000, maxAttempts: 5 };

test("the delay doubles per attempt between half and all of its ceiling", () => {
  for (const [attempt, ceiling] of [[0, 100], [1, 200], [2, 400]] as const) {
    assert.equal(backoffDelay(attempt, backoff, () => 0), ceiling / 2);
    assert.equal(backoffDelay(attempt, backoff, () => 1), ceiling);
  }
});

test("the delay never exceeds the cap", () => {
  assert.equal(backoffDelay(30, backoff, () => 1), 1000);
});

test("only UNAVAILABLE reconnects", () => {
  assert.ok(isRetryable(grpc.status.UNAVAILABLE));
  for (const code of [grpc.status.NOT_FOUND, grpc.status.UNAUTHENTICATED, grpc.status.INTERNAL]) {
    assert.ok(!isRetryable(code));
  }
});
