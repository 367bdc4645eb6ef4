/**
 * Gives an isolate's Python what Pyodide's browser build lacks. The host
 * backs outbound TCP and TLS, a `sqlite3` that locks for real, file locks
 * for `fcntl`, and `pwd`, `grp` and `resource`. The isolate also gets the
 * host's time zone data, writable folders, and clear errors for threads,
 * subprocesses and foreign C extensions.
 *
 * {@linkcode installHostModules} does all of it in one call right after
 * Pyodide is loaded, or after a memory snapshot is restored: it registers
 * the JavaScript modules, writes the Python files of wasm/python/ into the
 * isolate and mounts the folders. It relies on nothing done before it.
 */

import compatSource from "./python/_wsgirun_compat.py" with { type: "text" };
import socketSource from "./python/_wsgirun_socket.py" with { type: "text" };
import sslSource from "./python/ssl.py" with { type: "text" };
import fcntlSource from "./python/fcntl.py" with { type: "text" };
import pwdSource from "./python/pwd.py" with { type: "text" };
import grpSource from "./python/grp.py" with { type: "text" };
import resourceSource from "./python/resource.py" with { type: "text" };
import sqliteInitSource from "./python/sqlite3/__init__.py" with { type: "text" };
import sqliteDbapiSource from "./python/sqlite3/dbapi2.py" with { type: "text" };
import { type LogFunction, NetModule } from "./host_socket.ts";
import { type EmscriptenFs, PosixModule } from "./host_posix.ts";
import { SqliteModule, sqliteVersion } from "./host_sqlite.ts";
import { CryptoModule } from "./host_crypto.ts";
import { ZONEINFO_FOLDER } from "./host_paths.ts";
import { type GuardedModule, guardHostFileSystem } from "./host_fs.ts";
import type { AppSpec } from "../supervisor/app_spec.ts";
import type { ProcessIdentity } from "./protocol.ts";

/** Folder of the isolate's file system that contains the Python files; first on sys.path. */
export const SHIM_FOLDER = "/lib/wsgirun";

const SHIM_FILES: Record<string, string> = {
  "_wsgirun_compat.py": compatSource,
  "_wsgirun_socket.py": socketSource,
  "ssl.py": sslSource,
  "fcntl.py": fcntlSource,
  "pwd.py": pwdSource,
  "grp.py": grpSource,
  "resource.py": resourceSource,
  "sqlite3/__init__.py": sqliteInitSource,
  "sqlite3/dbapi2.py": sqliteDbapiSource,
};

/**
 * Text that changes whenever the Python files installed into isolates
 * change: part of the key of application snapshots, which contain them.
 */
export const HOST_MODULES_KEY: string = Object.entries(SHIM_FILES).flat().join("\0");

/** The parts of Pyodide's API the install uses; both pinned versions have them. */
export interface PyodideForHost {
  FS: EmscriptenFs & {
    mkdirTree(path: string): void;
    writeFile(path: string, data: string): void;
    mount(type: unknown, options: { root: string }, mountpoint: string): void;
    lookupPath(path: string, options?: { follow?: boolean }): {
      /** The path with the symbolic links on it resolved. */
      path: string;
      node: { mount: { type: unknown; mountpoint: string; opts: { root?: string } } };
    };
  };
  runPython(code: string): unknown;
  pyimport(name: string): Record<string, (...args: unknown[]) => unknown> & { destroy(): void };
  registerJsModule(name: string, module: object): void;
  _module: { HEAPU8: Uint8Array; ERRNO_CODES: Record<string, number> };
}

export interface HostModuleSettings {
  app: AppSpec;
  /** The values of os.getuid() and os.getgid(); 0 for both when null. */
  identity: ProcessIdentity | null;
  /** Writes one line to the server's error log, tagged with the current request. */
  log: LogFunction;
  /** The isolate's memory cap (memory-max), or 0 for none. */
  memoryMaxBytes?: number;
}

/** The host modules of one isolate, for the worker to shut down. */
export interface HostModules {
  /** Closes the isolate's connections and databases. */
  close(): void;
}

/**
 * Installs the host modules into a loaded Pyodide. Call it before the
 * application is imported, and again after every snapshot restore.
 *
 * @example Install after loading Pyodide
 * ```ts
 * const pyodide = await loadPyodide();
 * const host = installHostModules(pyodide, { app, log });
 * // ... import and run the application ...
 * host.close();
 * ```
 */
