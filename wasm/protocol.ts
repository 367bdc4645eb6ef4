/**
 * Messages between the pool (main thread) and an isolate's worker.
 *
 * While Python runs a request the worker cannot receive messages, so
 * everything the front must tell a running request (cancel, body bytes,
 * window credit) goes through the shared buffers in channel.ts instead.
 */

import type { AppSpec, PythonVersion } from "../supervisor/app_spec.ts";
import type { LogLevel } from "../supervisor/log.ts";

/**
 * Version of what wasm/snapshot_builder.ts imports into a snapshot and of the
 * layout of a snapshot file. It is part of every snapshot key, so raising it
 * when either changes makes cached snapshots rebuild.
 */
export const SNAPSHOT_CONTENT_VERSION = 3;

/** The error of a request whose client left, as the adapter and the front give it. */
export const CLIENT_DISCONNECTED = "client disconnected";

/** Prefix of an isolate worker's name, which ends with the Python version of its application. */
export const ISOLATE_WORKER_NAME = "wsgirun-isolate-python-";

export interface InitMessage {
  type: "init";
  app: AppSpec;
  isolateId: number;
  /** Read permissions the worker was given, for error messages. */
  readPaths: string[];
  /** Bytes of response the worker may post before it waits for the client. */
  responseWindow: number;
  /** Bytes the interpreter's wasm memory may not grow past; 0 for no cap. */
  memoryMaxBytes?: number;
  /** Whether the pool runs more than one isolate of this app (`wsgi.multiprocess`). */
  multiprocess: boolean;
  /** Memory snapshot to restore (runtime or application), or null to start from scratch. */
  snapshot?: SharedArrayBuffer | null;
  /** Page map of the snapshot's heap image, computed once by the main thread. */
  snapshotPages?: Uint8Array<SharedArrayBuffer> | null;
  /** `pyodide.asm.wasm` compiled once by the main thread. */
  wasmModule?: WebAssembly.Module | null;
  /** The isolate's RequestInbox; requests come only as posted messages without it. */
  inbox?: SharedArrayBuffer | null;
  /** The pool's ControlTable, which inbox entries name slots of. */
  controlTable?: SharedArrayBuffer | null;
  /**
   * Pyodide's interrupt buffer: the pool writes SIGINT (2) there before it
   * terminates the worker, so that Python code in a loop raises KeyboardInterrupt.
   */
  interrupt?: SharedArrayBuffer | null;
  /** The uid and gid of the process, which the worker may not read itself; null where unknown. */
  identity?: ProcessIdentity | null;
  /** One word that the worker sets to its wasm memory size, in 64 KiB pages, when it is ready and as each response ends. */
  memoryPages?: SharedArrayBuffer | null;
  /** One word that the worker sets to 1 while a request waits outside the interpreter (see waitBlocked). */
  blocked?: SharedArrayBuffer | null;
}

/** The uid and gid that os.getuid() and os.getgid() return in an isolate. */
export interface ProcessIdentity {
  uid: number;
  gid: number;
  /** The process id that os.getpid() returns, where Emscripten returns 42. */
  pid?: number;
  /**
   * The process's file mode creation mask, which the isolate applies to the
   * files and folders it creates on the host. Deno's workers cannot read it.
   */
  umask?: number;
}

/** Asks a worker to build a memory snapshot and send it back. */
export interface BuildSnapshotMessage {
  type: "build-snapshot";
  python: PythonVersion;
  /** Standard library modules imported into a runtime snapshot. */
  modules: string[];
  /** The runtime snapshot an application snapshot starts from. */
  base: SharedArrayBuffer | null;
  wasmModule: WebAssembly.Module | null;
  /** The application to import into the snapshot; unset for a runtime snapshot. */
  app?: AppSpec;
  /** See InitMessage.identity. */
  identity?: ProcessIdentity | null;
  /** See InitMessage.interrupt: the front writes SIGINT there when the build times out. */
  interrupt?: SharedArrayBuffer | null;
}

