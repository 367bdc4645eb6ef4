/**
 * Loads Pyodide inside a worker, from a memory snapshot and a WebAssembly
 * module compiled once by the main thread when they are given.
 *
 * Pyodide reads and instantiates `pyodide.asm.wasm` itself and offers no
 * option to pass a compiled module, so the worker's `WebAssembly.instantiate`
 * is wrapped: the one call that instantiates the interpreter's bytes gets the
 * shared module instead. The same wrapper fixes a restore bug of Pyodide
 * 314.0.8: it sizes memory from the snapshot, but the module exports its own
 * memory of 30 MiB, so a snapshot whose heap grew past that fails with
 * "RangeError: offset is out of bounds" unless the memory is grown first.
 *
 * The interpreter's module factory is wrapped too, to save memory in each
 * isolate. Pyodide restores a snapshot by copying the whole heap image, and
 * about half of it is zero pages that a fresh memory already reads as zero.
 * Writing them commits memory for nothing, so the wrapper writes only the
 * pages that contain data (see snapshot_pages.ts). It also drops the closure
 * that instantiated the module, which keeps the 10 MB of wasm bytes Pyodide
 * read for it.
 */

import type { PythonVersion } from "../supervisor/app_spec.ts";
import { snapshotHeaderBytes, writeDataPages } from "./snapshot_pages.ts";

/**
 * Literal imports (not a computed specifier) so that `deno compile` embeds
 * both Pyodide packages and the bundle leaves them to Deno. The specifiers
 * equal PYODIDE_SPECIFIER in supervisor/app_spec.ts.
 */
const PYODIDE_MODULES: Record<PythonVersion, () => Promise<{ loadPyodide: LoadPyodide }>> = {
  "3.12": () => import("npm:pyodide@0.27.8"),
  "3.14": () => import("npm:pyodide@314.0.8"),
};
type LoadPyodide = (options: Record<string, unknown>) => Promise<unknown>;

/** Interpreter modules are megabytes; Pyodide's other helper modules are tiny. */
const INTERPRETER_MIN_BYTES = 1_000_000;
const WASM_PAGE_BYTES = 65536;

export interface LoadOptions {
  python: PythonVersion;
  /** A memory snapshot to restore instead of starting the interpreter from scratch. */
  snapshot?: Uint8Array | null;
  /** Page map of the snapshot's heap image (see snapshot_pages.ts). */
  snapshotPages?: Uint8Array | null;
  /** `pyodide.asm.wasm` compiled by the main thread. */
  wasmModule?: WebAssembly.Module | null;
  /** Keep what `makeMemorySnapshot()` needs (only for building snapshots). */
  makeSnapshot?: boolean;
  /** Bytes the interpreter's wasm memory may not grow past; 0 for the 4 GiB of wasm32. */
  memoryMaxBytes?: number;
  /** Called once, the first time the interpreter requests memory past memoryMaxBytes. */
  onMemoryCapReached?: (requestedBytes: number) => void;
  stdout?: (line: string) => void;
  stderr?: (line: string) => void;
}

/** The parts of an Emscripten module object that the factory wrapper touches. */
interface EmscriptenModule {
  HEAP8: Int8Array;
  API: { restoreSnapshot(snapshot: Uint8Array): unknown };
  instantiateWasm?: unknown;
}
type ModuleFactory = (settings: Record<string, unknown>) => Promise<EmscriptenModule>;

/** Imports of the interpreter scripts, literal for the same reason as PYODIDE_MODULES. */
const INTERPRETER_SCRIPTS: Record<PythonVersion, () => Promise<{ default?: unknown }>> = {
  "3.12": () => import("npm:pyodide@0.27.8/pyodide.asm.js"),
  "3.14": () => import("npm:pyodide@314.0.8/pyodide.asm.mjs"),
};

/**
 * Installs the wrapped interpreter factory where each Pyodide version looks
 * for it: 314.0.8 takes a `createPyodideModule` option; 0.27.8 calls a global
 * `_createPyodideModule` when one exists instead of loading its script again.
 */
const FACTORY_INSTALLERS: Record<PythonVersion, () => Promise<Record<string, unknown>>> = {
  "3.12": async () => {
    const scope = globalThis as { _createPyodideModule?: ModuleFactory };
    if (!wrappedFactories.has(scope._createPyodideModule!)) {
      await INTERPRETER_SCRIPTS["3.12"]();
      scope._createPyodideModule = wrapFactory(scope._createPyodideModule!);
    }
    return {};
  },
  "3.14": async () => {
    const { default: factory } = await INTERPRETER_SCRIPTS["3.14"]();
    return { createPyodideModule: wrapFactory(factory as ModuleFactory) };
  },
};

/**
 * Starts importing Pyodide's scripts for `python`, so that a worker waiting
 * for its snapshot has them parsed when loadPyodideFor() needs them. An
 * import that fails here fails again there, where the error is reported.
 */
