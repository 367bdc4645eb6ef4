/**
 * A pool of isolates for one application, with a bounded FIFO queue in front
 * of it.
 *
 * Each isolate runs one request at a time. The pool starts `minSize`
 * isolates and grows up to `size` while requests wait: at once up to
 * `eagerSize`, and beyond it only while a running request blocks or runs
 * long. It retires isolates above `minSize` that stayed idle for
 * `idleTimeoutMs`.
 * An isolate that has served `maxRequests` requests, or whose wasm memory
 * grew past `memoryLimitBytes`, is replaced: a fresh one starts, and once it
 * is ready the old one finishes its requests and stops.
 * When all are busy, requests wait in the queue; a full queue, or a request
 * that waited longer than the queue timeout, gets 503 from the front. An
 * isolate that dies is replaced with growing delays, and a pool whose
 * isolates keep failing to start reports itself failed instead of retrying
 * forever.
 */

import type { AppSpec } from "./app_spec.ts";
import { Isolate, type Job, pyodideFolder, startIsolateWorker } from "./isolate.ts";
import { type Boot, prepareBoot } from "./snapshots.ts";
import { type Logger, plural, tracebackSummary } from "./log.ts";
import { ControlTable, type RequestControl } from "../wasm/channel.ts";

export interface PoolOptions {
  /** Maximum isolates. */
  size: number;
  /** Isolates started at once and kept running. @default size */
  minSize?: number;
  /**
   * Isolates up to which the pool grows as soon as a request waits, keeping
   * one spare isolate ready. Beyond it the pool grows only while a running
   * request blocks (see waitBlocked) or runs long (see #grow). At least 2, so that a pool whose isolate runs a long request
   * has another one for short requests. @default the number of CPU cores, at least 2
   */
  eagerSize?: number;
  /** Milliseconds an isolate above `minSize` may stay idle before it is retired; 0 keeps it. @default 0 */
  idleTimeoutMs?: number;
  /** Requests an isolate serves before a fresh one replaces it; 0 turns it off. @default 0 */
  maxRequests?: number;
  /**
   * Bytes of wasm memory above which an isolate is replaced after its
   * request; 0 turns it off. Checked after each request. @default 0
   */
  memoryLimitBytes?: number;
  /** The setting that sets memoryLimitBytes, as log lines name it. @default "--memory-limit" */
  memoryLimitSetting?: string;
  /**
   * Bytes past which an isolate's wasm memory may not grow: the allocation
   * fails, and Python raises MemoryError in the request. 0 leaves the 4 GiB
   * of wasm32. @default 0
   */
  memoryMaxBytes?: number;
  /** Milliseconds a request may run before its isolate is replaced and it fails with 504; 0 turns it off. @default 0 */
  requestTimeoutMs?: number;
  /** Value of `wsgi.multiprocess`. @default size > 1 */
  multiprocess?: boolean;
  /** Called when an isolate has imported the application at start (`preload`), with the error if it failed. */
  onApplicationLoaded?: (error: string | undefined) => void;
  /** Jobs that may wait for an isolate. @default 100 */
  queueLimit?: number;
  /** Milliseconds a job may wait in the queue before it fails with 503; 0 turns it off. @default 45000 */
  queueTimeoutMs?: number;
  /** Milliseconds an isolate may take to load Pyodide. @default 120000 */
  startupTimeoutMs?: number;
  /** Response bytes an isolate may have in flight before it waits for the client. @default 262144 */
  responseWindow?: number;
  /** Failed starts in a row after which the pool gives up. @default 3 */
  maxFailedStarts?: number;
  /** Returns the number of the next isolate, for the log; pools that replace each other share one counter. @default a counter of this pool */
  nextIsolateId?: () => number;
  /**
   * Level of the log line when the pool gives up: "critical" for the pool
   * that serves, "error" for a pool that a reload starts while another
   * one keeps serving. @default "critical"
   */
  failureLogLevel?: "critical" | "error";
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

const RESTART_DELAYS_MS = [100, 1000, 5000, 15000, 30000];
/**
 * A request that has run this long lets a pool at `eagerSize` grow, even
 * when it only computes: the isolates then share the cores, so that short
 * requests do not wait for long ones. Hello world requests ran over 100 ms
 * now and then on 2 cores loaded by the test client.
 */
const LONG_REQUEST_MS = 250;
/** Wasm memory above which an isolate without a memory limit gets a log line (see #noteLargeMemory). */
const LARGE_MEMORY_BYTES = 512 * 1024 * 1024;
/** Milliseconds between two checks of whether a waiting request calls for another isolate. */
const GROW_CHECK_MS = 20;

type ResolvedPoolOptions =
  & Required<Omit<PoolOptions, "onApplicationLoaded">>
  & Pick<PoolOptions, "onApplicationLoaded">;

/** Part of the start error of an isolate whose snapshot is larger than its memory cap (see pyodide_loader.ts). */
const MEMORY_MAX_TOO_LOW = "more than the memory-max";

/** Orders jobs by the time they arrived, oldest first. Array.sort keeps equal ones in place. */
function byArrival(a: Job, b: Job): number {
  return (a.queuedAt ?? 0) - (b.queuedAt ?? 0);
}

export class IsolatePool {
  readonly app: AppSpec;
  #options: ResolvedPoolOptions;
  #logger: Logger;
  #isolates = new Set<Isolate>();
  /** Jobs that wait for an isolate, in the order they will run. */
  #queue: Job[] = [];
  #failedStarts = 0;
  #restarts = 0;
  /** performance.now() before which no isolate starts, after one failed to start. */
  #spawnsBlockedUntil = 0;
  #spawnRetryTimer: ReturnType<typeof setTimeout> | undefined;
  /** When #spawnRetryTimer fires. */
  #spawnRetryAt = 0;
  /** Isolates that imported the application at start (`preload`) without an error. */
  #imported = new WeakSet<Isolate>();
  /** Whether an isolate of this pool ever imported the application at start. */
  #everImported = false;
  #stopping = false;
  /** Set by drain(): where requests that have not started go instead of this pool's queue. */
  #handOff: ((jobs: Job[]) => void) | null = null;
  #failedReason: string | null = null;
  #queueTimer: ReturnType<typeof setInterval> | undefined;
  /** Idle isolates that #retryDispatch will offer requests to again. */
  #dispatchRetries = new Set<Isolate>();
  /** Calls #grow again while requests wait and the pool may grow. */
  #growTimer: ReturnType<typeof setTimeout> | undefined;
  #startupTimers = new Map<Isolate, ReturnType<typeof setTimeout>>();
  /** Whether the isolates up to `minSize` were started, after the first one was ready. */
  #startedMinimum = false;
  /** performance.now() when each busy isolate took its job. */
  #jobStartedAt = new Map<Isolate, number>();
  /** Isolates whose large memory has been logged. */
  #largeMemoryNoted = new WeakSet<Isolate>();
  /** performance.now() when each idle isolate finished its last job. */
  #idleSince = new Map<Isolate, number>();
  #firstReady = Promise.withResolvers<void>();
  /** The snapshot and compiled module new isolates start from; set once prepared. */
  #boot: Boot | null = null;
  #controls = new ControlTable();
  /** Isolates past maxRequests or memoryLimitBytes that serve on until a fresh isolate replaces them, oldest first. */
  #worn: Isolate[] = [];
  /** The isolate starting to replace the first of #worn; one replacement starts at a time. */
  #replacement: Isolate | null = null;
  /** Cleared when a fresh isolate already has more memory than memoryLimitBytes, which makes the limit useless. */
  #memoryLimitUsable = true;
  /** Isolates in a row that passed memoryLimitBytes in their first request. */
  #overLimitAtFirstRequest = 0;

