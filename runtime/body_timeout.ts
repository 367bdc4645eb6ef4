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

/**
 * Returns a byte stream of `body` that fails with BodyTimeoutError, and
 * calls `onTimeout`, when one read waits longer than `timeoutMs` for the
 * client. The clock runs only while a reader waits for bytes, not while the
 * application is busy with the ones it has. Readers that bring their own
 * buffer (BYOB) read straight into it.
 */
export function withBodyTimeout(
  body: ReadableStream<Uint8Array>,
  timeoutMs: number,
  onTimeout: (error: BodyTimeoutError) => void,
): ReadableStream<Uint8Array> {
  // Deno gives some bodies (a small one it already holds) as a stream that is
  // not a byte stream, which has no BYOB reader.
  let source: ReadableStreamBYOBReader | ReadableStreamDefaultReader<Uint8Array>;
  try {
    source = body.getReader({ mode: "byob" });
  } catch {
    source = body.getReader();
  }

  /** Waits for `read`, or resolves "timed out" after timeoutMs. */
  async function withinTimeout<T>(read: Promise<T>): Promise<T | "timed out"> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<"timed out">((resolve) => {
      timer = setTimeout(() => resolve("timed out"), timeoutMs);
    });
    try {
      return await Promise.race([read, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  return new ReadableStream({
    type: "bytes",
    autoAllocateChunkSize: PIECE_BYTES,
    async pull(controller) {
      const request = controller.byobRequest!;
      const view = request.view!;
      for (;;) {
        const result = await withinTimeout(
          source instanceof ReadableStreamBYOBReader
            ? source.read(new Uint8Array(view.buffer, view.byteOffset, view.byteLength))
            : source.read(),
        );

        if (result === "timed out") {
          const error = new BodyTimeoutError(timeoutMs);
          source.cancel(error).catch(() => {
            // The client's stream has failed already; the timeout error below is kept.
          });
          controller.error(error);
          onTimeout(error);
          return;
        }
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
      return source.cancel(reason);
    },
  });
}
