/**
 * Embedded mode: a mount's requests run in isolates on worker threads of the
 * server process. A streamed request body crosses to the isolate through a
 * shared ring with backpressure, and the response window through shared
 * control words (see wasm/channel.ts).
 *
 * A reload (the script file changed, or SIGHUP) starts a fresh pool. Once
 * its first isolate is ready (and, with preload, has imported the
 * application), new requests go to it, and so do the old pool's requests
 * that have not started, while the old pool finishes the running ones.
 */

import {
  type AppBackend,
  type BackendRequest,
  bodyFailureCause,
  bodyReadFailure,
  isBodyTimeout,
  type RequestHandle,
} from "./backend.ts";
import type { Job, ResponseSink } from "./isolate.ts";
import { type Logger, tracebackSummary } from "./log.ts";
import type { IsolatePool } from "./pool.ts";
import { BODY_RING_BYTES, BodyRing } from "../wasm/channel.ts";
import { changeReason, reloadFile, ScriptWatcher } from "./script_watch.ts";

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
async function pumpBody(
  body: ReadableStream<Uint8Array>,
  ring: BodyRing,
  sink: ResponseSink,
  logger: Logger,
) {
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
    // Once the response is over (a request timeout, or an application that
    // did not read the whole body), Deno closes the body: no client's doing.
    if (sink.finished) logger.debug(`request body read stopped after the response: ${error}`);
    else if (!isBodyTimeout(error)) logger.info(bodyReadFailure(error));
    ring.abort(bodyFailureCause(error));
  }
}

/** How often the script file's modification time is checked. */
const SCRIPT_CHECK_MS = 1000;
/** Time the replaced pool gets to finish its requests after a reload. */
const DRAIN_TIMEOUT_MS = 15_000;
/** Time a preloaded application gets to import in a fresh pool before the reload counts as failed. */
const PRELOAD_TIMEOUT_MS = 120_000;

/** Settings that EmbeddedBackend gives the factory of each of its pools. */
export interface PoolSettings {
  /** Numbers isolates across the pools of one backend, so log lines stay unambiguous. */
  nextIsolateId: () => number;
  /** Called when an isolate has imported the application at start (preload). */
  onApplicationLoaded?: (error: string | undefined) => void;
  /** "error" for a pool that a reload starts while the running one keeps serving. */
  failureLogLevel?: "critical" | "error";
}

export class EmbeddedBackend implements AppBackend {
  readonly name = "embedded";
  #pool: IsolatePool;
  #createPool: (settings: PoolSettings) => IsolatePool;
  #isolatesStarted = 0;
  #nextIsolateId = () => ++this.#isolatesStarted;
  /** The pool of each request that a reload moved; the others stay with the pool that took them. */
  #poolOf = new WeakMap<Job, IsolatePool>();
  #logger: Logger;
  #script: ScriptWatcher;
  #scriptTimer: ReturnType<typeof setInterval> | undefined;
  #reloading = false;
  /** The reason of a reload requested while another one runs; it follows that one. */
  #nextReload: string | null = null;
  /** Replaced pools that still finish their requests. */
  #draining = new Set<IsolatePool>();
  #stopped = false;
  /** Set once the server is stopping: no reload starts or completes after that. */
  #reloadsStopped = false;

