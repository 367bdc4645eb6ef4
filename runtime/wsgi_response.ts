/**
 * Turns what an isolate sends for one request into a Deno `Response`.
 *
 * The isolate sends the status and headers only after the application's
 * first non-empty body chunk (or its end), so an application that fails
 * early still gets a clean 500. Body chunks then stream through a
 * ReadableStream whose pulls hand window credit back to the isolate, which
 * is how a slow client slows the application down instead of filling memory.
 */

import type { ResponseSink } from "../supervisor/isolate.ts";
import type { Logger } from "../supervisor/log.ts";
import type { RequestHandle } from "../supervisor/backend.ts";
import { openFileInside } from "../supervisor/app_spec.ts";
import { SendTimer } from "./send_timeout.ts";
import {
  CLIENT_DISCONNECTED,
  type EndMessage,
  type FileMessage,
  shortFileError,
  startBodyBytes,
  type StartMessage,
} from "../wasm/protocol.ts";

const EMPTY_BODY = new Uint8Array(0);

const FILE_PIECE = 64 * 1024;
/** Maximum bytes of waiting body chunks that are joined into one write. */
const JOIN_LIMIT = 64 * 1024;

type BodyItem =
  | { kind: "chunk"; chunk: Uint8Array<ArrayBuffer> }
  | { kind: "file"; message: FileMessage }
  | { kind: "end"; error?: string };

/** Summary of a finished response, for the access log. */
export interface ResponseRecord {
  status: number;
  bytes: number;
  /** The reason the response was cut short, if it was. */
  error?: string;
}

export interface ResponseBuilderOptions {
  method: string;
  /** The backend's handle on the request, which receives window credit and cancellation. */
  control: Pick<RequestHandle, "released" | "cancel">;
  logger: Logger;
  /** Host folders the application may hand to `wsgi.file_wrapper`. */
  filePaths: string[];
  /**
   * Milliseconds a streamed body may wait for the client to take more bytes
   * before the response stops; 0 for no limit. See ServerOptions.sendTimeoutMs.
   */
  sendTimeoutMs?: number;
  /** Called once when the response has been fully sent or has failed. */
  onDone(record: ResponseRecord): void;
}

/** Returns a plain-text error response. */
const encoder = new TextEncoder();

/** Bytes of the body that errorResponse(status, text) sends, for the access log. */
export function errorBodyBytes(text: string): number {
  return encoder.encode(text + "\n").length;
}

export function errorResponse(status: number, text: string, headers: HeadersInit = {}): Response {
  return new Response(text + "\n", {
    status,
    headers: { "content-type": "text/plain; charset=utf-8", ...headers },
  });
}

// Control characters make Deno reject a header or, for most of them, panic
// and exit ("invalid response header value"); tab is allowed.
// deno-lint-ignore no-control-regex
const INVALID_HEADER_VALUE = /[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]/;
const HEADER_NAME = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

/** Builds the response headers, or returns why they are invalid. */
function buildHeaders(message: StartMessage): Headers | string {
  if (!Number.isInteger(message.status) || message.status < 200 || message.status > 599) {
    return `status ${message.status} is outside 200-599`;
  }
  const headers = new Headers();
  for (let i = 0; i < message.headers.length; i += 2) {
    const name = message.headers[i];
    const value = message.headers[i + 1];
    if (typeof name !== "string" || !HEADER_NAME.test(name)) {
      return `invalid header name ${JSON.stringify(name)}`;
    }
    if (typeof value !== "string" || INVALID_HEADER_VALUE.test(value)) {
      return `invalid value for header ${name}: ${JSON.stringify(value)}`;
    }
    headers.append(name, value);
  }
  return headers;
}

/**
 * Statuses whose responses never carry a body: the Fetch standard's "null
 * body status" list without the 1xx codes, which an application cannot send.
 * Deno's Response constructor throws for one of them with a non-null body.
 */
const NULL_BODY_STATUSES = new Set([204, 205, 304]);

/** Whether the response to `method` with `status` has no body. */
function bodyless(method: string, status: number): boolean {
  return method === "HEAD" || NULL_BODY_STATUSES.has(status);
}

