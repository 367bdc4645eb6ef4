/**
 * A fixed-size pool of isolates for one application, with a bounded FIFO
 * queue in front of it.
 *
 * Each isolate runs one request at a time. When all are busy, requests wait
 * in the queue; a full queue, or a request that waited longer than the queue
 * timeout, is answered 503 by the front. An isolate that dies is replaced
 * with growing delays, and a pool whose isolates keep failing to start
 * reports itself failed instead of retrying forever.
 */

import type { AppSpec } from "./app_spec.ts";
import { Isolate, type Job } from "./isolate.ts";
import type { Logger } from "./log.ts";

export interface PoolOptions {
  /** Isolates kept running. */
  size: number;
  /** Jobs that may wait for an isolate. @default 100 */
  queueLimit?: number;
  /** Milliseconds a job may wait in the queue before it fails with 503. @default 45000 */
  queueTimeoutMs?: number;
  /** Milliseconds an isolate may take to load Pyodide. @default 120000 */
  startupTimeoutMs?: number;
  /** Response bytes an isolate may have in flight before it waits for the client. @default 262144 */
  responseWindow?: number;
  /** Failed starts in a row after which the pool gives up. @default 3 */
  maxFailedStarts?: number;
  logger: Logger;
}

/** Thrown by `submit` when the queue is full or the pool cannot serve. */
export class PoolUnavailableError extends Error {
  readonly retryAfterSeconds: number;
  constructor(message: string, retryAfterSeconds: number) {
    super(message);
    this.name = "PoolUnavailableError";
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

interface QueuedJob {
  job: Job;
  queuedAt: number;
}

const RESTART_DELAYS_MS = [100, 1000, 5000, 15000, 30000];

export class IsolatePool {
  readonly app: AppSpec;
  #options: Required<PoolOptions>;
  #logger: Logger;
  #isolates = new Set<Isolate>();
  #queue: QueuedJob[] = [];
  #nextIsolateId = 1;
  #failedStarts = 0;
  #restarts = 0;
  #stopping = false;
  #failedReason: string | null = null;
  #queueTimer: ReturnType<typeof setInterval> | undefined;
  #startupTimers = new Map<Isolate, ReturnType<typeof setTimeout>>();
  #firstReady = Promise.withResolvers<void>();

  constructor(app: AppSpec, options: PoolOptions) {
    this.app = app;
    this.#options = {
      queueLimit: 100,
      queueTimeoutMs: 45_000,
      startupTimeoutMs: 120_000,
      responseWindow: 256 * 1024,
      maxFailedStarts: 3,
      ...options,
    };
    this.#logger = options.logger;
    // start() hands this promise out; a pool nobody awaits must not crash the process.
    this.#firstReady.promise.catch(() => {});
  }

  /** Starts every isolate; resolves when the first one is ready. */
  start(): Promise<void> {
    for (let i = 0; i < this.#options.size; i++) this.#spawn();
    this.#queueTimer = setInterval(() => this.#expireQueued(), 1000);
    return this.#firstReady.promise;
  }

  get queued(): number {
    return this.#queue.length;
  }

  get failed(): string | null {
    return this.#failedReason;
  }

  /** Runs `job` on an idle isolate or queues it. Throws PoolUnavailableError. */
  submit(job: Job): void {
    if (this.#failedReason) {
      throw new PoolUnavailableError(`application unavailable: ${this.#failedReason}`, 30);
    }
    if (this.#stopping) throw new PoolUnavailableError("the server is shutting down", 5);
    const idle = this.#findIdle();
    if (idle && this.#queue.length === 0) {
      idle.run(job);
      return;
    }
    if (this.#queue.length >= this.#options.queueLimit) {
      throw new PoolUnavailableError(
        `request queue is full (${this.#options.queueLimit} waiting); raise --queue-limit or --threads`,
        1,
      );
    }
    this.#queue.push({ job, queuedAt: performance.now() });
  }

  /** Stops every isolate; queued jobs fail with 503. */
  stop(): void {
    this.#stopping = true;
    clearInterval(this.#queueTimer);
    for (const timer of this.#startupTimers.values()) clearTimeout(timer);
    for (const { job } of this.#queue.splice(0)) job.sink.fail(503, "the server is shutting down");
    for (const isolate of this.#isolates) isolate.terminate("the server is shutting down");
    this.#isolates.clear();
  }

  #findIdle(): Isolate | undefined {
    for (const isolate of this.#isolates) if (isolate.state === "idle") return isolate;
    return undefined;
  }

  #spawn(): void {
    const isolate = new Isolate({
      id: this.#nextIsolateId++,
      app: this.app,
      logger: this.#logger,
      responseWindow: this.#options.responseWindow,
      multiprocess: this.#options.size > 1,
      onReady: (ready) => this.#onReady(ready),
      onIdle: (idle) => this.#dispatchNext(idle),
      onDead: (dead, reason) => this.#onDead(dead, reason),
    });
    this.#isolates.add(isolate);
    this.#logger.debug("starting isolate", { isolate: isolate.id });
    const timer = setTimeout(() => {
      this.#logger.error(
        `isolate did not start within ${this.#options.startupTimeoutMs} ms; replacing it`,
        { isolate: isolate.id },
      );
      isolate.terminate("startup timed out");
      this.#onDead(isolate, "startup timed out");
    }, this.#options.startupTimeoutMs);
    this.#startupTimers.set(isolate, timer);
  }

  #onReady(isolate: Isolate): void {
    clearTimeout(this.#startupTimers.get(isolate));
    this.#startupTimers.delete(isolate);
    this.#failedStarts = 0;
    this.#firstReady.resolve();
    this.#dispatchNext(isolate);
  }

  #dispatchNext(isolate: Isolate): void {
    while (this.#queue.length > 0 && isolate.state === "idle") {
      const { job } = this.#queue.shift()!;
      if (job.abandoned) continue;
      isolate.run(job);
    }
  }

  #onDead(isolate: Isolate, reason: string): void {
    clearTimeout(this.#startupTimers.get(isolate));
    this.#startupTimers.delete(isolate);
    if (!this.#isolates.delete(isolate) || this.#stopping) return;

    const neverStarted = isolate.readyAt === undefined;
    if (neverStarted) this.#failedStarts += 1;
    this.#logger.error(`isolate stopped: ${reason}`, { isolate: isolate.id });

    if (this.#failedStarts >= this.#options.maxFailedStarts) {
      this.#markFailed(`${this.#failedStarts} isolates in a row failed to start; last error: ${reason}`);
      return;
    }
    const delay = RESTART_DELAYS_MS[Math.min(this.#restarts, RESTART_DELAYS_MS.length - 1)];
    this.#restarts += 1;
    this.#logger.info(`restarting the isolate in ${delay} ms`, { isolate: isolate.id });
    setTimeout(() => {
      if (!this.#stopping && !this.#failedReason) this.#spawn();
    }, delay);
  }

  #markFailed(reason: string): void {
    this.#failedReason = reason;
    this.#logger.critical(`application marked failed: ${reason}`);
    this.#firstReady.reject(new Error(reason));
    for (const { job } of this.#queue.splice(0)) job.sink.fail(503, `application unavailable: ${reason}`);
  }

  #expireQueued(): void {
    const now = performance.now();
    while (this.#queue.length > 0) {
      const head = this.#queue[0];
      if (head.job.abandoned) {
        this.#queue.shift();
        continue;
      }
      if (now - head.queuedAt < this.#options.queueTimeoutMs) break;
      this.#queue.shift();
      head.job.sink.fail(
        503,
        `request waited ${Math.round(now - head.queuedAt)} ms in the queue (queue timeout ${this.#options.queueTimeoutMs} ms)`,
      );
    }
  }
}
