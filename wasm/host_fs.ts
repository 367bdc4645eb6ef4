/**
 * Turns Deno's permission errors inside Emscripten's host file system
 * (NODEFS) into EACCES, so that Python raises PermissionError, and keeps
 * Emscripten's cache of looked-up files in step with the host.
 *
 * An isolate may write only in its `--write` folders. Deno refuses other
 * writes with a `NotCapable` error, which has no `code` property; NODEFS only
 * converts errors that have one and rethrows the rest, and that error then
 * ends the whole interpreter. Wrapping NODEFS's operations converts it first.
 *
 * Emscripten keeps every file it has looked up in a table and reuses the
 * entry without asking the host again. A file that another process (or
 * another isolate) deleted then stays in the table, and `open(path, "w")`
 * fails with FileNotFoundError instead of creating the file anew. A cached
 * host file or folder is therefore checked on the host each time it is
 * looked up.
 */

import { dirname, normalize } from "node:path";
import type { LogFunction } from "./host_socket.ts";

/** The parts of Pyodide's module this guard changes. */
export interface GuardedModule {
  FS: {
    filesystems: {
      NODEFS: {
        node_ops: Record<string, unknown>;
        stream_ops: Record<string, unknown>;
        realPath(node: FSNode): string;
      };
    };
    ErrnoError: new (errno: number) => Error & { errno: number };
    lookupNode(parent: FSNode, name: string): FSNode;
    open(path: unknown, flags: unknown, mode?: number): unknown;
    hashRemoveNode(node: FSNode): void;
  };
  ERRNO_CODES: Record<string, number>;
}

/** The parts of an Emscripten file system node that the lookup check reads. */
interface FSNode {
  mode: number;
  /** The mount whose root is shown at this node, when it is a mount point. */
  mounted?: unknown;
  mount: { type: unknown; root: FSNode; mountpoint: string; opts: { root: string } };
  node_ops: { getattr(node: FSNode): unknown };
}

/** Marks an operation that is already wrapped, so that a second install keeps one wrapper. */
const WRAPPED = Symbol.for("wsgirun.permissionGuard");

/** The wrappers' report function for denials, replaced by each install so that the newest log is used. */
interface GuardState {
  report: (error: Error) => void;
}

function isPermissionError(error: unknown): error is Error {
  return error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied;
}

/**
 * Wraps every NODEFS operation of `module`. A denied access becomes EACCES,
 * and the first denial of each path is logged with the folders that may be
 * written.
 */
export function guardHostFileSystem(
  module: GuardedModule,
  writable: readonly string[],
  log: LogFunction,
  umask = 0o022,
): void {
  const nodefs = module.FS.filesystems.NODEFS as typeof module.FS.filesystems.NODEFS & {
    [WRAPPED]?: GuardState;
  };
  const reported = new Set<string>();
  const allowed = writable.length === 0
    ? "none is"
    : `only ${writable.join(", ")} ${writable.length === 1 ? "is" : "are"}`;
  const report = (error: Error) => {
    const path = /"([^"]+)"/.exec(error.message)?.[1];
    const key = path ?? error.message;
    if (reported.has(key)) return;
    reported.add(key);
    if (path === undefined) {
      // Deno names no path for calls that need unscoped access, such as symlinkSync().
      log(
        "warning",
        `an operation on the host file system is not allowed in the isolate, so Python gets ` +
          `PermissionError: ${error.message}`,
      );
      return;
    }
    const access = /write access/.test(error.message) ? "writing" : "reading";
    log(
      "warning",
      `${access} '${path}' is not allowed in the isolate, so Python gets PermissionError; ` +
        `of the host folders, ${allowed} writable (--write DIR adds one to the application, ` +
        "allow-write=DIR to its daemon group)",
    );
  };
  if (nodefs[WRAPPED]) {
    nodefs[WRAPPED].report = report;
    return;
  }
  const state: GuardState = { report };
  nodefs[WRAPPED] = state;

  forgetDeletedFiles(module);
  nodefs.node_ops.readlink = hostLinkTarget(module);
  // Emscripten creates a file with mode 0o777 and then sets the mode that
  // open() asked for without the umask. Deno sets a new file's mode without
  // it too, so Python's default of 0o666 made every new file writable by all
  // users. The umask now applies to what open() and mkdir() ask for.
  const open = module.FS.open;
  module.FS.open = function (this: unknown, path: unknown, flags: unknown, mode?: number) {
    return open.call(this, path, flags, mode === undefined ? 0o666 & ~umask : mode & ~umask);
  };
  const mknod = nodefs.node_ops.mknod as (...args: unknown[]) => unknown;
  nodefs.node_ops.mknod = (parent: unknown, name: unknown, mode: number, dev: unknown) =>
    mknod(parent, name, mode & ~umask, dev);
  const eacces = module.ERRNO_CODES.EACCES;
  for (const operations of [nodefs.node_ops, nodefs.stream_ops]) {
    for (const [name, operation] of Object.entries(operations)) {
      if (typeof operation !== "function") continue;
      operations[name] = function (this: unknown, ...args: unknown[]) {
        try {
          return operation.apply(this, args);
        } catch (error) {
          if (!isPermissionError(error)) throw error;
          state.report(error);
          throw new module.FS.ErrnoError(eacces);
        }
      };
    }
  }
}