export class ResponseBuilder implements ResponseSink {
  /** Resolves with the Response as soon as the status and headers are known. */
  readonly response: Promise<Response>;
  #resolve: (response: Response) => void;
  #options: ResponseBuilderOptions;
  #items: BodyItem[] = [];
  #wake: (() => void) | null = null;
  #status = 0;
  #bytes = 0;
  /** The response's Content-Length, or Infinity when it has none. */
  #declaredLength = Infinity;
  #started = false;
  /** Whether the response went out with an empty body while the application still ran. */
  #emptyBody = false;
  #done = false;
  #stream: ReadableStreamDefaultController<Uint8Array> | null = null;
  /** The file being sent, and the bytes of it that the Content-Length still requires. */
  #file: { handle: Deno.FsFile; remaining: number; path: string } | null = null;
  /** The send timeout of a streamed body; a response sent whole needs none. */
  #sendTimer: SendTimer | null = null;

  constructor(options: ResponseBuilderOptions) {
    this.#options = options;
    const { promise, resolve } = Promise.withResolvers<Response>();
    this.response = promise;
    this.#resolve = resolve;
  }

  /** Whether the response has ended, sent or failed. */
  get finished(): boolean {
    return this.#done;
  }

  start(message: StartMessage): void {
    const headers = buildHeaders(message);
    if (typeof headers === "string") {
      // The isolate's adapter validates first; this guards the process
      // against an adapter that did not (a Deno panic would end every
      // connection). The isolate still sends its "end", which is ignored.
      this.fail(500, `invalid response from the application: ${headers}`);
      this.#options.control.cancel();
      return;
    }
    this.#started = true;
    this.#status = message.status;
    const declared = headers.get("content-length");
    if (declared !== null) this.#declaredLength = Number(declared);

    if (bodyless(this.#options.method, message.status)) {
      // Deno adds "content-length: 0" to a HEAD response with a null body,
      // which states that the GET body is empty. With an empty stream
      // Deno sends no length, and a length the application set stays as is.
      const emptyStream = this.#options.method === "HEAD" && !headers.has("content-length") &&
        !NULL_BODY_STATUSES.has(message.status);
      const body = emptyStream
        ? new ReadableStream({ start: (controller) => controller.close() })
        : null;
      this.#resolve(new Response(body, { status: message.status, headers }));
      if (message.complete) this.#finish();
      return;
    }
    if (this.#declaredLength === 0 && !message.complete) {
      // Deno reads nothing from a body of length 0 and cancels its stream,
      // which would read as a client that left. The end() that follows
      // finishes the request.
      this.#emptyBody = true;
      this.#resolve(new Response(EMPTY_BODY, { status: message.status, headers }));
      return;
    }
    if (message.complete) {
      // Deno gives a string body a Content-Type of its own, so it becomes bytes here.
      const body = message.body === undefined ? EMPTY_BODY : startBodyBytes(message.body);
      this.#bytes = body.length;
      this.#resolve(new Response(body, { status: message.status, headers }));
      this.#finish();
      return;
    }
    if (message.body?.length) this.#push({ kind: "chunk", chunk: startBodyBytes(message.body) });
    this.#resolve(new Response(this.#makeStream(), { status: message.status, headers }));
  }

  body(chunk: Uint8Array<ArrayBuffer>): void {
    this.#push({ kind: "chunk", chunk });
  }

  file(message: FileMessage): void {
    this.#push({ kind: "file", message });
  }

  end(message: EndMessage): void {
    if (!this.#started && message.error === CLIENT_DISCONNECTED) {
      // The isolate saw the client leave before the application started its response.
      this.#endUnsent("client closed the connection before the response started");
      return;
    }
    if (!this.#started) {
      // The request ended before any status (the interpreter failed).
      this.fail(502, message.error ?? "the request ended without a response");
      return;
    }
    if (this.#emptyBody || bodyless(this.#options.method, this.#status)) {
      this.#finish(message.error);
      return;
    }
    this.#push({ kind: "end", error: message.error });
  }

  fail(status: number, reason: string): void {
    if (!this.#started) {
      this.#started = true;
      this.#status = status;
      // A 4xx status is the client's doing, not a fault of the server.
      const level = status < 500 ? "warning" : "error";
      this.#options.logger.log(level, `request failed with ${status}: ${reason}`);
      const headers: HeadersInit = status === 503 ? { "retry-after": "5" } : {};
      this.#resolve(errorResponse(status, httpReason(status), headers));
      this.#bytes = errorBodyBytes(httpReason(status));
      this.#finish(reason);
      return;
    }
    this.#push({ kind: "end", error: reason });
  }

  /** Ends a request whose client left before an isolate took it. */
  abandon(): void {
    if (this.#started) return;
    this.#endUnsent("client closed the connection while the request was queued");
  }

  /** Ends a request whose client left before its response started (nginx logs this as 499). */
  #endUnsent(message: string): void {
    this.#started = true;
    this.#status = 499;
    this.#options.logger.info(message);
    this.#resolve(errorResponse(503, "Service Unavailable"));
    // The client left, so the body was never sent.
    this.#finish(CLIENT_DISCONNECTED);
  }

  #push(item: BodyItem): void {
    this.#items.push(item);
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  #next(): Promise<BodyItem> {
    const item = this.#items.shift();
    if (item) return Promise.resolve(item);
    return new Promise((resolve) => {
      this.#wake = () => resolve(this.#items.shift()!);
    });
  }

