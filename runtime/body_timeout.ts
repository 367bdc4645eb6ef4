/**
 * The body timeout. A request body that goes without new bytes for too long,
 * while the server waits for them, ends the request with 408. So a client
 * that stalls in the middle of an upload cannot hold an isolate until the
 * request timeout. Apache's mod_reqtimeout does the same for request bodies.
 */

/** The client sent no body bytes for the body timeout. */
export class BodyTimeoutError extends Error {
  constructor(timeoutMs: number) {
    super(
      `the client sent no request body data for ${timeoutMs / 1000} s (--body-timeout)`,
    );
    this.name = "BodyTimeoutError";
  }
}

/** Size of each piece the wrapped stream reads for a reader that brings no buffer. */
const PIECE_BYTES = 64 * 1024;

/** How often a stream checks whether its current read waits too long. */
const CHECK_MS = 250;

/**
 * Returns a byte stream of `body` that fails with BodyTimeoutError, and
 * calls `onTimeout`, when one read waits longer than `timeoutMs` for the
 * client (checked every CHECK_MS, so up to that much later). The clock runs
 * only while a reader waits for bytes, not while the application is busy
 * with the ones it has. Readers that bring their own buffer (BYOB) read
 * straight into it. A read costs no timer of its own: a chunked upload in
 * small pieces is read thousands of times a second, and the front must keep
 * up with it (see the chunked upload limit in README.md). A read of `body`
 * that fails calls `onReadError` before the stream fails with that error.
 */
export function withBodyTimeout(
  body: ReadableStream<Uint8Array>,
  timeoutMs: number,
  onTimeout: (error: BodyTimeoutError) => void,
  onReadError?: (error: unknown) => void,
): ReadableStream<Uint8Array> {
  // Deno gives some bodies (a small one it has already read) as a stream that
  // is not a byte stream, which has no BYOB reader.
  let source: ReadableStreamBYOBReader | ReadableStreamDefaultReader<Uint8Array>;
  try {
    source = body.getReader({ mode: "byob" });
  } catch {
    source = body.getReader();
  }

  /** performance.now() when the pending read began, or undefined between reads. */
  let waitingSince: number | undefined;
  let timedOut: BodyTimeoutError | undefined;
  let checker: ReturnType<typeof setInterval> | undefined;
  const stopChecking = () => clearInterval(checker);
  const check = () => {
    if (waitingSince === undefined || performance.now() - waitingSince < timeoutMs) return;
    stopChecking();
    timedOut = new BodyTimeoutError(timeoutMs);
    // The pending read then ends as done, and pull() reports the timeout.
    source.cancel(timedOut).catch(() => {
      // The client's stream has failed already; the timeout error is kept.
    });
  };

  return new ReadableStream({
    type: "bytes",
    autoAllocateChunkSize: PIECE_BYTES,
    async pull(controller) {
      checker ??= setInterval(check, Math.min(CHECK_MS, timeoutMs));
      const request = controller.byobRequest!;
      const view = request.view!;
      for (;;) {
        waitingSince = performance.now();
        let result: ReadableStreamReadResult<Uint8Array>;
        try {
          result = source instanceof ReadableStreamBYOBReader
            ? await source.read(new Uint8Array(view.buffer, view.byteOffset, view.byteLength))
            : await source.read();
        } catch (error) {
          stopChecking();
          onReadError?.(error);
          throw error;
        } finally {
          waitingSince = undefined;
        }

        if (timedOut) {
          controller.error(timedOut);
          onTimeout(timedOut);
          return;
        }
        if (result.done) stopChecking();
        if (source instanceof ReadableStreamBYOBReader) {
          if (result.done) {
            controller.close();
            // A pending BYOB request must be completed even at the end, with an empty view.
            if (result.value) request.respondWithNewView(result.value);
          } else {
            request.respondWithNewView(result.value);
          }
          return;
        }
        if (result.done) {
          controller.close();
          request.respond(0);
          return;
        }
        // An empty piece cannot be enqueued: read the next one.
        if (result.value.length === 0) continue;
        // A copy: enqueue() takes the buffer over, and the source may own it.
        controller.enqueue(result.value.slice());
        return;
      }
    },
    cancel(reason) {
      stopChecking();
      return source.cancel(reason);
    },
  });
}
