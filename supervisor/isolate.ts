/**
 * The main-thread handle of one isolate: a Web Worker running Pyodide with
 * Deno permissions narrowed to the application's folders.
 */

import { fileURLToPath } from "node:url";
import {
  appReadPaths,
  type AppSpec,
  PYODIDE_SPECIFIER,
  type PythonVersion,
  withMountRoots,
} from "./app_spec.ts";
import type { Logger } from "./log.ts";
import {
  type EndMessage,
  type FileMessage,
  type FromWorker,
  ISOLATE_WORKER_NAME,
  type ProcessIdentity,
  type RequestMessage,
  type StartMessage,
} from "../wasm/protocol.ts";
import {
  type BodyRing,
  type ControlTable,
  nextTicket,
  type RequestControl,
  RequestInbox,
} from "../wasm/channel.ts";
import { ISOLATE_WORKER_URL } from "./worker_url.ts";
import type { Boot } from "./snapshots.ts";
import { dataPagesOf } from "../wasm/snapshot_pages.ts";

/** Receiver of one request's response parts, in the order the isolate produces them. */
export interface ResponseSink {
  start(message: StartMessage): void;
  body(chunk: Uint8Array): void;
  file(message: FileMessage): void;
  end(message: EndMessage): void;
  /** The request could not run or its isolate died; `status` is what the client should get. */
  fail(status: number, reason: string): void;
  /** The client left before an isolate ran the request; the pool will not run it. May come twice. */
  abandon(): void;
  /** Whether the response is over: sent whole, failed, or cut off. */
  readonly finished?: boolean;
}

/** One request as the pool schedules it. */
export interface Job {
  requestId: string;
  method: string;
  environ: string;
  body: Uint8Array<ArrayBuffer> | null;
  bodyRing: BodyRing | null;
  control: RequestControl;
  /** The ticket of the job's latest posting to an isolate. */
  ticket?: number;
  sink: ResponseSink;
  /** Set when the client left (IsolatePool.abandon); the pool runs the job no more. */
  abandoned?: boolean;
  /** Set when an isolate took the job. */
  running?: boolean;
  /** Called when an isolate takes the job. */
  onRunning?: () => void;
  /**
   * performance.now() when the job reached the pool, or the front for a daemon
   * process's request. Its queue timeout counts from here.
   */
  queuedAt?: number;
}

export interface IsolateOptions {
  id: number;
  app: AppSpec;
  logger: Logger;
  responseWindow: number;
  /** See PoolOptions.memoryMaxBytes. */
  memoryMaxBytes?: number;
  multiprocess: boolean;
  /** The pool's control slots; jobs whose control lives there can go through the inbox. */
  controlTable?: ControlTable;
  /** Called when the isolate is ready for its first job. */
  onReady(isolate: Isolate): void;
  /** Called when one of the isolate's jobs finished its response, so it can take another. */
  onIdle(isolate: Isolate): void;
  /**
   * Called once when the isolate stops for good (failed start, crash,
   * interpreter failure), with the jobs it had not started.
   */
  onDead(isolate: Isolate, reason: string, unstarted: Job[]): void;
  /** The snapshot and compiled module the isolate starts from. */
  boot?: Boot;
  /**
   * Called when a preloading isolate has imported the application, or failed
   * to. It takes requests (onReady) only afterwards, and only unless this
   * returns false, which means the pool has stopped it.
   */
  onLoaded?(isolate: Isolate, error: string | undefined): boolean;
  /** A worker that startIsolateWorker() started ahead for this application. */
  worker?: Worker;
}

function isolateReadPaths(app: AppSpec): string[] {
  return [pyodideFolder(app.python), ...appReadPaths(app)];
}

/**
 * Starts the worker thread of an isolate for `app`, with the permissions of
 * its application. The worker loads Pyodide's scripts while it waits for
 * the message that starts its interpreter, so a pool can start one before
 * its snapshot is ready.
 */
