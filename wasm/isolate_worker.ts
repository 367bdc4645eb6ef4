/**
 * Entry of an isolate: one Web Worker running one Pyodide interpreter that
 * serves one WSGI request at a time.
 *
 * The pool starts this worker with Deno permissions that allow reading only
 * Pyodide's files and the application's folders, and nothing else (no write,
 * net, run, env or ffi) unless the application's settings grant it. The
 * host folders are mounted into Pyodide's file system at their own paths, so
 * `__file__`, tracebacks and `open()` show real paths.
 */

/// <reference lib="deno.worker" />

import {
  BodyRing,
  type InboxRequest,
  RequestControl,
  RequestInbox,
  stopText,
  useBlockedWord,
  waitBlocked,
} from "./channel.ts";
import {
  type FromWorker,
  type InitMessage,
  ISOLATE_WORKER_NAME,
  type RequestMessage,
  type ToWorker,
} from "./protocol.ts";
import { appReadPaths, type AppSpec } from "../supervisor/app_spec.ts";
import type { LogLevel } from "../supervisor/log.ts";
import {
  describeError,
  interpreterMemoryPages,
  loadPyodideFor,
  mountHostFolders,
  startImports,
} from "./pyodide_loader.ts";
import { buildSnapshot, RESEED_PYTHON, writeAdapterFiles } from "./snapshot_builder.ts";
import { StreamLog } from "./stream_log.ts";
import { installHostModules, type PyodideForHost } from "./host_modules.ts";
import { type EmscriptenFs, openFileHostPath } from "./host_posix.ts";

/**
 * Keeps an application from ending this worker, or the whole process,
 * through Pyodide's `js` module. Deno ends a worker that calls `Deno.exit()`
 * or `close()` without an event the pool could see, so the request would
 * hang until its request-timeout. `Deno.kill()` needs no permission to
 * signal the process itself, so SIGTERM, SIGSTOP or SIGKILL would stop the
 * server or daemon process. The application gets a JavaScript error instead,
 * which fails its request with 500 and leaves the isolate serving.
 */
function blockWorkerExit(): void {
  const blocked = [
    [Deno, "exit", "would end the isolate's worker"],
    [globalThis, "close", "would end the isolate's worker"],
    [Deno, "kill", "would signal the server's own process"],
  ] as const;
  for (const [target, name, effect] of blocked) {
    Object.defineProperty(target, name, {
      value: () => {
        throw new Error(`${name}() ${effect}; an application cannot call it`);
      },
    });
  }
}

/**
 * Keeps standard output for the server. In a daemon process it carries the
 * frames to the front, so a stray write from an application would break the
 * channel and get the process killed. The application cannot reach the
 * standard streams through `js.Deno`, and console.log() and its kin become
 * log lines with the request's id, as Pyodide's own fatal-error report
 * does. NOTE: Deno's internal ops stay reachable through
 * `js.Deno[js.Deno.internal]`, so this closes the documented ways only.
 */
function guardStandardStreams(): void {
  for (const name of ["stdin", "stdout", "stderr"] as const) {
    Object.defineProperty(Deno, name, {
      get() {
        throw new Error(`Deno.${name} belongs to the server; an application cannot use it`);
      },
    });
  }
  const levels = { log: "info", info: "info", debug: "info", warn: "warning", error: "error" };
  for (const [name, level] of Object.entries(levels)) {
    console[name as keyof typeof levels] = (...args: unknown[]) =>
      log(
        level as LogLevel,
        args.map((arg) => typeof arg === "string" ? arg : Deno.inspect(arg)).join(" "),
      );
  }
}

blockWorkerExit();
guardStandardStreams();

/** The subset of Pyodide's API this worker uses; both pinned versions provide it. */
interface Pyodide {
  version: string;
  FS: EmscriptenFS;
  runPython(code: string): unknown;
  pyimport(name: string): PyProxyCallable & Record<string, PyProxyCallable>;
  registerJsModule(name: string, module: object): void;
  setInterruptBuffer(buffer: Int32Array): void;
  checkInterrupt(): void;
  setStdout(options: { write(buffer: Uint8Array): number }): void;
  setStderr(options: { write(buffer: Uint8Array): number }): void;
}
type PyProxyCallable = ((...args: unknown[]) => unknown) & { destroy(): void };
interface BytesProxy {
  getBuffer(type: string): { data: Uint8Array; release(): void };
}
interface EmscriptenFS {
  mkdirTree(path: string): void;
  mount(type: unknown, options: { root: string }, mountpoint: string): void;
  lookupPath(path: string, options?: { follow?: boolean }): {
    node: { mount: { type: unknown; mountpoint: string; opts: { root?: string } } };
  };
  writeFile(path: string, data: string): void;
  filesystems: { NODEFS: unknown };
}