/**
 * Makes Emscripten check a cached host file or folder on the host each time
 * a path lookup reaches it, and forget it when the host no longer has it
 * (see the module documentation). Mount points keep their entries, and so
 * does each mount's root, which the server checked when it started.
 */
function forgetDeletedFiles(module: GuardedModule): void {
  const fs = module.FS;
  const nodefs = fs.filesystems.NODEFS;
  const enoent = module.ERRNO_CODES.ENOENT;
  const lookupNode = fs.lookupNode;
  fs.lookupNode = function (parent: FSNode, name: string): FSNode {
    const node = lookupNode.call(this, parent, name);
    if (node.mount?.type !== nodefs || node === node.mount.root || node.mounted) return node;
    try {
      node.node_ops.getattr(node);
      return node;
    } catch (error) {
      if (!(error instanceof fs.ErrnoError) || error.errno !== enoent) return node;
    }
    fs.hashRemoveNode(node);
    // A fresh lookup finds the file that replaced it, or raises ENOENT.
    return lookupNode.call(this, parent, name);
  };
}

/**
 * Returns NODEFS's readlink for host mounts that are shown at another path
 * than their real one. Emscripten turns a link's target into a path relative
 * to the mount's real root. That path points elsewhere when the mount point
 * is not that root, as for a `current` link to a release, mounted at
 * `current`, where a release's `data -> ../../shared/data` led one folder
 * too high. The
 * target here is absolute: the matching path under the mount point when it
 * is inside the mount's root, else the host path itself, which is shown at
 * its own path when it is one of the application's folders.
 */
function hostLinkTarget(module: GuardedModule): (node: FSNode) => string {
  const nodefs = module.FS.filesystems.NODEFS;
  return (node: FSNode) => {
    const hostPath = nodefs.realPath(node);
    let target: string;
    try {
      target = Deno.readLinkSync(hostPath);
    } catch (error) {
      // Deno's errors name the host's errno in `code`, as Node's do.
      const code = (error as { code?: unknown }).code;
      const errno = typeof code === "string" ? module.ERRNO_CODES[code] : undefined;
      if (errno !== undefined) throw new module.FS.ErrnoError(errno);
      throw error;
    }
    const absolute = normalize(target.startsWith("/") ? target : `${dirname(hostPath)}/${target}`);
    const root = node.mount.opts.root;
    if (absolute === root || absolute.startsWith(root + "/")) {
      return node.mount.mountpoint + absolute.slice(root.length);
    }
    return absolute;
  };
}
