/**
 * Cost of wsgirun's Python adapter per request, measured inside Pyodide
 * without HTTP or a worker hop.
 *
 * Loads Pyodide 314.0.8 (Python 3.14) on the main thread and registers a
 * `_wsgirun_host` module whose functions do nothing. It then loads
 * wasm/app_loader.py and wasm/adapter.py as the isolate worker does and
 * times `handle()` for examples/hello/app.wsgi. The arguments are the ones
 * the worker passes for a GET request without a body.
 *
 * Usage: deno run --allow-read --allow-env bench/adapter_cost.ts [CALLS]   (default 5000)
 * Prints one line: "adapter: CALLS calls, X us per call (median of 5 rounds)".
 */

import { loadPyodide } from "npm:pyodide@314.0.8";

const DEFAULT_CALLS = 5000;
const ROUNDS = 5;
const WARM_UP_CALLS = 500;

interface Pyodide {
  FS: { mkdirTree(path: string): void; writeFile(path: string, data: string): void };
  runPython(code: string): unknown;
  pyimport(name: string): Record<string, (...args: unknown[]) => unknown>;
  registerJsModule(name: string, module: object): void;
}

/** Host functions with the signatures of wasm/isolate_worker.ts, doing nothing. */
const noOpHost = {
  start(_status: number, _headerLines: string, _body: unknown, _complete: boolean) {},
  send(_chunk: unknown) {},
  send_file(_path: string, _offset: number, _length: number) {},
  finish(_error: string | undefined) {},
  read(_size: number) {
    return undefined;
  },
  cancelled() {
    return false;
  },
  log(_level: string, _message: string) {},
  host_path(_path: string) {
    return undefined;
  },
};

/** Builds the environ JSON that the front sends for `GET /` from wrk. */
function helloEnviron(): string {
  return JSON.stringify({
    REQUEST_METHOD: "GET",
    SCRIPT_NAME: "",
    PATH_INFO: "/",
    QUERY_STRING: "",
    SERVER_NAME: "127.0.0.1",
    SERVER_PORT: "8000",
    SERVER_PROTOCOL: "HTTP/1.1",
    REMOTE_ADDR: "127.0.0.1",
    REMOTE_PORT: "40000",
    REQUEST_URI: "/",
    HTTP_HOST: "127.0.0.1:8000",
    "wsgi.url_scheme": "http",
  });
}

function parseCalls(text: string | undefined): number {
  if (text === undefined) return DEFAULT_CALLS;
  const calls = Number(text);
  if (!Number.isInteger(calls) || calls <= 0) {
    throw new Error(`CALLS is '${text}'; give a positive integer`);
  }
  return calls;
}

async function loadAdapter(root: URL): Promise<(...args: unknown[]) => unknown> {
  const pyodide = await loadPyodide() as unknown as Pyodide;
  pyodide.registerJsModule("_wsgirun_host", noOpHost);
  pyodide.FS.mkdirTree("/lib/wsgirun");
  pyodide.FS.mkdirTree("/app");
  const read = (path: string) => Deno.readTextFileSync(new URL(path, root));
  pyodide.FS.writeFile("/lib/wsgirun/_wsgirun_app_loader.py", read("wasm/app_loader.py"));
  pyodide.FS.writeFile("/lib/wsgirun/_wsgirun_adapter.py", read("wasm/adapter.py"));
  pyodide.FS.writeFile("/app/app.wsgi", read("examples/hello/app.wsgi"));
  pyodide.runPython("import sys; sys.path.insert(0, '/lib/wsgirun')");

  const adapter = pyodide.pyimport("_wsgirun_adapter");
  adapter.connect_host();
  adapter.configure("hello", "/app/app.wsgi", "", "application", [], true);
  return adapter.handle;
}

function timeCalls(
  handle: (...args: unknown[]) => unknown,
  environ: string,
  calls: number,
): number {
  const started = performance.now();
  for (let i = 0; i < calls; i++) handle("GET", environ, undefined, false, "r");
  return performance.now() - started;
}

async function main(): Promise<void> {
  const calls = parseCalls(Deno.args[0]);
  const handle = await loadAdapter(new URL("../", import.meta.url));
  const environ = helloEnviron();

  // The first calls import the script and warm Python's caches.
  timeCalls(handle, environ, WARM_UP_CALLS);
  const perCallUs: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    perCallUs.push(timeCalls(handle, environ, calls) * 1000 / calls);
  }
  perCallUs.sort((a, b) => a - b);
  const median = perCallUs[Math.floor(ROUNDS / 2)];
  console.log(
    `adapter: ${calls} calls, ${median.toFixed(1)} us per call (median of ${ROUNDS} rounds: ${
      perCallUs.map((us) => us.toFixed(1)).join(" ")
    })`,
  );
}

await main();
