/**
 * Hands one HTTP request to an application's isolate pool.
 *
 * Small bodies with a Content-Length are read whole before the request is
 * queued, so a slow client never holds an interpreter while it uploads them.
 * Larger or chunked bodies stream into a shared ring that `wsgi.input` reads
 * from, with backpressure in both directions.
 */

import { type IsolatePool, PoolUnavailableError } from "../supervisor/pool.ts";
import type { Job } from "../supervisor/isolate.ts";
import type { Logger } from "../supervisor/log.ts";
import { BodyRing, RequestControl } from "../wasm/channel.ts";
import { errorResponse, ResponseBuilder, type ResponseRecord } from "./wsgi_response.ts";

/** Bodies up to this size are read before the request is queued. */
export const READ_AHEAD_BYTES = 64 * 1024;
/** Capacity of the ring a larger body streams through (a power of two). */
const BODY_RING_BYTES = 256 * 1024;

const EMPTY_BODY = new Uint8Array(0);

export interface WsgiRequest {
  request: Request;
  requestId: string;
  environ: Record<string, string>;
  pool: IsolatePool;
  logger: Logger;
  /** Host folders `wsgi.file_wrapper` may send from. */
  filePaths: string[];
  onDone(record: ResponseRecord): void;
}

/** Reads a whole small body; undefined when the client went away mid-body. */
async function readSmallBody(request: Request, logger: Logger): Promise<Uint8Array<ArrayBuffer> | undefined> {
  try {
    return new Uint8Array(await request.arrayBuffer());
  } catch (error) {
    logger.info(`client stopped sending the request body: ${error}`);
    return undefined;
  }
}

/** Copies the client's body into the ring until it ends, fails or nobody reads. */
async function pumpBody(body: ReadableStream<Uint8Array>, ring: BodyRing, logger: Logger) {
  const reader = body.getReader();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) {
        ring.end();
        return;
      }
      if (!(await ring.write(value))) {
        await reader.cancel();
        return;
      }
    }
  } catch (error) {
    logger.info(`client stopped sending the request body: ${error}`);
    ring.abort();
  }
}

/** Returns the declared body size, or undefined when there is none or it is chunked. */
function declaredLength(request: Request): number | undefined {
  const value = request.headers.get("content-length");
  if (value === null || request.headers.has("transfer-encoding")) return undefined;
  const length = Number(value);
  return Number.isSafeInteger(length) ? length : undefined;
}

export async function handleWsgiRequest(input: WsgiRequest): Promise<Response> {
  const { request, logger } = input;

  // Deno passes "gzip, chunked" through still gzip-coded; WSGI has no way to
  // tell the application, so only plain chunked is accepted (RFC 9112 6.1).
  const transferEncoding = request.headers.get("transfer-encoding");
  if (transferEncoding !== null && transferEncoding.toLowerCase() !== "chunked") {
    logger.warning(
      `rejected Transfer-Encoding '${transferEncoding}': only 'chunked' is supported; send the body uncoded`,
    );
    input.onDone({ status: 501, bytes: 0 });
    return errorResponse(501, "Transfer-Encoding not supported");
  }

  let body: Uint8Array<ArrayBuffer> | null = EMPTY_BODY;
  let ring: BodyRing | null = null;
  if (request.body !== null) {
    const length = declaredLength(request);
    if (length !== undefined && length <= READ_AHEAD_BYTES) {
      const whole = await readSmallBody(request, logger);
      if (whole === undefined) {
        input.onDone({ status: 400, bytes: 0, error: "client disconnected" });
        return errorResponse(400, "Incomplete request body");
      }
      body = whole;
    } else {
      body = null;
      ring = BodyRing.create(BODY_RING_BYTES);
    }
  }

  const control = new RequestControl();
  const builder = new ResponseBuilder({
    method: request.method,
    control,
    logger,
    filePaths: input.filePaths,
    onDone: (record) => {
      ring?.closeReader();
      input.onDone(record);
    },
  });
  const job: Job = {
    requestId: input.requestId,
    method: request.method,
    environ: JSON.stringify(input.environ),
    body,
    bodyRing: ring,
    control,
    sink: builder,
  };

  try {
    input.pool.submit(job);
  } catch (error) {
    if (!(error instanceof PoolUnavailableError)) throw error;
    logger.warning(`request rejected with 503: ${error.message}`);
    input.onDone({ status: 503, bytes: 0, error: error.message });
    return errorResponse(503, "Service Unavailable", {
      "retry-after": String(error.retryAfterSeconds),
    });
  }

  if (ring && request.body) pumpBody(request.body, ring, logger);

  request.signal.addEventListener("abort", () => {
    // Also fires after a response completed (Deno's default); cancelling a
    // finished request is harmless.
    job.abandoned = true;
    control.cancel();
    ring?.abort();
    if (!job.running) builder.abandon();
  }, { once: true });

  return await builder.response;
}