  #makeStream(): ReadableStream<Uint8Array> {
    this.#sendTimer = new SendTimer(
      this.#options.sendTimeoutMs ?? 0,
      (reason) => this.#stopStalledResponse(reason),
    );
    return new ReadableStream<Uint8Array>({
      start: (controller) => {
        this.#stream = controller;
      },
      pull: (controller) => this.#pull(controller),
      cancel: (reason) => this.#cancel(reason),
    }, { highWaterMark: 0 });
  }

  /**
   * Produces the next piece of the body. Every call must enqueue, close or
   * error before it returns: a pull that returns with nothing leaves the
   * reader waiting forever.
   */
  async #pull(controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> {
    this.#sendTimer?.pullStarted();
    await this.#producePiece(controller);
    if (!this.#done) this.#sendTimer?.pieceQueued();
  }

  /** Enqueues the next piece of the body, or closes or errors the stream. */
  async #producePiece(controller: ReadableStreamDefaultController<Uint8Array>): Promise<void> {
    for (;;) {
      if (this.#file) {
        const piece = await this.#readFilePiece();
        if (piece) {
          controller.enqueue(piece);
          if (this.#bytes >= this.#declaredLength) {
            this.#file?.handle.close();
            this.#file = null;
            controller.close();
            this.#finish();
          }
          return;
        }
        continue;
      }
      const item = await this.#next();
      switch (item.kind) {
        case "chunk": {
          const chunk = this.#joinWaitingChunks(item.chunk);
          controller.enqueue(chunk);
          this.#bytes += chunk.length;
          this.#options.control.released(chunk.length);
          if (this.#bytes >= this.#declaredLength) {
            // Deno stops at the Content-Length and never pulls again, and the
            // adapter sends nothing past it, so the response is complete.
            controller.close();
            this.#finish();
          }
          return;
        }
        case "file":
          await this.#openFile(item.message);
          continue;
        case "end":
          // Deno cancelled the stream while this read waited, and #cancel logged it.
          if (this.#done) return;
          if (item.error === CLIENT_DISCONNECTED) {
            // The isolate saw the client leave before Deno did: no fault of the server.
            this.#options.logger.info("client closed the connection during the response");
          } else if (item.error) {
            this.#options.logger.error(
              `response aborted after its headers were sent: ${item.error}`,
            );
          }
          if (item.error) {
            // Erroring the stream makes Deno close the connection without the
            // final chunk, so the client can tell the body is incomplete.
            controller.error(new Error(item.error));
          } else {
            controller.close();
          }
          this.#finish(item.error);
          return;
      }
    }
  }

  /**
   * Returns `first` joined with the small chunks that wait behind it, up to
   * JOIN_LIMIT bytes in all. An application that yields many small chunks
   * then costs Deno one write for each group of them instead of one each.
   * Only chunks that have arrived already are joined, so none waits longer.
   */
  #joinWaitingChunks(first: Uint8Array<ArrayBuffer>): Uint8Array<ArrayBuffer> {
    let count = 0;
    let size = first.length;
    for (const item of this.#items) {
      if (item.kind !== "chunk" || size + item.chunk.length > JOIN_LIMIT) break;
      size += item.chunk.length;
      count += 1;
    }
    if (count === 0) return first;
    const joined = new Uint8Array(size);
    joined.set(first);
    let offset = first.length;
    for (const item of this.#items.splice(0, count)) {
      const chunk = (item as { chunk: Uint8Array }).chunk;
      joined.set(chunk, offset);
      offset += chunk.length;
    }
    return joined;
  }

  async #openFile(message: FileMessage): Promise<void> {
    try {
      const handle = await openFileInside(message.path, this.#options.filePaths);
      if (typeof handle === "string") {
        this.#items.unshift({ kind: "end", error: handle });
        return;
      }
      await handle.seek(message.offset, Deno.SeekMode.Start);
      const remaining = message.length < 0 ? Infinity : message.length;
      this.#file = { handle, remaining, path: message.path };
    } catch (error) {
      this.#items.unshift({ kind: "end", error: `cannot send file '${message.path}': ${error}` });
    }
  }

  /** Reads the next piece of the file being sent; undefined (and closed) at its end. */
  async #readFilePiece(): Promise<Uint8Array | undefined> {
    const file = this.#file!;
    const size = Math.min(FILE_PIECE, file.remaining);
    const piece = new Uint8Array(size);
    const count = size > 0 ? await file.handle.read(piece) : null;
    if (count === null || count === 0) {
      file.handle.close();
      this.#file = null;
      if (file.remaining > 0 && file.remaining !== Infinity) {
        // The body falls short of its Content-Length, so it must end in error.
        this.#items.unshift({ kind: "end", error: shortFileError(file.path, file.remaining) });
      }
      return undefined;
    }
    file.remaining -= count;
    this.#bytes += count;
    return count === size ? piece : piece.subarray(0, count);
  }

  /**
   * Stops a response whose client takes no bytes, so that its isolate serves
   * again. Deno keeps the connection open until the client closes it or takes
   * the bytes already written to the socket, because a handler cannot close it.
   */
  #stopStalledResponse(reason: string): void {
    if (this.#done) return;
    this.#options.logger.warning(
      `response stopped after ${this.#bytes} bytes: ${reason}; its isolate serves again`,
    );
    this.#options.control.cancel("send-timeout");
    this.#file?.handle.close();
    this.#file = null;
    this.#stream?.error(new Error(reason));
    this.#finish(reason);
  }

  #cancel(reason: unknown): void {
    if (this.#done) return;
    this.#options.control.cancel();
    this.#file?.handle.close();
    this.#file = null;
    this.#options.logger.info(`client closed the connection during the response (${reason})`);
    this.#finish(CLIENT_DISCONNECTED);
  }

  /** Stops a streaming response that has not finished (the server is shutting down). */
  abort(reason: string): void {
    if (this.#done || !this.#stream) return;
    this.#stream.error(new Error(reason));
    this.#finish(reason);
  }

  #finish(error?: string): void {
    if (this.#done) return;
    this.#done = true;
    this.#sendTimer?.stop();
    this.#options.onDone({ status: this.#status, bytes: this.#bytes, error });
  }
}

const REASONS: Record<number, string> = {
  400: "Bad Request",
  408: "Request Timeout",
  500: "Internal Server Error",
  501: "Not Implemented",
  502: "Bad Gateway",
  503: "Service Unavailable",
  504: "Gateway Timeout",
};

export function httpReason(status: number): string {
  return REASONS[status] ?? `HTTP ${status}`;
}