interface CurrentRequest {
  id: string;
  control: RequestControl;
  ring: BodyRing | null;
}

// The pool names the worker after its Python version (see startIsolateWorker).
startImports(self.name.slice(ISOLATE_WORKER_NAME.length));

let pyodide: Pyodide;
let settings: InitMessage;
let handle: PyProxyCallable;
let current: CurrentRequest | null = null;

/**
 * Maximum time the worker stays in its inbox loop before it returns to its
 * event loop once. Deno ends a terminated worker only when its event loop
 * runs, and timers set by the application run only then.
 */
const INBOX_SLICE_MS = 1000;
let inbox: RequestInbox | null = null;
let inboxTimer: ReturnType<typeof setTimeout> | undefined;
/** Requests that came as posted messages, and the mail entries that announced them. */
let postedRequests = 0;
let mailEntries = 0;
/**
 * Set when the interpreter failed. The worker then starts no more requests:
 * the pool takes back the ones it posted and runs them in another isolate.
 */
let broken = false;
/** See InitMessage.memoryPages. */
let memoryPages: Int32Array | null = null;

function reportMemory(): void {
  if (memoryPages) Atomics.store(memoryPages, 0, interpreterMemoryPages());
}

function post(message: FromWorker, transfer: Transferable[] = []): void {
  self.postMessage(message, transfer);
}

function log(level: LogLevel, message: string): void {
  post({ type: "log", level, message, requestId: current?.id });
}

/**
 * Level of the lines that Python's `logging` writes to a standard stream,
 * set by the adapter for each record. Other lines of standard output are
 * logged at INFO, and those of standard error at WARNING.
 */
let streamLevel: LogLevel | undefined;
const stdoutLog = new StreamLog((line) => log(streamLevel ?? "info", line));
const stderrLog = new StreamLog((line) => log(streamLevel ?? "warning", line));

/** Copies a Python bytes object out of the wasm heap. */
function copyBytes(proxy: BytesProxy): Uint8Array<ArrayBuffer> {
  const buffer = proxy.getBuffer("u8");
  try {
    return new Uint8Array(buffer.data);
  } finally {
    buffer.release();
  }
}

/** Body bytes from the adapter: a Latin-1 string when small, else a bytes proxy. */
type PythonBytes = string | BytesProxy;

function toBytes(data: PythonBytes): Uint8Array<ArrayBuffer> {
  if (typeof data !== "string") return copyBytes(data);
  const bytes = new Uint8Array(data.length);
  for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i);
  return bytes;
}

/** Buffer that request body reads land in, as large as the adapter's largest read. */
const readBuffer = new Uint8Array(64 * 1024);

/** A word that stays 0, so time.sleep() waits on it until its timeout. */
const sleepWord = new Int32Array(new SharedArrayBuffer(4));
/** Maximum time time.sleep() blocks before it checks for an interrupt. */
const SLEEP_SLICE_MS = 50;

// deno-lint-ignore no-control-regex -- the whole ASCII range, control characters included
const ASCII_ONLY = /^[\x00-\x7f]*$/;

function requireRequest(): CurrentRequest {
  if (!current) throw new Error("no request is running in this isolate");
  return current;
}

