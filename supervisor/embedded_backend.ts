/**
 * Embedded mode: a mount's requests run in isolates on worker threads of the
 * server process. A streamed request body crosses to the isolate through a
 * shared ring with backpressure, and the response window through shared
 * control words (see wasm/channel.ts).
 *
 * A reload (the script file changed, or SIGHUP) starts a fresh pool, sends
 * new requests to it once its first isolate is ready, and lets the old pool
 * finish the requests it holds.
 */

import type { AppBackend, BackendRequest, RequestHandle } from "./backend.ts";
import type { Job } from "./isolate.ts";
import type { Logger } from "./log.ts";
import type { IsolatePool } from "./pool.ts";
import { BODY_RING_BYTES, BodyRing } from "../wasm/channel.ts";
import { ScriptWatcher } from "./script_watch.ts";


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

/** How often the script file's modification time is checked. */
const SCRIPT_CHECK_MS = 1000;
/** Time the replaced pool gets to finish its requests after a reload. */
const DRAIN_TIMEOUT_MS = 15_000;

export class EmbeddedBackend implements AppBackend {
  readonly name = "embedded";
  #pool: IsolatePool;
  #createPool: (firstIsolateId: number) => IsolatePool;
  #logger: Logger;
  #script: ScriptWatcher;
  #scriptTimer: ReturnType<typeof setInterval> | undefined;
  #reloading = false;
  /** The reason of a reload requested while another one runs; it follows that one. */
  #nextReload: string | null = null;
  /** Replaced pools that still finish their requests. */
  #draining = new Set<IsolatePool>();
  #stopped = false;

  /** `createPool` makes each pool: the first, and a fresh one on every reload. */
  constructor(createPool: (firstIsolateId: number) => IsolatePool, logger: Logger) {
    this.#createPool = createPool;
    this.#pool = createPool(1);
    this.#logger = logger;
    this.#script = new ScriptWatcher(this.#pool.app.scriptPath, () => this.reload("the script file changed"));
  }

  /** The pool that takes new requests. */
  get pool(): IsolatePool {
    return this.#pool;
  }

  async start(): Promise<void> {
    await this.#script.start();
    this.#scriptTimer = setInterval(() => this.#script.check(), SCRIPT_CHECK_MS);
    return this.#pool.start();
  }

  submit(request: BackendRequest): RequestHandle {
    // A reload may replace the pool while this request runs; it stays with this one.
    const pool = this.#pool;
    const stream = request.body instanceof ReadableStream ? request.body : null;
    const bytes = request.body instanceof Uint8Array ? request.body : null;
    const ring = stream ? BodyRing.create(BODY_RING_BYTES) : null;
    const control = pool.newControl();
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
      pool.submit(job);
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
        pool.abandon(job);
      },
      close: () => {
        ring?.closeReader();
        control.release();
      },
    };
  }

  reload(reason: string): void {
    if (this.#stopped) return;
    if (this.#reloading) {
      this.#nextReload = reason;
      return;
    }
    this.#reloading = true;
    this.#replacePool(reason).finally(() => {
      this.#reloading = false;
      const next = this.#nextReload;
      this.#nextReload = null;
      if (next) this.reload(next);
    });
  }

  async #replacePool(reason: string): Promise<void> {
    const old = this.#pool;
    this.#logger.info(`reloading: starting fresh isolates (${reason})`);
    const fresh = this.#createPool(old.lastIsolateId + 1);
    try {
      await fresh.start();
    } catch (error) {
      fresh.stop();
      this.#logger.error(`reload failed, the running isolates keep serving: ${error instanceof Error ? error.message : error}`);
      return;
    }
    if (this.#stopped) {
      fresh.stop();
      return;
    }
    this.#pool = fresh;
    this.#logger.info("reloaded: fresh isolates take new requests, the replaced ones finish theirs");
    this.#draining.add(old);
    await old.drain(DRAIN_TIMEOUT_MS);
    this.#draining.delete(old);
    this.#logger.info(`replaced isolates stopped (those numbered up to ${old.lastIsolateId})`);
  }

  stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#scriptTimer);
    this.#pool.stop();
    for (const pool of this.#draining) pool.stop();
    return Promise.resolve();
  }
}