export interface RequestMessage {
  type: "request";
  requestId: string;
  method: string;
  /** The CGI/WSGI environ's string keys as a JSON object. */
  environ: string;
  /** The whole body when the front read it ahead; null when there is none or it streams. */
  body: Uint8Array<ArrayBuffer> | null;
  /** Ring the front streams the body into, when it was not read ahead. */
  bodyRing: SharedArrayBuffer | null;
  /** The request's control words: a buffer of their own, or the pool's ControlTable. */
  control: SharedArrayBuffer;
  /** The slot in `control` when it is the pool's ControlTable, else -1. */
  controlSlot: number;
  /** The posting's ticket. The worker starts the request only while the ticket is current (see RequestControl). */
  ticket: number;
}

export type ToWorker = InitMessage | RequestMessage | BuildSnapshotMessage;

export interface ReadyMessage {
  type: "ready";
  pythonVersion: string;
  pyodideVersion: string;
  loadMs: number;
}

/** The isolate could not start (Pyodide failed to load); it will not serve. */
export interface FatalMessage {
  type: "fatal";
  message: string;
}

/** The isolate imported the application at start (`preload`); `error` is set when that failed. */
export interface LoadedMessage {
  type: "loaded";
  error?: string;
}

/** Status line and headers, sent once per request before any body. */
export interface StartMessage {
  type: "start";
  requestId: string;
  status: number;
  /** Header pairs, flattened: name, value, name, value, ... */
  headers: string[];
  /**
   * The body sent with the status. A whole small body that is ASCII text
   * comes as a string, because a string crosses to the main thread in about
   * half the time of a byte array (Deno 2.9.6). Its UTF-8 form is the same bytes.
   */
  body?: Uint8Array<ArrayBuffer> | string;
  /** True when `body` is the whole response: no "end" message follows. */
  complete?: boolean;
}

const bodyEncoder = new TextEncoder();

/** Returns the bytes of a StartMessage's body. */
export function startBodyBytes(body: Uint8Array<ArrayBuffer> | string): Uint8Array<ArrayBuffer> {
  return typeof body === "string" ? bodyEncoder.encode(body) : body;
}

export interface BodyMessage {
  type: "body";
  requestId: string;
  chunk: Uint8Array<ArrayBuffer>;
}

/** A region of a host file the front sends itself (`wsgi.file_wrapper`). */
export interface FileMessage {
  type: "file";
  requestId: string;
  path: string;
  offset: number;
  /** Bytes to send, or -1 for the rest of the file. */
  length: number;
}

/** Describes a FileMessage's file that ended `missing` bytes before the response's Content-Length. */
export function shortFileError(path: string, missing: number): string {
  return `wsgi.file_wrapper file '${path}' ended ${missing} bytes short of the Content-Length`;
}

export interface EndMessage {
  type: "end";
  requestId: string;
  /** Set when the response failed after its headers went out: abort the connection. */
  error?: string;
}

export interface LogMessage {
  type: "log";
  level: LogLevel;
  message: string;
  requestId?: string;
}

export interface SnapshotMessage {
  type: "snapshot";
  bytes: Uint8Array<ArrayBuffer>;
  /**
   * Host files the application imported (application snapshots only). A
   * module imported from a zip archive is listed as the archive.
   */
  files: string[];
  /**
   * Host folders the imports searched: those on `sys.path` and those the
   * imported files are in (application snapshots only).
   */
  folders: string[];
}

/** The snapshot could not be taken; `reason` says why, for the log. */
export interface SnapshotFailedMessage {
  type: "snapshot-failed";
  reason: string;
}

export type FromWorker =
  | ReadyMessage
  | FatalMessage
  | LoadedMessage
  | StartMessage
  | BodyMessage
  | FileMessage
  | EndMessage
  | LogMessage
  | SnapshotMessage
  | SnapshotFailedMessage;