export function startImports(python: string): void {
  if (!Object.hasOwn(PYODIDE_MODULES, python)) return;
  PYODIDE_MODULES[python as PythonVersion]().catch(() => {});
  INTERPRETER_SCRIPTS[python as PythonVersion]().catch(() => {});
}

const wrappedFactories = new WeakSet<ModuleFactory>();

/** The page map for the restore that the next factory call performs. */
let nextRestorePages: Uint8Array | null = null;
/** The memory of the interpreter instantiated last (exported by 314.0.8, imported by 0.27.8). */
let interpreterMemory: WebAssembly.Memory | null = null;

function wrapFactory(factory: ModuleFactory): ModuleFactory {
  const wrapped: ModuleFactory = async (settings) => {
    const pages = nextRestorePages;
    nextRestorePages = null;
    const module = await factory(settings);
    // This closure keeps the wasm bytes Pyodide read, which the shared module replaced.
    settings.instantiateWasm = undefined;
    module.instantiateWasm = undefined;
    if (pages) {
      const restore = module.API.restoreSnapshot.bind(module.API);
      module.API.restoreSnapshot = (snapshot) => {
        const headerBytes = snapshotHeaderBytes(snapshot);
        if (!interpreterMemory) {
          throw new Error(
            "cannot restore the snapshot: the interpreter's wasm memory was not found",
          );
        }
        writeDataPages(interpreterMemory, snapshot.subarray(headerBytes), pages);
        // Pyodide checks the header and copies the image after it, which is now empty.
        return restore(snapshot.subarray(0, headerBytes));
      };
    }
    return module;
  };
  wrappedFactories.add(wrapped);
  return wrapped;
}

/** Bytes of linear memory a snapshot needs: its length minus the header before the heap image. */
function snapshotHeapEnd(snapshot: Uint8Array): number {
  return snapshot.byteLength - snapshotHeaderBytes(snapshot);
}

function findExportedMemory(instance: WebAssembly.Instance): WebAssembly.Memory | undefined {
  for (const value of Object.values(instance.exports)) {
    if (value instanceof WebAssembly.Memory) return value;
  }
  return undefined;
}

function findImportedMemory(imports: WebAssembly.Imports | undefined): WebAssembly.Memory | null {
  for (const namespace of Object.values(imports ?? {})) {
    for (const value of Object.values(namespace)) {
      if (value instanceof WebAssembly.Memory) return value;
    }
  }
  return null;
}

/**
 * Wraps `WebAssembly.instantiate` for the next interpreter instantiation.
 * Only memory the module exports is grown: Pyodide 0.27.8 imports its memory
 * and sizes it from the snapshot correctly.
 */
function hookInstantiate(
  wasmModule: WebAssembly.Module | null | undefined,
  heapEnd: number,
  cap: MemoryCap,
): () => void {
  const original = WebAssembly.instantiate;
  const hooked = async (
    source: BufferSource | WebAssembly.Module,
    imports?: WebAssembly.Imports,
  ) => {
    const isInterpreter = !(source instanceof WebAssembly.Module) &&
      source.byteLength >= INTERPRETER_MIN_BYTES;
    if (!isInterpreter) return original(source as BufferSource, imports);

    const module = wasmModule ?? await WebAssembly.compile(source as BufferSource);
    const instance = await original(module, imports);
    const memory = findExportedMemory(instance);
    if (memory && heapEnd > memory.buffer.byteLength) {
      memory.grow(Math.ceil((heapEnd - memory.buffer.byteLength) / WASM_PAGE_BYTES));
    }
    interpreterMemory = memory ?? findImportedMemory(imports);
    if (interpreterMemory && cap.bytes > 0) capMemory(interpreterMemory, cap);
    return { instance, module };
  };
  (WebAssembly as { instantiate: unknown }).instantiate = hooked;
  return () => {
    (WebAssembly as { instantiate: unknown }).instantiate = original;
  };
}

interface MemoryCap {
  bytes: number;
  onCapReached?: (requestedBytes: number) => void;
}

/**
 * Keeps `memory` at or below `cap.bytes`. Emscripten grows the heap only
 * through the memory object's grow(), in JavaScript, and takes an exception
 * there as a failed allocation: malloc() returns NULL and Python raises
 * MemoryError. The memory object gets its own grow() that refuses to pass
 * the cap, so one request cannot take the machine's memory.
 */
function capMemory(memory: WebAssembly.Memory, cap: MemoryCap): void {
  const grow = WebAssembly.Memory.prototype.grow;
  let capReached = false;
  Object.defineProperty(memory, "grow", {
    value: (delta: number) => {
      const requestedBytes = memory.buffer.byteLength + delta * WASM_PAGE_BYTES;
      if (requestedBytes > cap.bytes) {
        if (!capReached) cap.onCapReached?.(requestedBytes);
        capReached = true;
        throw new RangeError(`wasm memory may not grow past ${cap.bytes} bytes (memory-max)`);
      }
      return grow.call(memory, delta);
    },
  });
}

