/**
 * Builds memory snapshots inside a worker that has the same permissions as
 * the isolates it prepares.
 *
 * A runtime snapshot contains a started interpreter with the standard library
 * modules every request needs. An application snapshot is taken on top of
 * it after the application was imported, so new isolates skip the import
 * (a cold Flask import takes over a second). Two things cannot be in a
 * snapshot: references to JavaScript objects (Pyodide cannot serialize
 * them) and open files (the file table lives in JavaScript and is lost).
 * An application that keeps either at import time gets no snapshot.
 */

import adapterSource from "./adapter.py" with { type: "text" };
import appLoaderSource from "./app_loader.py" with { type: "text" };
import { appReadPaths } from "../supervisor/app_spec.ts";
import type { BuildSnapshotMessage, FromWorker } from "./protocol.ts";
import {
  describeError,
  loadPyodideFor,
  type MountableFS,
  mountHostFolders,
} from "./pyodide_loader.ts";
import { StreamLog } from "./stream_log.ts";
import { installHostPython, type PyodideForHost, SHIM_FOLDER } from "./host_modules.ts";

interface SnapshotPyodide {
  FS: MountableFS & {
    writeFile(path: string, data: string): void;
    streams: unknown[];
  };
  runPython(code: string): unknown;
  pyimport(name: string): Record<string, (...args: unknown[]) => unknown>;
  makeMemorySnapshot(): Uint8Array<ArrayBuffer>;
  setInterruptBuffer(buffer: Int32Array | undefined): void;
  setStdout(options: { write(buffer: Uint8Array): number }): void;
  setStderr(options: { write(buffer: Uint8Array): number }): void;
}

/**
 * Python that lists, under the host folders in `_wsgirun_folders`, the
 * files of every imported module (the archive for a module from a zip file)
 * and the folders an import searches: those on `sys.path` and those of the
 * imported files.
 */
const LIST_IMPORTS = `
def _wsgirun_list_imports():
    import sys, json, os
    folders = tuple(f.rstrip("/") + "/" for f in json.loads(_wsgirun_folders))
    def origin(module):
        archive = getattr(getattr(module, "__loader__", None), "archive", None)
        return archive if isinstance(archive, str) else getattr(module, "__file__", None)
    files = {
        path for path in map(origin, list(sys.modules.values()))
        if isinstance(path, str) and path.startswith(folders)
    }
    # "" and relative entries name the working folder (a daemon group's home).
    entries = [os.path.abspath(entry) for entry in sys.path if isinstance(entry, str)]
    searched = {
        entry.rstrip("/") for entry in entries if (entry.rstrip("/") + "/").startswith(folders)
    }
    searched.update(os.path.dirname(path) for path in files)
    return json.dumps({"files": sorted(files), "folders": sorted(searched)})
_wsgirun_list_imports()
`;

/**
 * Python that reseeds what a memory snapshot would otherwise give every
 * interpreter restored from it in the same state: the `random` module's
 * generator, and the name sequence of `tempfile`, which would make isolates
 * pick the same temporary file names. Generators an application created at
 * import keep the snapshot's state, and so does the seed of `hash()`, which
 * Python fixes when the interpreter starts.
 */
export const RESEED_PYTHON =
  'import sys\nif "random" in sys.modules: sys.modules["random"].seed()\n' +
  'if "tempfile" in sys.modules: sys.modules["tempfile"]._name_sequence = None';

/** Emscripten's stdin, stdout and stderr streams. */
const STANDARD_STREAMS = 3;

function openFileCount(pyodide: SnapshotPyodide): number {
  return pyodide.FS.streams.filter((stream) => stream).length - STANDARD_STREAMS;
}

/** The part of Pyodide's API that writeAdapterFiles uses. */
export interface AdapterTarget {
  FS: { mkdirTree(path: string): void; writeFile(path: string, data: string): void };
  runPython(code: string): unknown;
}

/**
 * Writes the request adapter and the application loader into SHIM_FOLDER and
 * puts that folder on sys.path. Isolates write them again after a restore,
 * because the file system is not part of a memory snapshot and tracebacks
 * read the files.
 */
export function writeAdapterFiles(pyodide: AdapterTarget): void {
  pyodide.FS.mkdirTree(SHIM_FOLDER);
  pyodide.FS.writeFile(`${SHIM_FOLDER}/_wsgirun_app_loader.py`, appLoaderSource);
  pyodide.FS.writeFile(`${SHIM_FOLDER}/_wsgirun_adapter.py`, adapterSource);
  const folder = JSON.stringify(SHIM_FOLDER);
  pyodide.runPython(`import sys\nif ${folder} not in sys.path: sys.path.insert(0, ${folder})`);
}

/**
 * Imports the request adapter, so that isolates restored from the snapshot
 * skip compiling it. Changes to what this file imports must raise
 * SNAPSHOT_CONTENT_VERSION.
 */