export function installHostModules(
  pyodide: PyodideForHost,
  settings: HostModuleSettings,
): HostModules {
  guardHostFileSystem(
    { FS: pyodide.FS as unknown as GuardedModule["FS"], ERRNO_CODES: pyodide._module.ERRNO_CODES },
    settings.app.writePaths ?? [],
    settings.log,
    settings.identity?.umask,
  );
  const net = new NetModule({
    appName: settings.app.name,
    allowNet: settings.app.allowNet ?? [],
    log: settings.log,
  });
  const posix = new PosixModule(
    pyodide.FS,
    () => pyodide._module.HEAPU8.byteLength,
    settings.memoryMaxBytes,
  );
  const sqlite = new SqliteModule({ fs: pyodide.FS, log: settings.log });
  pyodide.registerJsModule("_wsgirun_net", bindMethods(net));
  pyodide.registerJsModule("_wsgirun_posix", bindMethods(posix));
  pyodide.registerJsModule("_wsgirun_sqlite", bindMethods(sqlite));
  pyodide.registerJsModule("_wsgirun_crypto", bindMethods(new CryptoModule()));
  pyodide.registerJsModule("_wsgirun_log", { log: settings.log });
  installHostPython(pyodide, settings.app, settings.identity);

  return {
    close() {
      sqlite.closeAll();
      net.terminate();
    },
  };
}

/**
 * Installs the Python half of {@linkcode installHostModules}: files, folders
 * and the replaced modules, without the JavaScript modules behind them. A memory
 * snapshot cannot contain JavaScript modules, so the snapshot builder calls
 * this before it imports the application, and each isolate calls
 * `installHostModules` after the restore.
 */
export function installHostPython(
  pyodide: PyodideForHost,
  app: AppSpec,
  identity: ProcessIdentity | null,
): void {
  writeShimFiles(pyodide);
  mountWritableFolders(pyodide, app.writePaths ?? [], app.mountRoots ?? {});
  mountZoneinfo(pyodide);

  const folder = JSON.stringify(SHIM_FOLDER);
  pyodide.runPython(`import sys\nif ${folder} not in sys.path: sys.path.insert(0, ${folder})`);
  const compat = pyodide.pyimport("_wsgirun_compat");
  try {
    compat.install(identity?.uid ?? 0, identity?.gid ?? 0, identity?.pid ?? null);
  } finally {
    compat.destroy();
  }
}

function writeShimFiles(pyodide: PyodideForHost): void {
  // The version is a constant in Python, because Django reads it while it is
  // imported, before the host module may be used (see _wsgirun_compat.py).
  const version = `SQLITE_VERSION = ${JSON.stringify(sqliteVersion())}\n`;
  const files = { ...SHIM_FILES, "sqlite3/_host_version.py": version };
  for (const [name, source] of Object.entries(files)) {
    const path = `${SHIM_FOLDER}/${name}`;
    pyodide.FS.mkdirTree(path.slice(0, path.lastIndexOf("/")));
    pyodide.FS.writeFile(path, source);
  }
}

/**
 * Reports whether `folder` already shows the host folder `hostPath` through
 * a host mount, following symbolic links on the way.
 */
function isHostMounted(pyodide: PyodideForHost, folder: string, hostPath: string): boolean {
  try {
    const { path, node } = pyodide.FS.lookupPath(folder, { follow: true });
    const { mount } = node;
    return mount.type === pyodide.FS.filesystems.NODEFS &&
      mount.opts.root + path.slice(mount.mountpoint.length) === hostPath;
  } catch {
    return false;
  }
}

/**
 * Mounts each writable folder at its own path, unless a folder mounted
 * before (an application folder) already shows it. The worker's write
 * permission, not the mount, is what allows writing. `roots` contains the
 * pinned real path of each folder (see AppSpec.mountRoots).
 */
function mountWritableFolders(
  pyodide: PyodideForHost,
  folders: readonly string[],
  roots: Record<string, string>,
): void {
  const sorted = [...new Set(folders)].sort((a, b) => a.length - b.length);
  for (const folder of sorted) {
    const hostPath = roots[folder] ?? folder;
    if (isHostMounted(pyodide, folder, hostPath)) continue;
    pyodide.FS.mkdirTree(folder);
    pyodide.FS.mount(pyodide.FS.filesystems.NODEFS, { root: hostPath }, folder);
  }
}

/**
 * Shows the host's time zone database at its usual path, read-only, when the
 * worker may read it (supervisor/isolate.ts grants that with host_paths.ts).
 */
function mountZoneinfo(pyodide: PyodideForHost): void {
  let hostFolder: string;
  try {
    hostFolder = Deno.realPathSync(ZONEINFO_FOLDER);
  } catch {
    // No database on this host, or no permission to read it: zoneinfo finds no zones.
    return;
  }
  if (isHostMounted(pyodide, ZONEINFO_FOLDER, hostFolder)) return;
  pyodide.FS.mkdirTree(ZONEINFO_FOLDER);
  pyodide.FS.mount(pyodide.FS.filesystems.NODEFS, { root: hostFolder }, ZONEINFO_FOLDER);
}

/**
 * Copies an object's methods into a plain object with `this` bound, so that
 * Pyodide calls them as functions of a module.
 */
function bindMethods(instance: object): Record<string, unknown> {
  const module: Record<string, unknown> = {};
  const prototype = Object.getPrototypeOf(instance);
  for (const name of Object.getOwnPropertyNames(prototype)) {
    const value = (instance as Record<string, unknown>)[name];
    if (name !== "constructor" && typeof value === "function") {
      module[name] = value.bind(instance);
    }
  }
  return module;
}
