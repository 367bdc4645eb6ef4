/**
 * What an isolate needs to know to load and run one WSGI application.
 *
 * The same object travels from the command line to the pool and into every
 * isolate's worker, so it contains plain data only (it is structured-cloned).
 */

import { resolve } from "node:path";
import { hostReadPaths } from "../wasm/host_paths.ts";

/** Python versions wsgirun can run, each backed by one pinned Pyodide release. */
export const PYTHON_VERSIONS = ["3.12", "3.14"] as const;
export type PythonVersion = typeof PYTHON_VERSIONS[number];

/**
 * The Pyodide npm package behind each Python version. wasm/isolate_worker.ts
 * imports the same specifiers as literals, so `deno compile` and the bundle
 * see them; keep the two lists equal.
 */
export const PYODIDE_SPECIFIER: Record<PythonVersion, string> = {
  "3.12": "npm:pyodide@0.27.8",
  "3.14": "npm:pyodide@314.0.8",
};

export interface AppSpec {
  /** Name used in log lines, for example the script's file name. */
  name: string;
  /**
   * Absolute path of a WSGI script file (mod_wsgi style). Unset when
   * `module` names the application instead.
   */
  scriptPath?: string;
  /** Dotted module name (gunicorn style `package.module:callable`). */
  module?: string;
  /** Name of the WSGI callable in the script or module. @default "application" */
  callable: string;
  python: PythonVersion;
  /**
   * Absolute host folders added to `sys.path`, in order. The script's own
   * folder (or the working folder for a module) comes first.
   */
  pythonPath: string[];
  /** Import the application when the isolate starts instead of on its first request. */
  preload: boolean;
  /**
   * What new isolates start from: "app" restores a memory snapshot taken
   * after the application was imported (where that is possible), "runtime"
   * one taken before, "off" loads Pyodide from scratch. @default "app"
   */
  snapshot?: "app" | "runtime" | "off";
  /** Absolute host folder that becomes the working directory (a daemon group's `home`). */
  home?: string;
  /** Variables set in `os.environ` of every interpreter (a daemon group's `env`). */
  environment?: Record<string, string>;
  /** Absolute host folders the isolates may write to; none when unset. */
  writePaths?: string[];
  /** Hosts (HOST or HOST:PORT) the isolates may open connections to; none when unset. */
  allowNet?: string[];
  /**
   * The real path of each host folder, resolved once for an embedded pool or
   * a daemon process (see pinMountRoots). Its isolates mount these, so a
   * symbolic link switched later (current -> releases/42) changes nothing
   * for them until a reload starts fresh ones.
   */
  /**
   * Epoch ms: an application snapshot whose build began before this is built
   * again. SIGHUP sets it, so that a reload imports the application afresh
   * and reads again the files it reads at import (a config.json).
   */
  snapshotNotBefore?: number;
  mountRoots?: Record<string, string>;
}

/** Returns `app` with the real paths of its host folders resolved now (see AppSpec.mountRoots). */
export function pinMountRoots(app: AppSpec): AppSpec {
  const mountRoots: Record<string, string> = {};
  for (const folder of appReadPaths(app)) {
    try {
      mountRoots[folder] = Deno.realPathSync(folder);
    } catch {
      // A folder that is gone is mounted by its path, and the mount reports it.
    }
  }
  return { ...app, mountRoots };
}

/**
 * Returns `paths` with the pinned real path of each added. An isolate
 * mounts a folder's real path, so its Deno permissions need both.
 */
export function withMountRoots(app: AppSpec, paths: string[]): string[] {
  const roots = app.mountRoots ?? {};
  const real = paths.map((path) => roots[path]).filter((root) => root !== undefined);
  return [...new Set([...paths, ...real])];
}