/** Functions the Python adapter imports as `_wsgirun_host`. */
const host = {
  start(status: number, headerLines: string, body: PythonBytes | undefined, complete: boolean) {
    const request = requireRequest();
    // The adapter rejects header names and values with control characters,
    // so a newline separates them safely.
    const headers = headerLines === "" ? [] : headerLines.split("\n");
    // The pool checks the memory when the response is complete, so the size goes out first.
    if (complete) reportMemory();
    if (complete && typeof body === "string" && ASCII_ONLY.test(body)) {
      post({ type: "start", requestId: request.id, status, headers, body, complete });
      return;
    }
    const bytes = body === undefined ? undefined : toBytes(body);
    post(
      { type: "start", requestId: request.id, status, headers, body: bytes, complete },
      bytes ? [bytes.buffer] : [],
    );
  },

  send(chunk: PythonBytes) {
    const request = requireRequest();
    const bytes = toBytes(chunk);
    request.control.reserve(bytes.length, settings.responseWindow);
    post({ type: "body", requestId: request.id, chunk: bytes }, [bytes.buffer]);
  },

  send_file(path: string, offset: number, length: number) {
    const request = requireRequest();
    post({ type: "file", requestId: request.id, path, offset, length });
  },

  finish(error: string | undefined) {
    const request = requireRequest();
    reportMemory();
    post({ type: "end", requestId: request.id, error: error ?? undefined });
  },

  /**
   * Returns up to `size` body bytes in a buffer that the next read reuses.
   * So a large upload allocates nothing per read here, and the adapter
   * copies the bytes into Python at once.
   */
  read(size: number): Uint8Array | undefined {
    const request = requireRequest();
    if (!request.ring) return undefined;
    return request.ring.readSync(size, request.control, readBuffer);
  },

  cancelled(): boolean {
    return current?.control.cancelled ?? false;
  },

  /** Returns the reason the front cancelled the request, as a sentence for the log. */
  cancel_reason(): string {
    return stopText(current?.control.cancelCause ?? "client");
  },

  /** Blocks for `seconds` in slices, so that an interrupt from the pool ends it early. */
  sleep(seconds: number) {
    const until = performance.now() + seconds * 1000;
    for (let left = seconds * 1000; left > 0; left = until - performance.now()) {
      waitBlocked(sleepWord, 0, 0, Math.min(left, SLEEP_SLICE_MS));
      pyodide.checkInterrupt();
    }
  },

  log(level: LogLevel, message: string) {
    log(level, message);
  },

  /**
   * Sets the level of the standard-stream lines that follow, or with undefined
   * goes back to each stream's own. Unfinished lines are logged first, so each
   * keeps the level it was written at.
   */
  stream_level(level: LogLevel | undefined) {
    stdoutLog.flush();
    stderrLog.flush();
    streamLevel = level ?? undefined;
  },

  /** See openFileHostPath. */
  open_file_host_path(fd: number): string | undefined {
    return openFileHostPath(pyodide.FS as unknown as EmscriptenFs, fd);
  },
};

async function loadInterpreter(message: InitMessage): Promise<void> {
  const started = performance.now();
  pyodide = await loadPyodideFor({
    python: message.app.python,
    snapshot: message.snapshot ? new Uint8Array(message.snapshot) : null,
    snapshotPages: message.snapshotPages,
    wasmModule: message.wasmModule,
    memoryMaxBytes: message.memoryMaxBytes ?? 0,
    onMemoryCapReached: (requestedBytes) =>
      log(
        "warning",
        `the application requested ${
          Math.round(requestedBytes / 1024 / 1024)
        } MiB of wasm memory, ` +
          `past the memory-max of ${Math.round(message.memoryMaxBytes! / 1024 / 1024)} MiB: ` +
          "the allocation failed with MemoryError (this line comes once per isolate; " +
          "raise memory-max if the application needs more)",
      ),
    stdout: (line: string) => log("info", line),
    stderr: (line: string) => log("warning", line),
  }) as Pyodide;

  pyodide.setStdout({ write: (bytes) => stdoutLog.write(bytes) });
  pyodide.setStderr({ write: (bytes) => stderrLog.write(bytes) });
  mountHostFolders(pyodide.FS, appReadPaths(message.app), message.app.mountRoots);
  pyodide.registerJsModule("_wsgirun_host", host);
  installHostModules(pyodide as unknown as PyodideForHost, {
    app: message.app,
    log,
    identity: message.identity ?? null,
    memoryMaxBytes: message.memoryMaxBytes ?? 0,
  });
  writeAdapterFiles(pyodide);

  const adapter = pyodide.pyimport("_wsgirun_adapter");
  adapter.connect_host();
  const app = message.app;
  adapter.configure(
    app.name,
    app.scriptPath ?? "",
    app.module ?? "",
    app.callable,
    app.pythonPath,
    message.multiprocess,
  );
  handle = adapter.handle;
  if (message.snapshot) renewRandomState();
  applyProcessSettings(app);
  if (message.interrupt) pyodide.setInterruptBuffer(new Int32Array(message.interrupt));
  if (message.memoryPages) memoryPages = new Int32Array(message.memoryPages);
  if (message.blocked) useBlockedWord(message.blocked);
  reportMemory();

  const pythonVersion = String(pyodide.runPython("import sys; sys.version.split()[0]"));
  post({
    type: "ready",
    pythonVersion,
    pyodideVersion: pyodide.version,
    loadMs: Math.round(performance.now() - started),
  });

  if (app.preload) preloadApplication(adapter);
}