export function startIsolateWorker(app: AppSpec): Worker {
  const worker = new Worker(ISOLATE_WORKER_URL, {
    type: "module",
    name: ISOLATE_WORKER_NAME + app.python,
    deno: {
      permissions: {
        read: withMountRoots(app, isolateReadPaths(app)),
        write: app.writePaths?.length ? withMountRoots(app, app.writePaths) : false,
        net: app.allowNet?.length ? app.allowNet : false,
        run: false,
        env: false,
        ffi: false,
        sys: false,
        import: false,
      },
    },
  });
  // Until an Isolate takes the worker, an uncaught error in it must not end
  // the server: it is kept and reported when the Isolate takes over.
  worker.onerror = (event: ErrorEvent) => {
    event.preventDefault();
    earlyErrors.set(worker, event.message);
  };
  return worker;
}

/** Uncaught errors of workers that startIsolateWorker() started, before an Isolate took them. */
const earlyErrors = new WeakMap<Worker, string>();

export type IsolateState = "starting" | "idle" | "busy" | "dead";

/** The folder of a Pyodide npm package, which every isolate must be able to read. */
export function pyodideFolder(python: PythonVersion): string {
  const entry = import.meta.resolve(PYODIDE_SPECIFIER[python]);
  const folder = fileURLToPath(new URL(".", entry));
  try {
    return Deno.realPathSync(folder);
  } catch {
    // Inside a compiled binary the package lives in the embedded file system.
    return folder;
  }
}

/**
 * Maximum requests posted to one isolate at once: the running one and the next, posted
 * ahead so the worker starts it without waiting for the main thread. The
 * pool takes the second back (RequestControl.withdraw) when another isolate
 * becomes free before it starts.
 */
export const PIPELINE_DEPTH = 2;

const WASM_PAGE_BYTES = 64 * 1024;

/** The signal number Pyodide turns into KeyboardInterrupt. */
export const SIGINT = 2;

export class Isolate {
  readonly id: number;
  state: IsolateState = "starting";
  /** Requests posted to the worker, oldest (the running one) first. */
  jobs: Job[] = [];
  /** Requests this isolate has served. */
  served = 0;
  /** Set when a fresh isolate has replaced this one: it finishes its requests and takes no more. */
  retiring = false;
  /** performance.now() when the interpreter became ready; unset while starting. */
  readyAt: number | undefined;
  readonly startedAt = performance.now();
  #worker: Worker;
  #options: IsolateOptions;
  #logger: Logger;
  #inbox = new RequestInbox();
  #interrupt = new Int32Array(new SharedArrayBuffer(4));
  #memoryPages = new Int32Array(new SharedArrayBuffer(4));
  #blocked = new Int32Array(new SharedArrayBuffer(4));
  /** Versions and load time for the "isolate ready" line. */
  #readyText = "";

