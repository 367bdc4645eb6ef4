/**
 * The interface between the front and whatever runs a mount's application:
 * an embedded isolate pool in the server process, or a daemon process group.
 *
 * The front reads small bodies ahead and passes larger ones as the client's
 * stream. A backend moves the body to an isolate its own way (a shared ring
 * in this process, frames over a pipe to a daemon), and it reports the
 * response to the request's sink.
 */

import type { ResponseSink } from "./isolate.ts";
import type { StopCause } from "../wasm/channel.ts";

/** One request as the front hands it to a backend. */
export interface BackendRequest {
  requestId: string;
  method: string;
  /** The CGI/WSGI environ's string keys as a JSON object. */
  environ: string;
  /**
   * The whole body when the front read it ahead, the client's stream when it
   * did not, or null when the request has no body.
   */
  body: Uint8Array<ArrayBuffer> | ReadableStream<Uint8Array> | null;
  sink: ResponseSink;
}

/** The front's handle on a submitted request. */
export interface RequestHandle {
  /** Whether an isolate has started running the request's application code. */
  readonly running: boolean;
  /** The client has taken `bytes` more of the response, so the isolate may send more. */
  released(bytes: number): void;
  /**
   * The request is over for `cause` (by default, the client has gone): stop
   * reading its body and stop the application's response.
   */
  cancel(cause?: StopCause): void;
  /** The response has been sent or has failed; frees what the request still holds. */
  close(): void;
}

/** Runs the application of one or more mounts. */
export interface AppBackend {
  /** Name for log lines: "embedded" or the process group's name. */
  readonly name: string;
  /** Starts the backend; resolves when it can serve, rejects when it cannot start at all. */
  start(): Promise<void>;
  /** Queues or runs a request. Throws PoolUnavailableError when it cannot take it. */
  submit(request: BackendRequest): RequestHandle;
  /** Replaces the backend's interpreters with fresh ones without dropping accepted requests. */
  reload(reason: string): void;
  /**
   * Ignores reloads from now on and ends one in progress, because the server
   * is stopping. Requests keep being served until stop().
   */
  stopReloads(): void;
  /** Stops everything at once; requests still queued fail with 503. */
  stop(): Promise<void>;
}

let serverStopping = false;

/** Records that the server has begun to stop; it never serves normally again. */
export function markServerStopping(): void {
  serverStopping = true;
}

/** Returns whether the server has begun to stop (see markServerStopping). */
export function isServerStopping(): boolean {
  return serverStopping;
}

/**
 * Reports whether a failed body read is the body timeout, which the front
 * has logged already (runtime/body_timeout.ts gives its error this name).
 */
export function isBodyTimeout(error: unknown): boolean {
  return error instanceof Error && error.name === "BodyTimeoutError";
}

/**
 * Reports whether a failed body read means that the client sent a malformed
 * body. Deno 2.9.6 fails the read of a bad chunk with "invalid HTTP/1 request".
 */
export function isMalformedBody(error: unknown): boolean {
  return error instanceof Error && /invalid HTTP\/1 request/i.test(error.message);
}

/** Returns why a request body could not be read to its end, for the isolate. */
export function bodyFailureCause(error: unknown): StopCause {
  if (isBodyTimeout(error)) return "body-timeout";
  if (isMalformedBody(error)) return "bad-body";
  return serverStopping ? "server-stop" : "client";
}

/**
 * Returns the log message for a request body that could not be read to its
 * end. Deno 2.9.6 stops reading request bodies as soon as the server begins
 * to stop, so the body of an upload still in progress then fails too,
 * through no fault of the client.
 */
export function bodyReadFailure(error: unknown): string {
  if (isMalformedBody(error)) {
    return `malformed request body (invalid chunked transfer coding): ${error}`;
  }
  if (serverStopping) {
    return `request body cut off because the server is stopping (Deno stops reading bodies then): ${error}`;
  }
  // Deno's text for a closed connection names its own resource table.
  return error instanceof Deno.errors.BadResource
    ? "client closed the connection before the request body ended"
    : `client stopped sending the request body: ${error}`;
}
