/**
 * Entry of an isolate: one Web Worker running one Pyodide interpreter that
 * serves one WSGI request at a time.
 *
 * The pool starts this worker with Deno permissions that allow reading only
 * Pyodide's files and the application's folders; nothing else (no write, net,
 * run, env or ffi). The host folders are mounted into Pyodide's file system
 * at their own paths, so `__file__`, tracebacks and `open()` show real paths.
 */

/// <reference lib="deno.worker" />

import adapterSource from "./adapter.py" with { type: "text" };
import { BodyRing, RequestControl } from "./channel.ts";
import type { FromWorker, InitMessage, RequestMessage, ToWorker } from "./protocol.ts";
import type { PythonVersion } from "../supervisor/app_spec.ts";

/**
 * Literal imports (not a computed specifier) so that `deno compile` embeds
 * both Pyodide packages and the bundle leaves them to Deno.
 */
const PYODIDE_MODULES: Record<PythonVersion, () => Promise<{ loadPyodide: LoadPyodide }>> = {
  "3.12": () => import("npm:pyodide@0.27.8"),
  "3.14": () => import("npm:pyodide@314.0.8"),
};
type LoadPyodide = (options: Record<string, unknown>) => Promise<unknown>;

/** The subset of Pyodide's API this worker uses; both pinned versions provide it. */
interface Pyodide {
  version: string;
  FS: EmscriptenFS;
  runPython(code: string): unknown;
  pyimport(name: string): PyProxyCallable & Record<string, PyProxyCallable>;
  registerJsModule(name: string, module: object): void;
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

let pyodide: Pyodide;
let settings: InitMessage;
let handle: PyProxyCallable;
let current: CurrentRequest | null = null;

function post(message: FromWorker, transfer: Transferable[] = []): void {
  self.postMessage(message, transfer);
}

function log(level: "debug" | "info" | "warning" | "error", message: string): void {
  post({ type: "log", level, message, requestId: current?.id });
}

/** Copies a Python bytes object out of the wasm heap. */
function copyBytes(proxy: BytesProxy): Uint8Array<ArrayBuffer> {
  const buffer = proxy.getBuffer("u8");
  try {
    return new Uint8Array(buffer.data);
  } finally {
    buffer.release();
  }
}

function requireRequest(): CurrentRequest {
  if (!current) throw new Error("no request is running in this isolate");
  return current;
}

/** Functions the Python adapter imports as `_wsgirun_host`. */
const host = {
  start(status: number, headersJson: string, body: BytesProxy | undefined, complete: boolean) {
    const request = requireRequest();
    const headers = JSON.parse(headersJson) as string[];
    const bytes = body ? copyBytes(body) : undefined;
    post(
      { type: "start", requestId: request.id, status, headers, body: bytes, complete },
      bytes ? [bytes.buffer] : [],
    );
  },

  send(chunk: BytesProxy) {
    const request = requireRequest();
    const bytes = copyBytes(chunk);
    request.control.reserve(bytes.length, settings.responseWindow);
    post({ type: "body", requestId: request.id, chunk: bytes }, [bytes.buffer]);
  },

  send_file(path: string, offset: number, length: number) {
    const request = requireRequest();
    post({ type: "file", requestId: request.id, path, offset, length });
  },

  finish(error: string | undefined) {
    const request = requireRequest();
    post({ type: "end", requestId: request.id, error: error ?? undefined });
  },

  read(size: number): Uint8Array | undefined {
    const request = requireRequest();
    if (!request.ring) return undefined;
    return request.ring.readSync(size, request.control);
  },

  cancelled(): boolean {
    return current?.control.cancelled ?? false;
  },

  log(level: "debug" | "info" | "warning" | "error", message: string) {
    log(level, message);
  },

  /** Maps a path on a host mount back to the host; undefined for other paths. */
  host_path(path: string): string | undefined {
    try {
      const { node } = pyodide.FS.lookupPath(path, { follow: true });
      const mount = node.mount;
      if (mount.type !== pyodide.FS.filesystems.NODEFS || !mount.opts.root) return undefined;
      return mount.opts.root + path.slice(mount.mountpoint.length);
    } catch {
      return undefined;
    }
  },
};

/**
 * Mounts each host folder at its own path. A folder inside one that is
 * already mounted needs no mount of its own.
 */
function mountFolders(folders: string[]): void {
  const sorted = [...new Set(folders)].sort((a, b) => a.length - b.length);
  const mounted: string[] = [];
  for (const folder of sorted) {
    if (mounted.some((parent) => folder === parent || folder.startsWith(parent + "/"))) continue;
    pyodide.FS.mkdirTree(folder);
    pyodide.FS.mount(pyodide.FS.filesystems.NODEFS, { root: folder }, folder);
    mounted.push(folder);
  }
}

async function loadInterpreter(message: InitMessage): Promise<void> {
  const started = performance.now();
  const { loadPyodide } = await PYODIDE_MODULES[message.app.python]();
  pyodide = await loadPyodide({
    // The default reads from the server's terminal; input() should raise EOFError.
    stdin: () => undefined,
    stdout: (line: string) => log("info", line),
    stderr: (line: string) => log("warning", line),
  }) as Pyodide;

  mountFolders(message.app.pythonPath);
  pyodide.registerJsModule("_wsgirun_host", host);
  pyodide.FS.mkdirTree("/lib/wsgirun");
  pyodide.FS.writeFile("/lib/wsgirun/_wsgirun_adapter.py", adapterSource);
  pyodide.runPython("import sys; sys.path.insert(0, '/lib/wsgirun')");

  const adapter = pyodide.pyimport("_wsgirun_adapter");
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

  const pythonVersion = String(pyodide.runPython("import sys; sys.version.split()[0]"));
  post({
    type: "ready",
    pythonVersion,
    pyodideVersion: pyodide.version,
    loadMs: Math.round(performance.now() - started),
  });

  if (app.preload) preloadApplication(adapter);
}

function preloadApplication(adapter: Record<string, PyProxyCallable>): void {
  try {
    adapter.load_application();
  } catch (error) {
    log("error", `failed to import the application at start; requests will retry: ${error}`);
  }
}

function runRequest(message: RequestMessage): void {
  current = {
    id: message.requestId,
    control: new RequestControl(message.control),
    ring: message.bodyRing ? new BodyRing(message.bodyRing) : null,
  };
  try {
    handle(message.method, message.environ, message.body ?? undefined, message.requestId);
  } catch (error) {
    // handle() catches everything Python raises; reaching this means the
    // interpreter itself is broken (out of memory, a fatal error).
    post({ type: "end", requestId: message.requestId, error: `interpreter failure: ${error}` });
    post({ type: "fatal", message: `the interpreter failed while serving a request: ${error}` });
  } finally {
    current = null;
  }
}

self.onmessage = async (event: MessageEvent<ToWorker>) => {
  const message = event.data;
  if (message.type === "request") {
    runRequest(message);
    return;
  }
  settings = message;
  try {
    await loadInterpreter(message);
  } catch (error) {
    post({ type: "fatal", message: `Pyodide failed to start: ${error}` });
  }
};