  constructor(options: IsolateOptions) {
    this.id = options.id;
    this.#options = options;
    this.#logger = options.logger.child({ isolate: options.id });
    const readPaths = isolateReadPaths(options.app);
    this.#worker = options.worker ?? startIsolateWorker(options.app);
    this.#worker.onmessage = (event: MessageEvent<FromWorker>) => this.#receive(event.data);
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      this.#die(`the worker raised an uncaught error: ${event.message}`);
    };
    const early = earlyErrors.get(this.#worker);
    // In a microtask, so that the pool has added this isolate when its onDead runs.
    if (early !== undefined) {
      queueMicrotask(() => this.#die(`the worker raised an uncaught error: ${early}`));
    }
    this.#worker.postMessage({
      type: "init",
      app: options.app,
      isolateId: options.id,
      readPaths,
      responseWindow: options.responseWindow,
      memoryMaxBytes: options.memoryMaxBytes ?? 0,
      multiprocess: options.multiprocess,
      snapshot: options.boot?.snapshot ?? null,
      snapshotPages: options.boot?.snapshot ? dataPagesOf(options.boot.snapshot) : null,
      wasmModule: options.boot?.wasmModule ?? null,
      inbox: this.#inbox.buffer,
      interrupt: this.#interrupt.buffer as SharedArrayBuffer,
      memoryPages: this.#memoryPages.buffer as SharedArrayBuffer,
      blocked: this.#blocked.buffer as SharedArrayBuffer,
      identity: processIdentity(),
      controlTable: options.controlTable?.buffer ?? null,
    });
  }

  /**
   * Bytes of the interpreter's wasm memory, as the worker reported them when
   * it was ready and as each response ended. Wasm memory only grows.
   */
  get memoryBytes(): number {
    return Atomics.load(this.#memoryPages, 0) * WASM_PAGE_BYTES;
  }

  /** Whether the running request waits now for something outside the interpreter (see waitBlocked). */
  get blocked(): boolean {
    return Atomics.load(this.#blocked, 0) === 1;
  }

  /** The request the worker runs now, if any. */
  get job(): Job | null {
    return this.jobs[0] ?? null;
  }

  /** Whether the isolate can take another request now. */
  get canTake(): boolean {
    // Every posting takes an inbox entry, a posted message too (see RequestInbox).
    return (this.state === "idle" || this.state === "busy") && !this.retiring &&
      this.jobs.length < PIPELINE_DEPTH && this.#inbox.hasRoom;
  }

  /**
   * Whether `job` may be posted now. A job with a streamed body waits for an
   * isolate with nothing to run. Once it is posted, its body starts to flow
   * (in a daemon process the front starts to send it), and a request whose
   * body has begun can no longer move to another isolate or process.
   */
  canTakeJob(job: Job): boolean {
    return this.canTake && (job.bodyRing === null || this.jobs.length === 0);
  }

  /** Posts a job to the worker, to run after the ones it holds. */
  run(job: Job): void {
    if (!this.canTake) {
      throw new Error(`isolate ${this.id} is ${this.state} with ${this.jobs.length} requests`);
    }
    this.state = "busy";
    this.jobs.push(job);
    const ticket = nextTicket();
    job.ticket = ticket;
    job.control.assign(ticket);
    job.running = true;
    const control = job.control;
    const inTable = control.slot >= 0 && control.buffer === this.#options.controlTable?.buffer;
    const request = {
      ticket,
      controlSlot: control.slot,
      requestId: job.requestId,
      method: job.method,
      environ: job.environ,
      body: job.body,
    };
    if (inTable && job.bodyRing === null && this.#inbox.postRequest(request)) return;
    const message: RequestMessage = {
      type: "request",
      ...request,
      bodyRing: job.bodyRing?.buffer ?? null,
      control: control.buffer,
    };
    this.#worker.postMessage(message);
    this.#inbox.postMail();
  }

  /**
   * Takes back `job` if it waits behind the running one and the worker has
   * not started it. Returns whether it did.
   */
  withdraw(job: Job): boolean {
    const index = this.jobs.indexOf(job);
    if (index < 1 || !job.control.withdraw(job.ticket!)) return false;
    this.jobs.splice(index, 1);
    job.running = false;
    return true;
  }

  /** Takes back the last posted job if the worker has not started it. */
  withdrawWaiting(): Job | undefined {
    if (this.jobs.length < 2) return undefined;
    const job = this.jobs[this.jobs.length - 1];
    if (!job.control.withdraw(job.ticket!)) return undefined;
    this.jobs.pop();
    job.running = false;
    return job;
  }

  /**
   * Stops the worker at once. Jobs it had not started are returned for the
   * pool to run elsewhere; the running one fails with `status`.
   */
  terminate(reason: string, status = 503): Job[] {
    if (this.state === "dead") return [];
    // NOTE: Deno 2.9.6 does not stop a terminated worker that runs JavaScript
    // or wasm in a loop, so its thread would spin for the life of the process.
    // SIGINT makes Python raise KeyboardInterrupt in such a loop. The worker
    // then gets back to its event loop, where the termination takes effect.
    Atomics.store(this.#interrupt, 0, SIGINT);
    this.#worker.terminate();
    const unstarted = this.jobs.filter((job) => job.control.withdraw(job.ticket!));
    // Back in the queue, a job whose client leaves must be abandoned, not waited for.
    for (const job of unstarted) job.running = false;
    for (const job of this.jobs) if (!unstarted.includes(job)) job.sink.fail(status, reason);
    this.jobs = [];
    this.state = "dead";
    return unstarted;
  }

  /** Logs the ready line, which names a failed preload, and takes requests. */
  #becomeReady(importFailed = false): void {
    const memory = `${Math.round(this.memoryBytes / (1024 * 1024))} MiB of wasm memory`;
    this.#logger.info(
      importFailed
        ? `isolate ready without the application, whose import failed: ${this.#readyText}, with ${memory}`
        : `isolate ready: ${this.#readyText}, with ${memory}`,
    );
    this.state = "idle";
    this.#options.onReady(this);
  }

  #receive(message: FromWorker): void {
    switch (message.type) {
      case "ready":
        this.#readyText =
          `Python ${message.pythonVersion} (Pyodide ${message.pyodideVersion}) in ${message.loadMs} ms`;
        this.readyAt = performance.now();
        // A preloading isolate takes requests, and is reported ready, once its import has a result.
        if (this.#options.app.preload) return;
        this.#becomeReady();
        return;
      case "fatal":
        this.#die(message.message);
        return;
      case "loaded": {
        const keep = this.#options.onLoaded?.(this, message.error) ?? true;
        if (!keep || this.state !== "starting") return;
        this.#becomeReady(message.error !== undefined);
        return;
      }
      case "log":
        this.#logger.log(message.level, message.message, { request: message.requestId });
        return;
      case "start": {
        const job = this.#find(message.requestId);
        job?.sink.start(message);
        if (job && message.complete) this.#finishJob(job);
        return;
      }
      case "body":
        this.#find(message.requestId)?.sink.body(message.chunk);
        return;
      case "file":
        this.#find(message.requestId)?.sink.file(message);
        return;
      case "end": {
        const job = this.#find(message.requestId);
        job?.sink.end(message);
        if (job) this.#finishJob(job);
        return;
      }
    }
  }

  /**
   * Returns the job of `requestId`. A request counts as done once its
   * response is complete, but Python may still run the iterable's close()
   * and send more for it. Such late messages find no job and are dropped.
   */
  #find(requestId: string): Job | undefined {
    for (const job of this.jobs) if (job.requestId === requestId) return job;
    this.#logger.debug("ignored a message for a finished request", { request: requestId });
    return undefined;
  }

  #finishJob(job: Job): void {
    const index = this.jobs.indexOf(job);
    if (index < 0) return;
    this.jobs.splice(index, 1);
    this.served += 1;
    if (this.jobs.length === 0) this.state = "idle";
    this.#options.onIdle(this);
  }

  #die(reason: string): void {
    if (this.state === "dead") return;
    const unstarted = this.terminate(reason, 502);
    this.#options.onDead(this, reason, unstarted);
  }
}

let identity: ProcessIdentity | null | undefined;

/**
 * Returns the uid and gid of this process for the isolates, whose workers
 * may not read them (Deno's `sys` permission), or null when this thread may
 * not either.
 */
export function processIdentity(): ProcessIdentity | null {
  if (identity !== undefined) return identity;
  try {
    identity = { uid: Deno.uid() ?? 0, gid: Deno.gid() ?? 0, pid: Deno.pid };
  } catch {
    identity = null;
  }
  if (identity) identity.umask = processUmask ?? currentUmask();
  return identity;
}

/** The umask a daemon process got from the front, which it may not read itself. */
let processUmask: number | undefined;

/** Sets the umask that processIdentity() reports, for a process that may not read its own. */
export function useProcessUmask(umask: number): void {
  processUmask = umask;
  identity = undefined;
}

/** Returns this process's umask, or undefined without the permission to read it. */
export function currentUmask(): number | undefined {
  try {
    return Deno.umask();
  } catch {
    return undefined;
  }
}
