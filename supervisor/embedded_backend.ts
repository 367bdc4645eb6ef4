/**
 * Embedded mode: a mount's requests run in isolates on worker threads of the
 * server process. A streamed request body crosses to the isolate through a
 * shared ring with backpressure, and the response window through shared
 * control words (see wasm/channel.ts).
 */

import type { AppBackend, BackendRequest, RequestHandle } from "./backend.ts";
import type { Job } from "./isolate.ts";
import type { Logger } from "./log.ts";
import type { IsolatePool } from "./pool.ts";
import { BODY_RING_BYTES, BodyRing } from "../wasm/channel.ts";


/** Size of the buffer the front reads a streamed request body into. */
const BODY_READ_BYTES = 64 * 1024;

/**
 * Copies the client's body into the ring until it ends, fails or the reader has gone.
 *
 * Deno's request body is a byte stream, so the front reads it into one
 * buffer it reuses. A default reader would allocate a new array for every
 * piece, and during a large upload those wait for the garbage collector as
 * tens of megabytes of external memory.
 */
async function pumpBody(body: ReadableStream<Uint8Array>, ring: BodyRing, logger: Logger) {
  let reader: ReadableStreamBYOBReader | ReadableStreamDefaultReader<Uint8Array>;
  try {
    reader = body.getReader({ mode: "byob" });
  } catch {
    reader = body.getReader();
  }
  let buffer = new ArrayBuffer(BODY_READ_BYTES);
  try {
    for (;;) {
      const { done, value } = reader instanceof ReadableStreamBYOBReader
        ? await reader.read(new Uint8Array(buffer))
        : await reader.read();
      if (done) {
        ring.end();
        return;
      }
      // write() has copied every byte when it returns, so the buffer is free again.
      if (!(await ring.write(value))) {
        await reader.cancel();
        return;
      }
      if (reader instanceof ReadableStreamBYOBReader) buffer = value.buffer as ArrayBuffer;
    }
  } catch (error) {
    logger.info(`client stopped sending the request body: ${error}`);
    ring.abort();
  }
}

export class EmbeddedBackend implements AppBackend {
  readonly name = "embedded";
  readonly pool: IsolatePool;
  #logger: Logger;

  constructor(pool: IsolatePool, logger: Logger) {
    this.pool = pool;
    this.#logger = logger;
  }

  start(): Promise<void> {
    return this.pool.start();
  }

  submit(request: BackendRequest): RequestHandle {
    const stream = request.body instanceof ReadableStream ? request.body : null;
    const bytes = request.body instanceof Uint8Array ? request.body : null;
    const ring = stream ? BodyRing.create(BODY_RING_BYTES) : null;
    const control = this.pool.newControl();
    const job: Job = {
      requestId: request.requestId,
      method: request.method,
      environ: request.environ,
      body: stream ? null : bytes ?? new Uint8Array(0),
      bodyRing: ring,
      control,
      sink: request.sink,
    };
    try {
      this.pool.submit(job);
    } catch (error) {
      control.release();
      throw error;
    }
    if (stream && ring) pumpBody(stream, ring, this.#logger.child({ request: request.requestId }));

    return {
      get running() {
        return job.running === true;
      },
      released: (bytes) => control.released(bytes),
      cancel: () => {
        control.cancel();
        ring?.abort();
        this.pool.abandon(job);
      },
      close: () => {
        ring?.closeReader();
        control.release();
      },
    };
  }

  reload(reason: string): void {
    // NOTE: embedded isolates keep running on a reload; only daemon groups restart.
    this.#logger.info(`embedded isolates are not restarted (${reason})`);
  }

  stop(): Promise<void> {
    this.pool.stop();
    return Promise.resolve();
  }
}