/**
 * Opens the regular file at `path` for reading when it lies inside one of
 * `folders`, or returns why not. The path comes from an application, so a
 * check of its text would let `folder/../../etc/shadow` or a link to another
 * folder through. Symbolic links and `..` of both are resolved, and the file
 * that was opened must be the one the path still leads to afterwards.
 *
 * NOTE: someone who can rename folders in the path while the server opens
 * it can still win the race between these checks and the open, because
 * Deno has no openat2() with RESOLVE_BENEATH. Deno's own checks of an
 * isolate's reads follow links in the same way (see README.md). A FIFO
 * swapped in blocks the open until a writer comes.
 * @throws {Deno.errors.NotFound} When `path` does not exist.
 */
export async function openFileInside(
  path: string,
  folders: string[],
): Promise<Deno.FsFile | string> {
  const outside = `wsgi.file_wrapper path '${path}' is outside the application's folders`;
  const real = await realPathInside(path, folders);
  if (real === undefined) return outside;
  const notFile = `wsgi.file_wrapper path '${path}' is not a regular file`;
  if (!(await Deno.stat(real)).isFile) return notFile;
  const file = await Deno.open(real, { read: true });
  let problem: string | undefined;
  let checked = false;
  try {
    const opened = await file.stat();
    const again = await realPathInside(path, folders);
    const current = again === undefined ? undefined : await Deno.stat(again);
    if (!opened.isFile) problem = notFile;
    else if (current === undefined) problem = outside;
    else if (current.ino !== opened.ino || current.dev !== opened.dev) {
      problem = `wsgi.file_wrapper path '${path}' changed while it was opened`;
    }
    checked = true;
  } finally {
    // Closed unless it is the file the path still leads to.
    if (!checked || problem !== undefined) file.close();
  }
  return problem ?? file;
}

/** Returns the real path of `path` when it lies inside one of `folders`, else undefined. */
async function realPathInside(path: string, folders: string[]): Promise<string | undefined> {
  const real = await Deno.realPath(path);
  for (const folder of folders) {
    const realFolder = await Deno.realPath(folder).catch(() => undefined);
    if (realFolder === undefined) continue;
    if (
      real === realFolder ||
      real.startsWith(realFolder.endsWith("/") ? realFolder : realFolder + "/")
    ) {
      return real;
    }
  }
  return undefined;
}

/**
 * Every host folder an isolate of `app` must be able to read, besides
 * Pyodide's own files. That includes the host's time zone database, which
 * every isolate shows at its usual path.
 */
export function appReadPaths(app: AppSpec): string[] {
  const home = app.home === undefined ? [] : [app.home];
  return [...new Set([...app.pythonPath, ...home, ...(app.writePaths ?? []), ...hostReadPaths()])];
}

/** A folder that a `.pth` file names but the isolates cannot read. */
export interface UnreadablePathEntry {
  /** The `.pth` file. */
  file: string;
  /** The folder its line names, made absolute. */
  folder: string;
}

/**
 * Finds the folders that the `.pth` files of `app`'s python-path folders name
 * but that lie outside every folder an isolate can read. Python skips a
 * line whose folder it cannot see without a word, so the front reports
 * them. Folders missing on the host are left out: Python skips those on
 * any server.
 */
export function unreadablePathEntries(app: AppSpec): UnreadablePathEntry[] {
  const readable = appReadPaths(app);
  const inside = (path: string) =>
    readable.some((folder) => path === folder || path.startsWith(folder.replace(/\/$/, "") + "/"));
  const found: UnreadablePathEntry[] = [];
  for (const folder of app.pythonPath) {
    let names: string[];
    try {
      names = [...Deno.readDirSync(folder)]
        .filter((entry) => entry.name.endsWith(".pth") && !entry.name.startsWith("."))
        .map((entry) => entry.name)
        .sort();
    } catch {
      continue;
    }
    for (const name of names) {
      const file = resolve(folder, name);
      let text: string;
      try {
        text = Deno.readTextFileSync(file);
      } catch {
        continue;
      }
      for (const line of text.split("\n")) {
        if (line.startsWith("#") || line.trim() === "" || /^import[ \t]/.test(line)) continue;
        const named = resolve(folder, line.trimEnd());
        if (inside(named) || !exists(named)) continue;
        found.push({ file, folder: named });
      }
    }
  }
  return found;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}