function importAdapter(pyodide: SnapshotPyodide): void {
  writeAdapterFiles(pyodide);
  pyodide.runPython("import _wsgirun_adapter");
}

/** Imports the application and returns what LIST_IMPORTS lists. */
function importApplication(
  pyodide: SnapshotPyodide,
  message: BuildSnapshotMessage,
): { files: string[]; folders: string[] } {
  const app = message.app!;
  // Values the application draws at import must differ between the
  // application snapshots built on one runtime snapshot.
  if (message.base) pyodide.runPython(RESEED_PYTHON);
  mountHostFolders(pyodide.FS, appReadPaths(app), app.mountRoots);
  // The application must import the host-backed sqlite3, socket and fcntl, as it does in isolates.
  installHostPython(pyodide as unknown as PyodideForHost, app, message.identity ?? null);
  importAdapter(pyodide);
  if (app.environment && Object.keys(app.environment).length > 0) {
    // Applications often read settings from the environment while they import.
    const json = JSON.stringify(JSON.stringify(app.environment));
    pyodide.runPython(`import json, os; os.environ.update(json.loads(${json}))`);
  }

  const loader = pyodide.pyimport("_wsgirun_app_loader");
  loader.configure(
    app.name,
    app.scriptPath ?? "",
    app.module ?? "",
    app.callable,
    app.pythonPath,
    true,
  );
  if (app.home) pyodide.runPython(`import os; os.chdir(${JSON.stringify(app.home)})`);
  loader.load_application();

  const open = openFileCount(pyodide);
  if (open > 0) {
    throw new Error(`the application keeps ${open} file(s) open after its import`);
  }
  const folders = JSON.stringify(JSON.stringify(appReadPaths(app)));
  pyodide.runPython(`_wsgirun_folders = ${folders}`);
  const listed = JSON.parse(String(pyodide.runPython(LIST_IMPORTS)));
  pyodide.runPython("del _wsgirun_folders, _wsgirun_list_imports");
  return listed;
}

/**
 * Takes the snapshot. Pyodide's own error for a JavaScript object that
 * Python still references names only its index, so it is explained here.
 */
function takeSnapshot(pyodide: SnapshotPyodide, app: boolean): Uint8Array<ArrayBuffer> {
  try {
    return pyodide.makeMemorySnapshot();
  } catch (error) {
    const text = error instanceof Error ? error.message : String(error);
    if (!app || !/serialize/i.test(text)) throw error;
    throw new Error(
      "the application keeps a reference to a JavaScript object after its import " +
        `(a js or pyodide.ffi value), which a snapshot cannot hold (${text})`,
    );
  }
}

/** Builds the snapshot that `message` requests and posts it (or the reason it failed). */
export async function buildSnapshot(
  message: BuildSnapshotMessage,
  post: (message: FromWorker, transfer?: Transferable[]) => void,
): Promise<void> {
  try {
    const pyodide = await loadPyodideFor({
      python: message.python,
      snapshot: message.base ? new Uint8Array(message.base) : null,
      wasmModule: message.wasmModule,
      makeSnapshot: true,
      stdout: (line) => post({ type: "log", level: "info", message: line }),
      stderr: (line) => post({ type: "log", level: "warning", message: line }),
    }) as SnapshotPyodide;
    // What the application prints while it imports is logged during the build.
    const stdout = new StreamLog((line) => post({ type: "log", level: "info", message: line }));
    const stderr = new StreamLog((line) => post({ type: "log", level: "warning", message: line }));
    pyodide.setStdout({ write: (bytes) => stdout.write(bytes) });
    pyodide.setStderr({ write: (bytes) => stderr.write(bytes) });

    // An import that never ends gets KeyboardInterrupt when the build times out.
    if (message.interrupt) pyodide.setInterruptBuffer(new Int32Array(message.interrupt));
    let imports = { files: [] as string[], folders: [] as string[] };
    try {
      if (message.app) {
        imports = importApplication(pyodide, message);
      } else {
        if (message.modules.length > 0) pyodide.runPython(`import ${message.modules.join(", ")}`);
        importAdapter(pyodide);
      }
    } finally {
      stdout.flush();
      stderr.flush();
    }
    // Pyodide keeps whether signals are checked in wasm memory, and the
    // interpreters restored from the snapshot set their own buffer.
    if (message.interrupt) pyodide.setInterruptBuffer(undefined);
    const bytes = takeSnapshot(pyodide, message.app !== undefined);
    post({ type: "snapshot", bytes, ...imports }, [bytes.buffer]);
  } catch (error) {
    // Emscripten's file system errors are no Error objects; describeError names them.
    post({
      type: "snapshot-failed",
      reason: error instanceof Error ? error.message : describeError(error),
    });
  }
}
