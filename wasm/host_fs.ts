/**
 * Turns Deno's permission errors inside Emscripten's host file system
 * (NODEFS) into EACCES, so that Python raises PermissionError.
 *
 * An isolate may write only in its `--write` folders. Deno refuses other
 * writes with a `NotCapable` error, which has no `code` property; NODEFS only
 * converts errors that have one and rethrows the rest, and that error then
 * ends the whole interpreter. Wrapping NODEFS's operations converts it first.
 */

import type { LogFunction } from "./host_socket.ts";

/** The parts of Pyodide's module this guard changes. */
export interface GuardedModule {
  FS: {
    filesystems: {
      NODEFS: { node_ops: Record<string, unknown>; stream_ops: Record<string, unknown> };
    };
    ErrnoError: new (errno: number) => Error;
  };
  ERRNO_CODES: Record<string, number>;
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
): void {
  const nodefs = module.FS.filesystems.NODEFS as typeof module.FS.filesystems.NODEFS & {
    [WRAPPED]?: GuardState;
  };
  const reported = new Set<string>();
  const allowed = writable.length === 0 ? "none are" : `only ${writable.join(", ")} are`;
  const report = (error: Error) => {
    const path = /"([^"]+)"/.exec(error.message)?.[1] ?? error.message;
    if (reported.has(path)) return;
    reported.add(path);
    const access = /write access/.test(error.message) ? "writing" : "reading";
    log(
      "warning",
      `${access} '${path}' is not allowed in the isolate, so Python gets PermissionError; ` +
        `of the host folders, ${allowed} writable (--write DIR adds one)`,
    );
  };
  if (nodefs[WRAPPED]) {
    nodefs[WRAPPED].report = report;
    return;
  }
  const state: GuardState = { report };
  nodefs[WRAPPED] = state;

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
