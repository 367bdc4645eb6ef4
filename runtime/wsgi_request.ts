/**
 * Hands one HTTP request to the backend of its mount.
 *
 * Small bodies with a Content-Length are read whole before the request is
 * queued, so a slow client never holds an interpreter while it uploads them.
 * Larger or chunked bodies go to the backend as the client's stream, which
 * it moves to the isolate with backpressure in both directions.
 */

import {
  type AppBackend,
  bodyReadFailure,
  isMalformedBody,
  isServerStopping,
  type RequestHandle,
} from "../supervisor/backend.ts";
import { PoolUnavailableError } from "../supervisor/pool.ts";
import { BodyTimeoutError, withBodyTimeout } from "./body_timeout.ts";
import type { Logger } from "../supervisor/log.ts";
import {
  errorBodyBytes,
  errorResponse,
  ResponseBuilder,
  type ResponseRecord,
} from "./wsgi_response.ts";

const EMPTY_BODY = new Uint8Array(0);

export interface WsgiRequest {
  request: Request;
  requestId: string;
  environ: Record<string, string>;
  backend: AppBackend;
  logger: Logger;
  /** Host folders `wsgi.file_wrapper` may send from. */
  filePaths: string[];
  /** See ServerOptions.bodyTimeoutMs. */
  bodyTimeoutMs: number;
  /** See ServerOptions.sendTimeoutMs. */
  sendTimeoutMs: number;
  /** See ServerOptions.readAheadBytes. */
  readAheadBytes: number;
  onDone(record: ResponseRecord): void;
}

/**
 * Reads a whole small body. Returns undefined when the client went away
 * mid-body, and the error when it stopped sending for the body timeout.
 */
async function readSmallBody(
  request: Request,
  logger: Logger,
  bodyTimeoutMs: number,
): Promise<Uint8Array<ArrayBuffer> | BodyTimeoutError | undefined> {
  const body = bodyTimeoutMs > 0
    ? withBodyTimeout(request.body!, bodyTimeoutMs, () => {})
    : request.body!;
  try {
    return new Uint8Array(await new Response(body).arrayBuffer());
  } catch (error) {
    if (error instanceof BodyTimeoutError) return error;
    logger.info(bodyReadFailure(error));
    return undefined;
  }
}

/**
 * Cancels a request body that will never be read. Deno keeps the
 * connection of an unread body, with its socket buffers, until the request
 * is garbage collected, even after the client has gone.
 */
function discardBody(body: Uint8Array | ReadableStream<Uint8Array> | null): void {
  if (body instanceof ReadableStream) body.cancel().catch(() => {});
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
    discardBody(request.body);
    input.onDone({ status: 501, bytes: errorBodyBytes("Transfer-Encoding not supported") });
    return errorResponse(501, "Transfer-Encoding not supported");
  }

  let body: Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array> = EMPTY_BODY;
  if (request.body !== null) {
    const length = declaredLength(request);
    if (length !== undefined && length <= input.readAheadBytes) {
      const whole = await readSmallBody(request, logger, input.bodyTimeoutMs);
      if (whole instanceof BodyTimeoutError) {
        logger.warning(`request failed with 408: ${whole.message}`);
        input.onDone({
          status: 408,
          bytes: errorBodyBytes("Request Timeout"),
          error: whole.message,
        });
        return errorResponse(408, "Request Timeout");
      }
      if (whole === undefined && isServerStopping()) {
        input.onDone({
          status: 503,
          bytes: errorBodyBytes("Service Unavailable"),
          error: "the server is shutting down",
        });
        return errorResponse(503, "Service Unavailable");
      }
      if (whole === undefined) {
        input.onDone({
          status: 400,
          bytes: errorBodyBytes("Incomplete request body"),
          error: "client disconnected",
        });
        return errorResponse(400, "Incomplete request body");
      }
      body = whole;
    } else if (input.bodyTimeoutMs > 0) {
      // The builder and the handle exist by the time a read can time out.
      body = withBodyTimeout(request.body, input.bodyTimeoutMs, (error) => {
        // A response that has ended (an application that did not read the
        // whole body) leaves nothing to fail.
        if (builder.finished) return;
        // Cancelled first: failing the builder releases the request, which
        // would otherwise cancel it as if the client had left.
        handle?.cancel("body-timeout");
        builder.fail(408, error.message);
      }, (error) => {
        // A malformed body is the client's error: 400 unless the response has started.
        if (!isMalformedBody(error) || builder.finished) return;
        handle?.cancel("bad-body");
        builder.fail(400, bodyReadFailure(error));
      });
    } else {
      body = request.body;
    }
  }

  // The builder exists before the backend returns the handle it reports
  // window credit and cancellation to; nothing reaches it before that.
  let handle: RequestHandle | undefined;
  const builder = new ResponseBuilder({
    method: request.method,
    control: {
      released: (bytes) => handle?.released(bytes),
      cancel: (cause) => handle?.cancel(cause),
    },
    logger,
    filePaths: input.filePaths,
    sendTimeoutMs: input.sendTimeoutMs,
    onDone: (record) => {
      handle?.close();
      input.onDone(record);
    },
  });

  try {
    handle = input.backend.submit({
      requestId: input.requestId,
      method: request.method,
      environ: JSON.stringify(input.environ),
      body,
      sink: builder,
    });
  } catch (error) {
    if (!(error instanceof PoolUnavailableError)) throw error;
    logger.warning(`request rejected with 503: ${error.message}`);
    discardBody(body);
    input.onDone({
      status: 503,
      bytes: errorBodyBytes("Service Unavailable"),
      error: error.message,
    });
    return errorResponse(503, "Service Unavailable", {
      "retry-after": String(error.retryAfterSeconds),
    });
  }

  const submitted = handle;
  request.signal.addEventListener("abort", () => {
    // Also fires after a response completed (Deno's default); cancelling a
    // finished request is harmless.
    submitted.cancel(isServerStopping() ? "server-stop" : "client");
    if (!submitted.running) builder.abandon();
  }, { once: true });

  return await builder.response;
}