function mebibytes(bytes: number): string {
  return `${Math.round(bytes / 1024 / 1024)} MiB`;
}

export async function loadPyodideFor(options: LoadOptions): Promise<unknown> {
  const { loadPyodide } = await PYODIDE_MODULES[options.python]();
  const factoryOption = await FACTORY_INSTALLERS[options.python]();
  nextRestorePages = options.snapshot && options.snapshotPages ? options.snapshotPages : null;
  const heapEnd = options.snapshot ? snapshotHeapEnd(options.snapshot) : 0;
  const memoryMax = options.memoryMaxBytes ?? 0;
  // Pyodide only logs an error thrown while it instantiates the module, and
  // then never settles. The pool keeps the snapshot on this message (MEMORY_MAX_TOO_LOW).
  if (memoryMax > 0 && heapEnd > memoryMax) {
    throw new Error(
      `the snapshot needs ${mebibytes(heapEnd)} of wasm memory at start, more than the ` +
        `memory-max of ${mebibytes(memoryMax)}; raise memory-max`,
    );
  }
  const restore = hookInstantiate(options.wasmModule, heapEnd, {
    bytes: memoryMax,
    onCapReached: options.onMemoryCapReached,
  });
  try {
    return await loadPyodide({
      // The default reads from the server's terminal; input() should raise EOFError.
      stdin: () => undefined,
      stdout: options.stdout,
      stderr: options.stderr,
      ...(options.snapshot ? { _loadSnapshot: options.snapshot } : {}),
      ...(options.makeSnapshot ? { _makeSnapshot: true } : {}),
      ...factoryOption,
    });
  } finally {
    restore();
  }
}

/** Returns the size of the wasm memory of the interpreter loaded last, in 64 KiB pages, or 0 before one is loaded. */
export function interpreterMemoryPages(): number {
  return (interpreterMemory?.buffer.byteLength ?? 0) / WASM_PAGE_BYTES;
}

/** The part of Emscripten's file system API used to mount host folders. */
export interface MountableFS {
  mkdirTree(path: string): void;
  mount(type: unknown, options: { root: string }, mountpoint: string): void;
  filesystems: { NODEFS: unknown };
}

/**
 * Mounts each host folder at its own path, so `__file__`, tracebacks and
 * `open()` show real paths. A folder inside one that is already mounted
 * needs no mount of its own, unless its path passes a symbolic link there,
 * such as an upload folder linked into a release. A lookup follows that link
 * to the real path, so the folder's real path is mounted at that real path.
 */
export function mountHostFolders(
  fs: MountableFS,
  folders: string[],
  roots: Record<string, string> = {},
): void {
  const sorted = [...new Set(folders)].sort((a, b) => a.length - b.length);
  const mounted: { point: string; root: string }[] = [];
  /** Returns the host path that the mounts made so far show at `path`, if any. */
  const hostPathAt = (path: string) => {
    // The deepest mount that contains the path is the one a lookup ends in.
    const parents = mounted.filter(({ point }) => path === point || path.startsWith(point + "/"));
    const parent = parents.sort((a, b) => b.point.length - a.point.length)[0];
    return parent && parent.root + path.slice(parent.point.length);
  };
  for (const folder of sorted) {
    // The folder's pinned real path: a folder behind a symbolic link
    // (current -> releases/42) stays one release for the life of the isolate.
    const root = roots[folder] ?? folder;
    const inside = hostPathAt(folder);
    if (inside === root) continue;
    const point = inside === undefined ? folder : root;
    if (point !== folder && hostPathAt(point) === root) continue;
    try {
      fs.mkdirTree(point);
      fs.mount(fs.filesystems.NODEFS, { root }, point);
    } catch (error) {
      // Emscripten's error carries only a number, so name the folder here.
      throw new Error(
        `cannot mount ${folder} in the interpreter: ${describeError(error)}. ` +
          "Check that the folder exists and that the server's account can read it",
      );
    }
    mounted.push({ point, root });
  }
}

/** Emscripten's errno numbers (WASI's) that a host folder can produce, with their names. */
const EMSCRIPTEN_ERRNO: Record<number, string> = {
  2: "EACCES, permission denied",
  20: "EEXIST, file exists",
  31: "EISDIR, is a directory",
  44: "ENOENT, no such file or directory",
  54: "ENOTDIR, not a directory",
  63: "EPERM, operation not permitted",
};

/**
 * Describes a thrown value for the log. Emscripten's file system throws
 * objects that are no Error, which a template string shows as [object Object].
 */
export function describeError(error: unknown): string {
  const isObject = typeof error === "object" && error !== null;
  const errno = isObject ? (error as { errno?: unknown }).errno : undefined;
  if (typeof errno === "number") {
    return `${EMSCRIPTEN_ERRNO[errno] ?? "error"} (Emscripten errno ${errno})`;
  }
  if (error instanceof Error) return String(error);
  if (isObject) {
    try {
      return JSON.stringify(error);
    } catch {
      // Not serializable: fall back to String() below.
    }
  }
  return String(error);
}
