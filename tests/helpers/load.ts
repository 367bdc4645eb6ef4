/**
 * Load for tests: loops of requests that run until a promise resolves, and waits on the
 * server log.
 */

import type { TestServer } from "./server.ts";

export function countMatches(text: string, pattern: RegExp): number {
  return text.match(new RegExp(pattern.source, "g"))?.length ?? 0;
}

/** Waits until `pattern` appears `count` times in the server log after `from`. */
export async function waitForCount(
  server: TestServer,
  pattern: RegExp,
  count: number,
  from = 0,
  timeoutMs = 60_000,
) {
  const deadline = Date.now() + timeoutMs;
  while (countMatches(server.log().slice(from), pattern) < count) {
    if (Date.now() > deadline) {
      throw new Error(
        `fewer than ${count} log lines matching ${pattern} within ${timeoutMs} ms:\n${
          server.log().slice(from)
        }`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

export interface LoadResult {
  ok: number;
  failures: { status: number; body: string }[];
  /** Request ids of the successful responses, in completion order. */
  servedBy: string[];
}

/** Sends requests from `concurrency` loops until `stop` resolves. */
export async function runLoad(
  url: string,
  concurrency: number,
  stop: Promise<void>,
): Promise<LoadResult> {
  let stopped = false;
  stop.then(() => (stopped = true));
  const result: LoadResult = { ok: 0, failures: [], servedBy: [] };
  const loop = async () => {
    while (!stopped) {
      const response = await fetch(url);
      const body = await response.text();
      if (response.status === 200) {
        result.ok += 1;
        result.servedBy.push(body.trim());
      } else {
        result.failures.push({ status: response.status, body });
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, loop));
  return result;
}

/** Sends requests from `concurrency` loops for `durationMs` milliseconds. */
export async function runLoadFor(
  url: string,
  concurrency: number,
  durationMs: number,
): Promise<LoadResult> {
  const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
  const load = runLoad(url, concurrency, stop);
  await delay(durationMs);
  stopLoad();
  return await load;
}

export function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