  constructor(app: AppSpec, options: PoolOptions) {
    this.app = app;
    this.#options = {
      queueLimit: 100,
      queueTimeoutMs: 45_000,
      startupTimeoutMs: 120_000,
      responseWindow: 256 * 1024,
      maxFailedStarts: 3,
      minSize: options.size,
      eagerSize: Math.max(2, navigator.hardwareConcurrency),
      idleTimeoutMs: 0,
      requestTimeoutMs: 0,
      maxRequests: 0,
      memoryLimitBytes: 0,
      memoryLimitSetting: "--memory-limit",
      memoryMaxBytes: 0,
      multiprocess: options.size > 1,
      nextIsolateId: () => 0,
      failureLogLevel: "critical",
      ...options,
    };
    this.#logger = options.logger;
    let count = 0;
    this.#options.nextIsolateId = options.nextIsolateId ?? (() => ++count);
    // start() hands this promise out; a pool that no caller awaits must not crash the process.
    this.#firstReady.promise.catch(() => {});
  }

  /**
   * Prepares the snapshot isolates start from, then starts one isolate, and
   * the rest of `minSize` once it is ready. Resolves when the first one is ready.
   * Restores that run together share the cores, so the first response
   * comes sooner when the first isolate restores alone. The first worker
   * starts at once and loads Pyodide's scripts while the snapshot is prepared.
   */
  start(): Promise<void> {
    let firstWorker: Worker | undefined;
    try {
      firstWorker = startIsolateWorker(this.app);
    } catch {
      // #spawn() tries again without it and reports the error as a failed start.
    }
    this.#queueTimer = setInterval(() => this.#maintain(), 1000);
    this.#prepareBoot().then(() => {
      if (this.#stopping) {
        firstWorker?.terminate();
        return;
      }
      this.#spawn(firstWorker);
      this.#grow();
    });
    return this.#firstReady.promise;
  }

  async #prepareBoot(app = this.app): Promise<void> {
    try {
      this.#boot = await prepareBoot({
        app,
        pyodideFolder: pyodideFolder(this.app.python),
        logger: this.#logger,
      });
    } catch (error) {
      this.#logger.error(`cannot prepare snapshots, isolates start from scratch: ${error}`);
      this.#boot = { snapshot: null, wasmModule: null, kind: "none" };
    }
    this.#logger.info(
      `isolates start from ${
        this.#boot.kind === "none" ? "scratch" : `the ${this.#boot.kind} snapshot`
      }`,
    );
  }

  /** Isolates running or starting. */
  get size(): number {
    return this.#isolates.size;
  }

  get queued(): number {
    return this.#queue.length;
  }

  get failed(): string | null {
    return this.#failedReason;
  }

  /**
   * Control words for a new job. Release them (RequestControl.release) when
   * the front is done with the job, so that their slot serves another one.
   */
  newControl(): RequestControl {
    return this.#controls.allocate();
  }

  /** Runs `job` on an idle isolate or queues it. Throws PoolUnavailableError. */
  submit(job: Job): void {
    if (this.#failedReason) {
      throw new PoolUnavailableError(`application unavailable: ${this.#failedReason}`, 30);
    }
    if (this.#stopping) throw new PoolUnavailableError("the server is shutting down", 5);
    // A daemon process sets the time its request reached the front.
    job.queuedAt ??= performance.now();
    // A request posted behind another one in an isolate waits too, so it
    // counts against the queue limit.
    const waiting = this.#queue.length + this.#waitingInIsolates();
    const idle = this.#findIdle();
    // A newer request is not posted past one held behind a slow request: it
    // waits in the queue, and the isolate that frees up first takes the held
    // one before the queue (see #dispatchNext).
    const overtakes = idle?.state === "busy" && this.#heldBehindSlow();
    if (
      idle && !overtakes && this.#queue.length === 0 && idle.canTakeJob(job) &&
      (idle.state === "idle" || waiting < this.#options.queueLimit)
    ) {
      this.#run(idle, job);
      return;
    }
    if (waiting >= this.#options.queueLimit) {
      throw new PoolUnavailableError(
        `request queue is full (${this.#options.queueLimit} waiting); raise --queue-limit or --threads`,
        1,
      );
    }
    this.#queue.push(job);
    for (const isolate of this.#isolates) this.#retryDispatch(isolate);
    this.#grow();
  }

  /**
   * Marks `job` as one whose client left, and ends it at once if it waits in
   * an isolate behind a running request, so that the application never runs
   * it. The front ends a job that is still queued itself.
   */
  abandon(job: Job): void {
    job.abandoned = true;
    // Out of the queue at once, so that it no longer counts against the queue limit.
    const queued = this.#queue.indexOf(job);
    if (queued >= 0) {
      this.#queue.splice(queued, 1);
      return;
    }
    for (const isolate of this.#isolates) {
      if (isolate.withdraw(job)) {
        job.sink.abandon();
        return;
      }
    }
  }

  /**
   * Hands the requests that have not started to `handOff`, lets the running
   * ones finish, then stops every isolate and returns their numbers. After
   * `timeoutMs` the requests still running fail as in stop(). The pool takes
   * no new requests meanwhile: its owner sends them elsewhere, and so does
   * `handOff` with the ones a dying isolate gives back.
   */
  async drain(timeoutMs: number, handOff: (jobs: Job[]) => void): Promise<number[]> {
    this.#handOff = handOff;
    const waiting = this.withdrawWaiting(Number.MAX_SAFE_INTEGER);
    if (waiting.length > 0) handOff(waiting);

    const deadline = performance.now() + timeoutMs;
    // NOTE: a running request whose client left still counts until it ends or the time runs out.
    const busy = () => [...this.#isolates].some((isolate) => isolate.jobs.length > 0);
    while (busy() && performance.now() < deadline && !this.#stopping) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    if (busy()) {
      this.#logger.warning(
        `requests still running after ${timeoutMs} ms of draining; stopping them`,
      );
    }
    const ids = [...this.#isolates].map((isolate) => isolate.id);
    this.stop("the application was reloaded and the replaced isolates ran out of time");
    return ids;
  }

  /**
   * Takes back up to `max` requests that have not started: queued ones, then
   * ones that wait in an isolate behind a running request. They come in the
   * order they arrived, so that the pool that takes them runs the oldest first.
   */
  withdrawWaiting(max: number): Job[] {
    const jobs = this.#queue.splice(0, max);
    for (const isolate of this.#isolates) {
      while (jobs.length < max) {
        const job = isolate.withdrawWaiting();
        if (!job) break;
        jobs.push(job);
      }
    }
    return jobs.sort(byArrival);
  }

  /**
   * Takes requests that another pool of the same application accepted but
   * did not start, ahead of this pool's own queue. They keep their arrival
   * time, so their queue timeout goes on.
   */
  adopt(jobs: Job[]): void {
    this.#requeue(jobs);
    this.#grow();
  }

  /** Stops every isolate; queued jobs fail with 503, for `reason`. */
  stop(reason = "the server is shutting down"): void {
    this.#stopping = true;
    clearInterval(this.#queueTimer);
    clearTimeout(this.#spawnRetryTimer);
    clearTimeout(this.#growTimer);
    for (const timer of this.#startupTimers.values()) clearTimeout(timer);
    for (const job of this.#queue.splice(0)) job.sink.fail(503, reason);
    for (const isolate of this.#isolates) {
      for (const job of isolate.terminate(reason)) {
        job.sink.fail(503, reason);
      }
    }
    this.#isolates.clear();
  }

  #run(isolate: Isolate, job: Job): void {
    this.#idleSince.delete(isolate);
    if (isolate.jobs.length === 0) this.#jobStartedAt.set(isolate, performance.now());
    isolate.run(job);
    job.onRunning?.();
    this.#grow();
  }

  /**
   * Starts one more isolate when requests wait. Below `eagerSize` it starts
   * one at once and keeps a spare ready. Beyond it, more isolates would
   * only share the cores. So there the pool grows, and keeps a spare, only
   * while a busy isolate is blocked (see waitBlocked) or has run a request
   * for LONG_REQUEST_MS. Measured with hello world on 2 cores, daemon
   * processes=2 threads=15 and wrk -c64: growing whenever every isolate was
   * busy gave each process 15 isolates. Their restores took the cores for
   * seconds and the p99 latency rose from about 30 ms to over 100 ms, for
   * the request rate of 1 isolate per process.
   */
  #grow(): void {
    if (
      !this.#boot || this.#isolates.size >= this.#options.size || this.#failedReason ||
      this.#handOff
    ) return;
    if (this.#spawnsBlocked()) return;
    let idle = 0;
    for (const isolate of this.#isolates) {
      // One isolate starts at a time: with 2 processes x 15 threads under load,
      // 30 snapshot restores at once took the two cores from the requests
      // (under 50 requests/s while the pools grew).
      if (isolate.state === "starting") return;
      if (isolate.state === "idle") idle += 1;
    }
    if (this.#isolates.size < this.#options.eagerSize) {
      // Growing takes a snapshot restore (a few hundred milliseconds), so a
      // pool below its maximum keeps one spare isolate started: the next
      // request that finds every isolate busy is served at once.
      const startSpare = idle === 0 && this.#options.minSize < this.#options.size;
      if (this.#queue.length > 0 || startSpare) this.#spawn();
      return;
    }
    // Past `eagerSize`, a spare isolate is kept too, but only while a busy
    // isolate blocks or runs long: the next short request then need not wait.
    if (idle > 0 && !this.#hasWaiting()) return;
    if (this.#runsSlowRequest()) {
      this.#spawn();
      return;
    }
    // Every isolate is busy, or requests wait, with requests that compute:
    // look again soon, for as long as that lasts.
    this.#growTimer ??= setTimeout(() => {
      this.#growTimer = undefined;
      if (!this.#stopping) this.#grow();
    }, GROW_CHECK_MS);
  }

  /** Whether a busy isolate is blocked (see waitBlocked) or has run its request for LONG_REQUEST_MS. */
  #runsSlowRequest(): boolean {
    const now = performance.now();
    for (const [isolate, startedAt] of this.#jobStartedAt) {
      if (isolate.blocked || now - startedAt >= LONG_REQUEST_MS) return true;
    }
    return false;
  }

  /** Whether a request is posted behind one that has run for LONG_REQUEST_MS. */
  #heldBehindSlow(): boolean {
    const now = performance.now();
    for (const isolate of this.#isolates) {
      if (isolate.jobs.length < 2) continue;
      const startedAt = this.#jobStartedAt.get(isolate);
      if (startedAt !== undefined && now - startedAt >= LONG_REQUEST_MS) return true;
    }
    return false;
  }

  /** Whether a request waits, queued or posted behind a running one. */
  #hasWaiting(): boolean {
    if (this.#queue.some((job) => !job.abandoned)) return true;
    for (const isolate of this.#isolates) {
      for (let i = 1; i < isolate.jobs.length; i++) if (!isolate.jobs[i].abandoned) return true;
    }
    return false;
  }

  /** Returns an idle isolate, else one that can take a request behind its running one. */
  #findIdle(): Isolate | undefined {
    let worn: Isolate | undefined;
    let pipelined: Isolate | undefined;
    for (const isolate of this.#isolates) {
      // An idle isolate whose inbox is still full of requests that other
      // isolates took over cannot take one until its worker skips them.
      if (!isolate.canTake) continue;
      // An isolate due for replacement serves only while no other one is free.
      if (isolate.state === "idle" && !this.#worn.includes(isolate)) return isolate;
      if (isolate.state === "idle") {
        worn ??= isolate;
      } else {
        pipelined ??= isolate;
      }
    }
    return worn ?? pipelined;
  }

  #spawn(worker?: Worker): Isolate {
    const isolate = new Isolate({
      worker,
      id: this.#options.nextIsolateId(),
      app: this.app,
      logger: this.#logger,
      responseWindow: this.#options.responseWindow,
      memoryMaxBytes: this.#options.memoryMaxBytes,
      multiprocess: this.#options.multiprocess,
      controlTable: this.#controls,
      boot: this.#boot!,
      onReady: (ready) => this.#onReady(ready),
      onIdle: (idle) => {
        // An isolate that finished a request is healthy: the next restart waits the shortest delay.
        this.#restarts = 0;
        if (this.#recycle(idle)) return;
        if (idle.jobs.length === 0) {
          this.#jobStartedAt.delete(idle);
          this.#idleSince.set(idle, performance.now());
        } else {
          // The next posted job starts now.
          this.#jobStartedAt.set(idle, performance.now());
        }
        this.#dispatchNext(idle);
      },
      onLoaded: (loaded, error) => this.#onLoaded(loaded, error),
      onDead: (dead, reason, unstarted) => this.#onDead(dead, reason, unstarted),
    });
    this.#isolates.add(isolate);
    this.#logger.debug("starting isolate", { isolate: isolate.id });
    const timer = setTimeout(() => {
      this.#logger.error(
        `isolate did not start within ${this.#options.startupTimeoutMs} ms; replacing it`,
        { isolate: isolate.id },
      );
      this.#onDead(isolate, "startup timed out", isolate.terminate("startup timed out"));
    }, this.#options.startupTimeoutMs);
    this.#startupTimers.set(isolate, timer);
    return isolate;
  }

  #onReady(isolate: Isolate): void {
    clearTimeout(this.#startupTimers.get(isolate));
    this.#startupTimers.delete(isolate);
    this.#idleSince.set(isolate, performance.now());
    this.#failedStarts = 0;
    // A start worked, so the delay that failed starts set no longer applies.
    this.#spawnsBlockedUntil = 0;
    clearTimeout(this.#spawnRetryTimer);
    this.#spawnRetryTimer = undefined;
    this.#checkMemoryLimit(isolate);
    if (isolate === this.#replacement) this.#retireWorn();
    if (!this.#startedMinimum) {
      this.#startedMinimum = true;
      while (this.#isolates.size < this.#options.minSize) this.#spawn();
    } else if (this.#isolates.size < this.#options.minSize && !this.#stopping && !this.#handOff) {
      // Failed starts left the pool below its minimum: refill it, one isolate at a time.
      this.#spawn();
    }
    this.#firstReady.resolve();
    this.#dispatchNext(isolate);
  }

  /**
   * Handles an isolate that finished a request with respect to maxRequests
   * and memoryLimitBytes: one past a limit waits in #worn for a replacement,
   * and one that was replaced stops once its last request is done. Returns
   * true when the isolate stopped.
   */
  #recycle(isolate: Isolate): boolean {
    const { maxRequests, memoryLimitBytes } = this.#options;
    if (memoryLimitBytes <= 0) this.#noteLargeMemory(isolate);
    if ((maxRequests <= 0 && memoryLimitBytes <= 0) || this.#stopping || this.#handOff) {
      return false;
    }
    if (isolate.retiring) {
      if (isolate.jobs.length > 0) return false;
      this.#stopWorn(isolate);
      return true;
    }
    const reason = this.#worn.includes(isolate) ? undefined : this.#wornReason(isolate);
    if (reason) {
      this.#worn.push(isolate);
      this.#logger.info(`isolate ${reason}; starting a fresh one to replace it`, {
        isolate: isolate.id,
      });
    }
    this.#startReplacement();
    return false;
  }

  /**
   * Logs once per isolate, without a memory limit, when its wasm memory
   * passes LARGE_MEMORY_BYTES. Wasm memory never shrinks, so what one large
   * request allocated stays with the isolate until it stops.
   */
  #noteLargeMemory(isolate: Isolate): void {
    if (isolate.memoryBytes < LARGE_MEMORY_BYTES || this.#largeMemoryNoted.has(isolate)) return;
    this.#largeMemoryNoted.add(isolate);
    this.#logger.warning(
      `isolate has ${mebibytes(isolate.memoryBytes)} of wasm memory, which it keeps until it ` +
        `stops because wasm memory never shrinks; ${this.#options.memoryLimitSetting} replaces such isolates`,
      { isolate: isolate.id },
    );
  }

  /** Returns why `isolate` is due for a replacement, or undefined when it is not. */
  #wornReason(isolate: Isolate): string | undefined {
    const { maxRequests, memoryLimitBytes } = this.#options;
    if (maxRequests > 0 && isolate.served >= maxRequests) {
      return `served ${plural(isolate.served, "request")} (maximum-requests ${maxRequests})`;
    }
    if (memoryLimitBytes > 0 && this.#memoryLimitUsable && isolate.memoryBytes > memoryLimitBytes) {
      // Without an application snapshot or --preload the import comes with the
      // first request, so the limit may be below what the import needs. An
      // isolate that imported at start was checked when it was ready, so what
      // its first request took above the limit is that request's own.
      const importedAtStart = this.#boot?.kind === "application" || this.app.preload === true;
      this.#overLimitAtFirstRequest = isolate.served <= 1 && !importedAtStart
        ? this.#overLimitAtFirstRequest + 1
        : 0;
      if (this.#overLimitAtFirstRequest >= 2) {
        this.#disableMemoryLimit(isolate, "after its first request");
        return undefined;
      }
      return `has ${mebibytes(isolate.memoryBytes)} of wasm memory (memory-limit ${
        mebibytes(memoryLimitBytes)
      })`;
    }
    return undefined;
  }

  /** Turns the memory limit off when a fresh isolate is already above it, since replacing it would not help. */
  #checkMemoryLimit(isolate: Isolate): void {
    const limit = this.#options.memoryLimitBytes;
    if (limit <= 0 || !this.#memoryLimitUsable || isolate.memoryBytes <= limit) return;
    this.#disableMemoryLimit(isolate, "when it starts");
  }

  #disableMemoryLimit(isolate: Isolate, when: string): void {
    this.#memoryLimitUsable = false;
    this.#logger.warning(
      `memory-limit ${mebibytes(this.#options.memoryLimitBytes)} is below the ${
        mebibytes(isolate.memoryBytes)
      } ` +
        `of wasm memory that a fresh isolate has ${when}, so no isolate is replaced for its memory; raise the limit`,
      { isolate: isolate.id },
    );
  }

  /** Starts the replacement of the first worn isolate, unless one is starting. */
  #startReplacement(): void {
    if (this.#replacement || this.#worn.length === 0 || !this.#boot || this.#failedReason) return;
    // A pool that stops or hands its requests to a fresh pool needs no replacement.
    if (this.#stopping || this.#handOff) return;
    if (this.#spawnsBlocked()) return;
    this.#replacement = this.#spawn();
  }

  /** The replacement is ready: the first worn isolate finishes its requests and stops. */
  #retireWorn(): void {
    this.#replacement = null;
    const worn = this.#worn.shift();
    if (worn && this.#isolates.has(worn)) {
      worn.retiring = true;
      // Requests posted behind its running one go to the other isolates.
      const waiting: Job[] = [];
      for (let job = worn.withdrawWaiting(); job; job = worn.withdrawWaiting()) waiting.push(job);
      this.#requeue(waiting);
      if (worn.jobs.length === 0) this.#stopWorn(worn);
    }
    this.#startReplacement();
  }

  #stopWorn(isolate: Isolate): void {
    this.#isolates.delete(isolate);
    this.#idleSince.delete(isolate);
    this.#jobStartedAt.delete(isolate);
    isolate.terminate("replaced by a fresh isolate");
    this.#logger.info(
      `isolate stopped: replaced after ${plural(isolate.served, "request")}, with ${
        mebibytes(isolate.memoryBytes)
      } of wasm memory`,
      { isolate: isolate.id },
    );
  }

  #dispatchNext(isolate: Isolate): void {
    // A request posted behind another isolate's slow request usually arrived
    // before everything in the queue, so it goes first.
    this.#takeWaitingJob(isolate, this.#queue[0]?.queuedAt, true);
    while (this.#queue.length > 0 && isolate.canTake) {
      const job = this.#queue[0];
      if (job.abandoned) {
        this.#queue.shift();
        job.sink.abandon();
        continue;
      }
      if (!isolate.canTakeJob(job)) break;
      this.#queue.shift();
      this.#run(isolate, job);
    }
    if (isolate.state === "idle") this.#takeWaitingJob(isolate);
    this.#retryDispatch(isolate);
  }

  /**
   * Dispatches to `isolate` again in a moment if it is idle but cannot take
   * a request while requests wait. Each request that another isolate took
   * over while this one ran a long request leaves an entry in its inbox,
   * which its worker skips only once that request has ended. Until then, a
   * full inbox keeps the isolate from taking requests.
   */
  #retryDispatch(isolate: Isolate): void {
    if (isolate.state !== "idle" || isolate.canTake || isolate.retiring) return;
    if (this.#dispatchRetries.has(isolate) || !this.#hasWaiting()) return;
    this.#dispatchRetries.add(isolate);
    setTimeout(() => {
      this.#dispatchRetries.delete(isolate);
      if (this.#isolates.has(isolate) && !this.#stopping) this.#dispatchNext(isolate);
    }, 1);
  }

  #idleCount(): number {
    let idle = 0;
    for (const isolate of this.#isolates) if (isolate.state === "idle") idle += 1;
    return idle;
  }

  #waitingInIsolates(): number {
    let waiting = 0;
    for (const isolate of this.#isolates) waiting += Math.max(isolate.jobs.length - 1, 0);
    return waiting;
  }

  /** Puts jobs an isolate never started back at the front of the queue and dispatches them. */
  #requeue(jobs: Job[]): void {
    if (jobs.length === 0) return;
    if (this.#handOff) {
      this.#handOff(jobs);
      return;
    }
    if (this.#stopping || this.#failedReason) {
      for (const job of jobs) {
        job.sink.fail(503, this.#failedReason ?? "the server is shutting down");
      }
      return;
    }
    // A job keeps the time it first arrived: its queue timeout counts from
    // there, and it goes before the jobs that arrived after it.
    const now = performance.now();
    for (const job of jobs) job.queuedAt ??= now;
    const merged = [...jobs, ...this.#queue].sort(byArrival);
    this.#queue.splice(0, this.#queue.length, ...merged);
    for (const isolate of this.#isolates) if (isolate.canTake) this.#dispatchNext(isolate);
  }

  /**
   * Moves the job that has waited longest behind another isolate's running
   * request to `isolate`, if it arrived before `before` and `isolate` has
   * nothing to run. With `slowOnly`, only from behind a request that has run
   * for LONG_REQUEST_MS: moving jobs between isolates that run short
   * requests costs more than it saves (hello world lost 17 % at 64
   * connections when every finished request moved one). A blocked request
   * does not count by itself, since one that waits a millisecond for a
   * database is blocked too.
   */
  #takeWaitingJob(isolate: Isolate, before = Infinity, slowOnly = false): void {
    // Only an isolate with nothing to run takes a job over. One that already runs
    // a job posted to it would hold the moved job behind that one. Two such
    // isolates passed a job back and forth until its queue-timeout.
    if (!isolate.canTake || isolate.jobs.length > 0) return;
    const now = performance.now();
    let holder: Isolate | undefined;
    let oldest = before;
    for (const other of this.#isolates) {
      if (other === isolate || other.jobs.length < 2) continue;
      if (slowOnly) {
        const startedAt = this.#jobStartedAt.get(other);
        if (startedAt === undefined || now - startedAt < LONG_REQUEST_MS) continue;
      }
      const waiting = other.jobs[other.jobs.length - 1];
      const arrived = waiting.queuedAt ?? Infinity;
      if (arrived < oldest && isolate.canTakeJob(waiting)) {
        holder = other;
        oldest = arrived;
      }
    }
    // The withdrawal fails when the holder has just started the job itself.
    const job = holder?.withdrawWaiting();
    if (job) this.#run(isolate, job);
  }

  /**
   * Handles the import result of a preloading isolate; returns whether it
   * may take requests. Once an isolate of this pool has imported the
   * application, one whose import fails is stopped as a failed start, so a
   * script broken after the start never serves in place of the working one.
   */
  #onLoaded(isolate: Isolate, error: string | undefined): boolean {
    this.#options.onApplicationLoaded?.(error);
    if (error === undefined) {
      this.#imported.add(isolate);
      this.#everImported = true;
      return true;
    }
    if (!this.#everImported) return true;
    const serving = [...this.#isolates].some((other) =>
      other !== isolate && this.#imported.has(other)
    );
    const reason = `the application failed to import (${tracebackSummary(error) ?? error}); ` +
      (serving
        ? "the running isolates keep serving"
        : "it imported in this pool before, so no isolate serves the broken script; fix it and touch it");
    this.#onDead(isolate, reason, isolate.terminate(reason), true);
    return false;
  }

  /**
   * Returns whether isolates may not start now, after one failed to start,
   * and makes sure that growing and replacing resume when they may.
   */
  #spawnsBlocked(): boolean {
    const wait = this.#spawnsBlockedUntil - performance.now();
    if (wait <= 0) return false;
    // A longer delay after another failure replaces the timer of a shorter one.
    if (this.#spawnRetryTimer !== undefined && this.#spawnRetryAt >= this.#spawnsBlockedUntil) {
      return true;
    }
    clearTimeout(this.#spawnRetryTimer);
    this.#spawnRetryAt = this.#spawnsBlockedUntil;
    this.#spawnRetryTimer = setTimeout(() => {
      this.#spawnRetryTimer = undefined;
      if (this.#stopping || this.#failedReason || this.#handOff || this.#spawnsBlocked()) return;
      // One start at a time: the first of refilling, growing and replacing that applies.
      if (this.#isolates.size < this.#options.minSize) {
        this.#spawn();
        return;
      }
      const before = this.#isolates.size;
      this.#grow();
      if (this.#isolates.size === before) this.#startReplacement();
    }, wait);
    return true;
  }

  /** Isolates that take requests now. */
  #servingCount(): number {
    let serving = 0;
    for (const isolate of this.#isolates) {
      if ((isolate.state === "idle" || isolate.state === "busy") && !isolate.retiring) serving += 1;
    }
    return serving;
  }

  /**
   * Handles an isolate that stopped: its unstarted requests go back to the
   * queue, and the pool refills. `reported` is true when the caller has
   * logged the cause as an error already, so the stop itself is INFO.
   */
  #onDead(
    isolate: Isolate,
    reason: string,
    unstarted: Job[] = [],
    failedStart = isolate.readyAt === undefined,
    reported = false,
  ): void {
    this.#requeue(unstarted);
    clearTimeout(this.#startupTimers.get(isolate));
    this.#startupTimers.delete(isolate);
    this.#jobStartedAt.delete(isolate);
    this.#idleSince.delete(isolate);
    if (isolate === this.#replacement) this.#replacement = null;
    this.#worn = this.#worn.filter((worn) => worn !== isolate);
    if (!this.#isolates.delete(isolate) || this.#stopping) return;

    const neverStarted = failedStart;
    if (neverStarted) this.#failedStarts += 1;
    this.#logger.log(reported ? "info" : "error", `isolate stopped: ${reason}`, {
      isolate: isolate.id,
    });
    if (neverStarted && this.#dropApplicationSnapshot(reason)) return;

    const serving = this.#servingCount();
    if (this.#failedStarts >= this.#options.maxFailedStarts && serving === 0) {
      this.#markFailed(
        `${this.#failedStarts} isolates in a row failed to start; last error: ${reason}`,
      );
      return;
    }
    if (neverStarted && serving > 0) {
      // Growing or replacing failed while other isolates serve: they go on,
      // and the next start waits longer after each failure in a row.
      const delay =
        RESTART_DELAYS_MS[Math.min(this.#failedStarts - 1, RESTART_DELAYS_MS.length - 1)];
      this.#spawnsBlockedUntil = performance.now() + delay;
      this.#spawnsBlocked();
      this.#logger.warning(
        `${plural(this.#failedStarts, "isolate start")} in a row failed; ${
          plural(serving, "running isolate")
        } ` +
          `${serving === 1 ? "keeps" : "keep"} serving, and the next start waits ${delay} ms`,
        { isolate: isolate.id },
      );
      return;
    }
    // Requests wait, some of them taken back from this isolate: start one now,
    // unless isolates fail to start, which keeps the delay below.
    if (this.#queue.length > 0 && !neverStarted) this.#grow();
    if (this.#isolates.size >= this.#options.minSize || this.#handOff) {
      // Above the minimum, the next queued request starts an isolate if one is needed.
      return;
    }
    const delay = RESTART_DELAYS_MS[Math.min(this.#restarts, RESTART_DELAYS_MS.length - 1)];
    this.#restarts += 1;
    this.#logger.info(`restarting the isolate in ${delay} ms, or at once when a request comes`, {
      isolate: isolate.id,
    });
    setTimeout(() => {
      if (this.#stopping || this.#failedReason || this.#handOff) return;
      if (this.#isolates.size < this.#options.size) this.#spawn();
    }, delay);
  }

  /**
   * Handles a first isolate that could not start from the application
   * snapshot: the snapshot passed its checks but may still be unusable (built
   * by a faulty build, or from memory that was damaged before it was
   * written). Deletes the file, so the next start builds it again, and starts
   * this pool's isolates from the runtime snapshot, which import the
   * application themselves. Returns whether it did so.
   */
  #dropApplicationSnapshot(reason: string): boolean {
    const path = this.#boot?.kind === "application" ? this.#boot.path : undefined;
    // A restore that crashes fails to start; one that loops runs into startup-timeout.
    const restoreFailed = reason.startsWith("Pyodide failed to start") ||
      reason === "startup timed out";
    if (!path || this.#startedMinimum || !restoreFailed) return false;
    this.#boot = null;
    this.#failedStarts = 0;
    // A snapshot larger than the memory cap is sound, and a raised cap can use it.
    if (reason.includes(MEMORY_MAX_TOO_LOW)) {
      this.#logger.warning(
        `the application snapshot ${path} needs more wasm memory than the memory cap ` +
          "allows; isolates start from the runtime snapshot and import the application " +
          "themselves, within the cap (raise the cap to restore the snapshot)",
      );
    } else {
      this.#logger.warning(
        `the application snapshot ${path} could not be restored; deleting it, and isolates ` +
          "start from the runtime snapshot (the next server start builds it again)",
      );
      Deno.remove(path).catch((error) => {
        if (!(error instanceof Deno.errors.NotFound)) {
          this.#logger.warning(`cannot delete ${path}: ${error}; delete it by hand`);
        }
      });
    }
    this.#prepareBoot({ ...this.app, snapshot: "runtime" }).then(() => {
      if (!this.#stopping && !this.#handOff && this.#isolates.size === 0) this.#spawn();
    });
    return true;
  }

  #markFailed(reason: string): void {
    this.#failedReason = reason;
    this.#logger.log(this.#options.failureLogLevel, `application marked failed: ${reason}`);
    this.#firstReady.reject(new Error(reason));
    for (const job of this.#queue.splice(0)) {
      job.sink.fail(503, `application unavailable: ${reason}`);
    }
  }

  /** Runs once a second: expires queued jobs, stops overdue requests, retires idle isolates. */
  #maintain(): void {
    this.#expireQueued();
    this.#stopOverdueRequests();
    this.#retireIdle();
    this.#checkIdleMemory();
  }

  /**
   * Replaces idle isolates past the memory limit. The check after each
   * request can miss memory that the request's last steps allocated.
   */
  #checkIdleMemory(): void {
    if (this.#options.memoryLimitBytes <= 0) return;
    for (const isolate of [...this.#isolates]) {
      if (isolate.state === "idle" && !isolate.retiring) this.#recycle(isolate);
    }
  }

  #stopOverdueRequests(): void {
    const timeout = this.#options.requestTimeoutMs;
    if (timeout <= 0) return;
    const now = performance.now();
    for (const [isolate, startedAt] of [...this.#jobStartedAt]) {
      if (now - startedAt < timeout) continue;
      const reason = `request timed out after ${Math.round(now - startedAt)} ms (request-timeout ${
        timeout / 1000
      } s)`;
      this.#logger.error(`${reason}; replacing the isolate`, {
        isolate: isolate.id,
        request: isolate.job?.requestId,
      });
      // The request failed, not the isolate: its replacement starts without a growing delay.
      this.#restarts = 0;
      this.#onDead(isolate, reason, isolate.terminate(reason, 504), undefined, true);
    }
  }

  #retireIdle(): void {
    const timeout = this.#options.idleTimeoutMs;
    if (timeout <= 0 || this.#queue.length > 0) return;
    const now = performance.now();
    for (const [isolate, idleSince] of [...this.#idleSince]) {
      if (this.#isolates.size <= this.#options.minSize) return;
      if (isolate.state !== "idle" || now - idleSince < timeout) continue;
      // Keep one idle isolate as the spare that #grow would start again.
      const spareKept = this.#isolates.size <= this.#options.eagerSize || this.#runsSlowRequest();
      if (this.#idleCount() <= 1 && spareKept) return;
      this.#idleSince.delete(isolate);
      this.#isolates.delete(isolate);
      isolate.terminate("retired after being idle");
      // A fresh isolate that was starting to replace it simply joins the pool.
      this.#worn = this.#worn.filter((worn) => worn !== isolate);
      this.#logger.info(`isolate retired after ${Math.round((now - idleSince) / 1000)} s idle`, {
        isolate: isolate.id,
      });
    }
  }

  #expireQueued(): void {
    const timeout = this.#options.queueTimeoutMs;
    if (timeout <= 0) return;
    const now = performance.now();
    const expire = (job: Job) => {
      job.sink.fail(
        503,
        `queue timed out: the request waited ${
          Math.round(now - job.queuedAt!)
        } ms in the queue (queue-timeout ${timeout / 1000} s)`,
      );
    };
    while (this.#queue.length > 0) {
      const head = this.#queue[0];
      if (head.abandoned) {
        this.#queue.shift();
        head.sink.abandon();
        continue;
      }
      if (now - head.queuedAt! < timeout) break;
      this.#queue.shift();
      expire(head);
    }
    // A job posted behind a running request waits too, for as long as that request runs.
    for (const isolate of this.#isolates) {
      const waiting = isolate.jobs.length > 1 ? isolate.jobs[isolate.jobs.length - 1] : undefined;
      // A job whose client left is not failed here: it ends when the isolate runs it or gives it back.
      if (!waiting || waiting.abandoned || now - waiting.queuedAt! < timeout) continue;
      const job = isolate.withdrawWaiting();
      if (job) expire(job);
    }
  }
}

function mebibytes(bytes: number): string {
  return `${Math.round(bytes / (1024 * 1024))} MiB`;
}