/** See RESEED_PYTHON. */
function renewRandomState(): void {
  pyodide.runPython(RESEED_PYTHON);
}

/**
 * Sets the variables and working folder a daemon group gives its
 * interpreters. They go into Python after the start, because Pyodide's `env`
 * option does not survive a memory snapshot restore.
 */
function applyProcessSettings(app: AppSpec): void {
  if (app.environment && Object.keys(app.environment).length > 0) {
    // A JSON string literal is also a valid Python string literal.
    const json = JSON.stringify(JSON.stringify(app.environment));
    pyodide.runPython(`import json, os; os.environ.update(json.loads(${json}))`);
  }
  if (app.home) pyodide.runPython(`import os; os.chdir(${JSON.stringify(app.home)})`);
  // Emscripten sets PWD to "/", whatever the working folder is.
  if (!app.environment?.PWD) pyodide.runPython(`import os; os.environ["PWD"] = os.getcwd()`);
}

function preloadApplication(adapter: Record<string, PyProxyCallable>): void {
  try {
    adapter.load_application();
    // The pool checks --memory-limit against the memory of a ready isolate.
    reportMemory();
    post({ type: "loaded" });
  } catch (error) {
    reportMemory();
    log("error", `failed to import the application at start: ${error}`);
    post({ type: "loaded", error: String(error) });
  } finally {
    stdoutLog.flush();
    stderrLog.flush();
  }
}

/**
 * Serves requests from the inbox for up to INBOX_SLICE_MS, then lets the
 * event loop run once. Returns at once, without a timer, when the next
 * request is a posted message still in the event loop's queue: its handler
 * calls this again.
 */
function serveInbox(): void {
  clearTimeout(inboxTimer);
  inboxTimer = undefined;
  if (!inbox || broken) return;
  const until = performance.now() + INBOX_SLICE_MS;
  for (let left = INBOX_SLICE_MS; left > 0 && !broken; left = until - performance.now()) {
    const entry = inbox.take(left);
    if (entry === null) break;
    if (entry === "mail") {
      mailEntries += 1;
      if (mailEntries > postedRequests) return;
      continue;
    }
    runRequest(entry, new RequestControl(settings.controlTable!, entry.controlSlot), null);
  }
  inboxTimer = setTimeout(serveInbox, 0);
}

function runRequest(request: InboxRequest, control: RequestControl, ring: BodyRing | null): void {
  // The pool posts a second request while one runs, and takes it back for
  // another isolate that became free first; then this isolate skips it.
  if (broken || !control.claim(request.ticket)) return;
  current = { id: request.requestId, control, ring };
  try {
    const body = request.body?.length ? request.body : undefined;
    handle(request.method, request.environ, body, ring !== null, request.requestId);
  } catch (error) {
    // handle() catches everything Python raises; reaching this means the
    // interpreter itself is broken (out of memory, a fatal error).
    broken = true;
    const hint = /Maximum call stack size exceeded/.test(String(error))
      ? " (recursion in C code, such as json.loads() of data nested thousands of levels " +
        "deep, ran out of stack before Python's recursion limit)"
      : "";
    post({ type: "end", requestId: request.requestId, error: `interpreter failure: ${error}` });
    post({
      type: "fatal",
      message: `the interpreter failed while serving a request: ${error}${hint}`,
    });
  } finally {
    stdoutLog.flush();
    stderrLog.flush();
    current = null;
    control.finish();
  }
}

function runPostedRequest(message: RequestMessage): void {
  postedRequests += 1;
  const control = new RequestControl(message.control, message.controlSlot);
  runRequest(message, control, message.bodyRing ? new BodyRing(message.bodyRing) : null);
  serveInbox();
}

self.onmessage = async (event: MessageEvent<ToWorker>) => {
  const message = event.data;
  if (message.type === "request") {
    runPostedRequest(message);
    return;
  }
  if (message.type === "build-snapshot") {
    await buildSnapshot(message, post);
    return;
  }
  settings = message;
  try {
    await loadInterpreter(message);
  } catch (error) {
    post({ type: "fatal", message: `Pyodide failed to start: ${describeError(error)}` });
    return;
  }
  if (message.inbox) {
    inbox = new RequestInbox(message.inbox);
    serveInbox();
  }
};