  /** `createPool` makes each pool: the first, and a fresh one on every reload. */
  constructor(createPool: (settings: PoolSettings) => IsolatePool, logger: Logger) {
    this.#createPool = createPool;
    this.#pool = createPool({ nextIsolateId: this.#nextIsolateId });
    this.#logger = logger;
    this.#script = new ScriptWatcher(
      reloadFile(this.#pool.app),
      () => this.reload(changeReason(this.#pool.app)),
    );
  }

  /** The pool that takes new requests. */
  get pool(): IsolatePool {
    return this.#pool;
  }

  async start(): Promise<void> {
    // The pool creates its first worker now, before the server reports that
    // it listens: a Deno run without --unstable-worker-options exits there.
    const started = this.#pool.start();
    started.catch(() => {});
    await this.#script.start();
    this.#scriptTimer = setInterval(() => this.#script.check(), SCRIPT_CHECK_MS);
    return started;
  }

  submit(request: BackendRequest): RequestHandle {
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
    if (stream && ring) {
      pumpBody(stream, ring, request.sink, this.#logger.child({ request: request.requestId }));
    }

    return {
      get running() {
        return job.running === true;
      },
      released: (bytes) => control.released(bytes),
      cancel: (cause) => {
        control.cancel(cause);
        ring?.abort(cause);
        (this.#poolOf.get(job) ?? pool).abandon(job);
      },
      close: () => {
        ring?.closeReader();
        control.release();
      },
    };
  }

  reload(reason: string): void {
    if (this.#stopped) return;
    if (this.#reloadsStopped) {
      this.#logger.info(`reload ignored (${reason}): the server is stopping`);
      return;
    }
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

  /** Starts a fresh pool and, once it can serve, makes it the current one. Resolves then. */
  async #replacePool(reason: string): Promise<void> {
    this.#logger.info(`reloading: starting fresh isolates (${reason})`);
    const loaded = Promise.withResolvers<string | undefined>();
    const fresh = this.#createPool({
      nextIsolateId: this.#nextIsolateId,
      onApplicationLoaded: (error) => loaded.resolve(error),
      failureLogLevel: "error",
    });
    try {
      await fresh.start();
      // With preload, an application that no longer imports must not replace one that runs.
      const importError = fresh.app.preload
        ? await withTimeout(loaded.promise, PRELOAD_TIMEOUT_MS)
        : undefined;
      if (importError !== undefined) {
        // The isolate has logged the traceback, so this line names only the exception.
        const summary = tracebackSummary(importError);
        throw new Error(
          `the application failed to import (${
            summary ? `${summary}; traceback above` : importError
          })`,
        );
      }
    } catch (error) {
      fresh.stop("the reload failed");
      this.#logger.error(
        `reload failed, the running isolates keep serving: ${
          error instanceof Error ? error.message : error
        }`,
      );
      return;
    }
    if (this.#stopped || this.#reloadsStopped) {
      fresh.stop();
      this.#logger.info(
        "reload abandoned: the server is stopping, so the fresh isolates were stopped",
      );
      return;
    }
    const old = this.#pool;
    this.#pool = fresh;
    this.#logger.info(
      "reloaded: fresh isolates take new requests, the replaced ones finish theirs",
    );
    void this.#drain(old);
  }

  /** Moves the old pool's requests that have not started to the current pool, then stops it. */
  async #drain(old: IsolatePool): Promise<void> {
    this.#draining.add(old);
    const stopped = await old.drain(DRAIN_TIMEOUT_MS, (jobs) => {
      const pool = this.#pool;
      for (const job of jobs) this.#poolOf.set(job, pool);
      pool.adopt(jobs);
    });
    this.#draining.delete(old);
    this.#logger.info(
      stopped.length === 0
        ? "no replaced isolate was left to stop"
        : `replaced isolate${stopped.length === 1 ? "" : "s"} ${stopped.join(", ")} stopped`,
    );
  }

  stopReloads(): void {
    this.#reloadsStopped = true;
    this.#nextReload = null;
    clearInterval(this.#scriptTimer);
  }

  stop(): Promise<void> {
    this.#stopped = true;
    clearInterval(this.#scriptTimer);
    this.#pool.stop();
    for (const pool of this.#draining) pool.stop();
    return Promise.resolve();
  }
}

/** Resolves as `promise` does, or to a timeout message after `ms`. */
async function withTimeout(
  promise: Promise<string | undefined>,
  ms: number,
): Promise<string | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<string>((
    resolve,
  ) => (timer = setTimeout(resolve, ms, `no import within ${ms / 1000} s`)));
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
