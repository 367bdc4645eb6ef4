/**
 * The main-thread handle of one isolate: a Web Worker running Pyodide with
 * Deno permissions narrowed to the application's folders.
 */

import { fileURLToPath } from "node:url";
import { type AppSpec, appReadPaths, PYODIDE_SPECIFIER, type PythonVersion } from "./app_spec.ts";
import type { Logger } from "./log.ts";
import type {
  EndMessage,
  FileMessage,
  FromWorker,
  RequestMessage,
  StartMessage,
} from "../wasm/protocol.ts";
import type { BodyRing, RequestControl } from "../wasm/channel.ts";
import { ISOLATE_WORKER_URL } from "./worker_url.ts";
import type { Boot } from "./snapshots.ts";

/** Where the response of one request goes, in the order the isolate produces it. */
export interface ResponseSink {
  start(message: StartMessage): void;
  body(chunk: Uint8Array): void;
  file(message: FileMessage): void;
  end(message: EndMessage): void;
  /** The request could not run or its isolate died; `status` is what the client should get. */
  fail(status: number, reason: string): void;
}

/** One request as the pool schedules it. */
export interface Job {
  requestId: string;
  method: string;
  environ: string;
  body: Uint8Array<ArrayBuffer> | null;
  bodyRing: BodyRing | null;
  control: RequestControl;
  sink: ResponseSink;
  /** Set by the front when the client left while the job was still queued. */
  abandoned?: boolean;
  /** Set when an isolate took the job. */
  running?: boolean;
  /** Called when an isolate takes the job. */
  onRunning?: () => void;
}

export interface IsolateOptions {
  id: number;
  app: AppSpec;
  logger: Logger;
  responseWindow: number;
  multiprocess: boolean;
  /** Called when the isolate is ready for its first job. */
  onReady(isolate: Isolate): void;
  /** Called when the job running on the isolate finished its response. */
  onIdle(isolate: Isolate): void;
  /** Called once when the isolate stops for good (failed start, crash, interpreter failure). */
  onDead(isolate: Isolate, reason: string): void;
  /** The snapshot and compiled module the isolate starts from. */
  boot?: Boot;
  /** Called when the isolate has imported the application at start, with the error if it failed. */
  onLoaded?(isolate: Isolate, error: string | undefined): void;
}

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


export class Isolate {
  readonly id: number;
  state: IsolateState = "starting";
  job: Job | null = null;
  /** Requests this isolate has served. */
  served = 0;
  /** performance.now() when the interpreter became ready; unset while starting. */
  readyAt: number | undefined;
  readonly startedAt = performance.now();
  #worker: Worker;
  #options: IsolateOptions;
  #logger: Logger;

  constructor(options: IsolateOptions) {
    this.id = options.id;
    this.#options = options;
    this.#logger = options.logger.child({ isolate: options.id });
    const readPaths = [pyodideFolder(options.app.python), ...appReadPaths(options.app)];
    this.#worker = new Worker(ISOLATE_WORKER_URL, {
      type: "module",
      deno: {
        permissions: {
          read: readPaths,
          write: options.app.writePaths?.length ? options.app.writePaths : false,
          net: options.app.allowNet?.length ? options.app.allowNet : false,
          run: false,
          env: false,
          ffi: false,
          sys: false,
          import: false,
        },
      },
    });
    this.#worker.onmessage = (event: MessageEvent<FromWorker>) => this.#receive(event.data);
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      this.#die(`the worker raised an uncaught error: ${event.message}`);
    };
    this.#worker.postMessage({
      type: "init",
      app: options.app,
      isolateId: options.id,
      readPaths,
      responseWindow: options.responseWindow,
      multiprocess: options.multiprocess,
      snapshot: options.boot?.snapshot ?? null,
      wasmModule: options.boot?.wasmModule ?? null,
    });
  }

  /** Sends a job to the idle isolate. */
  run(job: Job): void {
    if (this.state !== "idle") throw new Error(`isolate ${this.id} is ${this.state}, not idle`);
    this.state = "busy";
    this.job = job;
    job.running = true;
    const message: RequestMessage = {
      type: "request",
      requestId: job.requestId,
      method: job.method,
      environ: job.environ,
      body: job.body,
      bodyRing: job.bodyRing?.buffer ?? null,
      control: job.control.buffer,
    };
    this.#worker.postMessage(message);
  }

  /** Stops the worker at once; a running job fails with `status`. */
  terminate(reason: string, status = 503): void {
    if (this.state === "dead") return;
    this.#worker.terminate();
    this.#failJob(status, reason);
    this.state = "dead";
  }

  #receive(message: FromWorker): void {
    switch (message.type) {
      case "ready":
        this.#logger.info(
          `isolate ready: Python ${message.pythonVersion} (Pyodide ${message.pyodideVersion}) in ${message.loadMs} ms`,
        );
        this.state = "idle";
        this.readyAt = performance.now();
        this.#options.onReady(this);
        return;
      case "fatal":
        this.#die(message.message);
        return;
      case "loaded":
        this.#options.onLoaded?.(this, message.error);
        return;
      case "log":
        this.#logger.log(message.level, message.message, { request: message.requestId });
        return;
      case "start":
        if (!this.#isCurrent(message.requestId)) return;
        this.job!.sink.start(message);
        if (message.complete) this.#finishJob();
        return;
      case "body":
        if (this.#isCurrent(message.requestId)) this.job!.sink.body(message.chunk);
        return;
      case "file":
        if (this.#isCurrent(message.requestId)) this.job!.sink.file(message);
        return;
      case "end":
        if (!this.#isCurrent(message.requestId)) return;
        this.job!.sink.end(message);
        this.#finishJob();
        return;
    }
  }

  /**
   * The isolate counts as free once a response is complete, while Python
   * may still run the iterable's close() and send more for that request;
   * such late messages must not reach the next request's response.
   */
  #isCurrent(requestId: string): boolean {
    if (this.job?.requestId === requestId) return true;
    this.#logger.debug("ignored a message for a finished request", { request: requestId });
    return false;
  }

  #finishJob(): void {
    if (this.state !== "busy") return;
    this.job = null;
    this.served += 1;
    this.state = "idle";
    this.#options.onIdle(this);
  }

  #failJob(status: number, reason: string): void {
    const job = this.job;
    this.job = null;
    job?.sink.fail(status, reason);
  }

  #die(reason: string): void {
    if (this.state === "dead") return;
    this.#worker.terminate();
    this.#failJob(502, reason);
    this.state = "dead";
    this.#options.onDead(this, reason);
  }
}
