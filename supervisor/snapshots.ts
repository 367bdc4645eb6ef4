/**
 * Memory snapshots that let a new isolate start in a few hundred
 * milliseconds instead of seconds, and the interpreter's wasm module compiled
 * once per process.
 *
 * Snapshots are built once and kept in the user's cache folder:
 * `$WSGIRUN_CACHE_DIR`, else `$XDG_CACHE_HOME/wsgirun`, else
 * `~/.cache/wsgirun`. A file's name carries a hash of everything that
 * decides its content (Pyodide's version, the adapter's source, the module
 * list, the application's location), so a change produces a new file
 * instead of a stale restore. A file holds only the pages of the snapshot
 * that contain data (see packSnapshot). It starts with a line that names the
 * file format, a line with the SHA-256 of everything after it, and a JSON
 * header, so an edited header field is caught as well as a damaged snapshot.
 * A file whose hash does not match is rebuilt. Files are written under a
 * temporary name and renamed, so two servers building the same snapshot at
 * once never read a half-written one.
 *
 * An application snapshot also records the size, modification time, change
 * time and real path of every host file the application imported, and the
 * importable names in each host folder on its `sys.path` and in each folder
 * it imported from. Editing one of those files rebuilds it. So does a
 * symbolic link on its path that now leads to another file. So does a
 * module added to or removed from one of those folders, because a new module
 * can take over an import or make an optional import succeed.
 *
 * A cache file is used only if the server's user (or root) owns it and no
 * other user may write it: a file someone else planted is rebuilt.
 *
 * Every use of a snapshot sets its modification time. Application snapshots
 * beyond the newest MAX_APPLICATION_SNAPSHOTS are deleted, and so are runtime
 * snapshots of other builds (an older wsgirun or Pyodide) that no server
 * used for RUNTIME_SNAPSHOT_UNUSED_MS.
 */

import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { ISOLATE_WORKER_URL, SHIPPED_SNAPSHOTS_URL } from "./worker_url.ts";
import {
  appReadPaths,
  type AppSpec,
  PYODIDE_SPECIFIER,
  PYTHON_VERSIONS,
  type PythonVersion,
  withMountRoots,
} from "./app_spec.ts";
import type { Logger } from "./log.ts";
import {
  type BuildSnapshotMessage,
  type FromWorker,
  SNAPSHOT_CONTENT_VERSION,
} from "../wasm/protocol.ts";
import { processIdentity, SIGINT } from "./isolate.ts";
import { packSnapshot, unpackSnapshot } from "../wasm/snapshot_pages.ts";
import adapterSource from "../wasm/adapter.py" with { type: "text" };
import appLoaderSource from "../wasm/app_loader.py" with { type: "text" };
import { HOST_MODULES_KEY } from "../wasm/host_modules.ts";

/** The starting point of one application's isolates. */
export interface Boot {
  snapshot: SharedArrayBuffer | null;
  wasmModule: WebAssembly.Module | null;
  /** "application", "runtime" or "none", for the log. */
  kind: "application" | "runtime" | "none";
  /** The cache file of an application snapshot, when it has one. */
  path?: string;
}

/** Standard library modules a runtime snapshot has imported: what the adapter and most frameworks load. */
export const RUNTIME_MODULES = [
  "json",
  "re",
  "traceback",
  "types",
  "importlib",
  "io",
  "os",
  "urllib.parse",
  "email.utils",
  "http.cookies",
  "datetime",
  "hashlib",
  "base64",
  "wsgiref.util",
];

/**
 * First line of a cache file. The number is the version of the file layout:
 * raise it whenever the layout changes, so files of another version are
 * rebuilt instead of misread. Version 3 moved the SHA-256 out of the header
 * onto its own line, where it also covers the header.
 */
const MAGIC = "WSGIRUN-SNAPSHOT 3\n";
/** Start of MAGIC that every version shares. */
const MAGIC_PREFIX = "WSGIRUN-SNAPSHOT ";
/** Length of the line after MAGIC: a SHA-256 in hex and a newline. */
const HASH_LINE_BYTES = 65;
/** The reason readFile() gives when the file does not exist. */
const NO_CACHED_SNAPSHOT = "no cached snapshot";

/** Application snapshots kept per cache folder; the least recently used go first. */
const MAX_APPLICATION_SNAPSHOTS = 16;
/**
 * Time after which a runtime snapshot of another build is deleted when unused.
 * Two wsgirun versions that share a cache folder keep both files while they
 * are both in use, instead of deleting and rebuilding each other's.
 */
const RUNTIME_SNAPSHOT_UNUSED_MS = 7 * 24 * 3600 * 1000;
/** Age after which a temporary file of an unfinished snapshot build is deleted. */
const LEFTOVER_MS = 24 * 3600 * 1000;
const BUILD_TIMEOUT_MS = 180_000;

/** JSON header of a cache file, covered by the SHA-256 on the line before it. */
interface SnapshotHeader {
  key: string;
  /** Length of the packed snapshot. */
  bytes: number;
  /** Length of the snapshot once unpacked. */
  snapshotBytes: number;
  /** A stamp of each file the application imported. */
  files?: FileStamp[];
  /** A stamp of each folder the application's imports searched. */
  folders?: FolderStamp[];
  /** Epoch ms when the build of an application snapshot began. */
  builtAt?: number;
}

/**
 * Path, size, modification time in ms, real path and change time in ms of an
 * imported file. Files of two releases behind a switched link can have the
 * same size and time, but not the same real path. The change time catches a
 * file replaced by one with an older modification time (`mv`, `tar x`,
 * `rsync -a`) and an edit whose modification time was set back.
 */
type FileStamp = [string, number, number, string, number];

/** Path of a folder and a digest of the importable names in it ("" when it does not exist). */
type FolderStamp = [string, string];

/**
 * Changes of the application's stamps and cache key that an older wsgirun
 * did not record: raising it makes the application snapshots of older
 * versions miss instead of passing a check they have no data for.
 */
const APPLICATION_STAMP_VERSION = 3;

/**
 * The cache folder, as an absolute path: daemon processes run in another
 * working folder, so a relative WSGIRUN_CACHE_DIR is resolved here.
 */
export function snapshotCacheDir(): string {
  const explicit = Deno.env.get("WSGIRUN_CACHE_DIR");
  if (explicit) return resolve(explicit);
  const xdg = Deno.env.get("XDG_CACHE_HOME");
  if (xdg) return `${resolve(xdg)}/wsgirun`;
  return `${Deno.env.get("HOME") || "/tmp"}/.cache/wsgirun`;
}

async function sha256Hex(data: Uint8Array | string): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- the compiled interpreter module ----

const compiledModules = new Map<PythonVersion, Promise<WebAssembly.Module | null>>();

/**
 * Compiles `pyodide.asm.wasm` once per process. Workers that get the module
 * skip reading and hashing 10 MB each. Returns null if the file cannot be
 * read (the workers then read it themselves).
 */
export function compiledInterpreter(
  python: PythonVersion,
  pyodideFolder: string,
  logger: Logger,
): Promise<WebAssembly.Module | null> {
  let compiled = compiledModules.get(python);
  if (!compiled) {
    compiled = readInterpreterFile(python, pyodideFolder)
      .then((bytes) => WebAssembly.compile(bytes))
      .catch((error) => {
        logger.warning(`cannot compile Pyodide's wasm module once for all isolates: ${error}`);
        return null;
      });
    compiledModules.set(python, compiled);
  }
  return compiled;
}

/**
 * Reads `pyodide.asm.wasm`. With `nodeModulesDir` set to "auto", Deno puts
 * an npm package into node_modules only when a module first imports it.
 * Only the isolates' workers import Pyodide, so on the first run of a fresh
 * checkout the file may be missing. Importing the package here installs it.
 */
async function readInterpreterFile(
  python: PythonVersion,
  folder: string,
): Promise<Uint8Array<ArrayBuffer>> {
  const path = `${folder}/pyodide.asm.wasm`;
  try {
    return await Deno.readFile(path);
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    await import(PYODIDE_SPECIFIER[python]);
    return await Deno.readFile(path);
  }
}

// ---- cache files ----

/** Returns the bytes of a cache file: MAGIC, the SHA-256 line, the header line and the packed snapshot. */
async function encodeFile(
  header: SnapshotHeader,
  payload: Uint8Array,
): Promise<Uint8Array<ArrayBuffer>> {
  const encoder = new TextEncoder();
  const magic = encoder.encode(MAGIC);
  const head = encoder.encode(JSON.stringify(header) + "\n");
  const hashed = magic.length + HASH_LINE_BYTES;
  const out = new Uint8Array(hashed + head.length + payload.length);
  out.set(magic);
  out.set(head, hashed);
  out.set(payload, hashed + head.length);
  // The hash covers the header and the snapshot as they are in the file.
  out.set(encoder.encode(await sha256Hex(out.subarray(hashed)) + "\n"), magic.length);
  return out;
}

/**
 * Maximum length of a cache file: a snapshot of the largest wasm32 memory
 * (4 GiB), with room for its header. A longer file is not a snapshot.
 */
const MAX_FILE_BYTES = 4 * 1024 ** 3 + 64 * 1024 ** 2;

function isStamp(value: unknown): value is FileStamp {
  return Array.isArray(value) && value.length === 5 && typeof value[0] === "string" &&
    Number.isFinite(value[1]) && Number.isFinite(value[2]) && typeof value[3] === "string" &&
    Number.isFinite(value[4]);
}

function isFolderStamp(value: unknown): value is FolderStamp {
  return Array.isArray(value) && value.length === 2 && typeof value[0] === "string" &&
    typeof value[1] === "string";
}

/** Checks that a parsed header has every field with the right type, so a corrupt one is caught here. */
function isHeader(value: unknown): value is SnapshotHeader {
  if (typeof value !== "object" || value === null) return false;
  const header = value as Record<string, unknown>;
  const files = header.files;
  const folders = header.folders;
  return typeof header.key === "string" &&
    Number.isSafeInteger(header.bytes) && (header.bytes as number) >= 0 &&
    Number.isSafeInteger(header.snapshotBytes) && (header.snapshotBytes as number) > 0 &&
    (files === undefined || (Array.isArray(files) && files.every(isStamp))) &&
    (folders === undefined || (Array.isArray(folders) && folders.every(isFolderStamp)));
}

/** Names the process's user for a log line: "uid N", or "this user" without the permission to ask. */
function whoAmI(): string {
  try {
    return `uid ${Deno.uid()}`;
  } catch {
    return "this user";
  }
}

/**
 * Returns why a cache file must not be trusted, or undefined. Only the
 * server's user and root can write a file they own, so a file with another
 * owner, or one that others may write, could hold code planted by another
 * user: the SHA-256 inside it detects damage, not tampering.
 */
function foreignFileProblem(info: Deno.FileInfo): string | undefined {
  let uid: number | null;
  try {
    uid = Deno.uid();
  } catch {
    // No permission to ask: the daemon processes that lack it get a private folder.
    return undefined;
  }
  if (uid === null || info.uid === null) return undefined;
  if (info.uid !== uid && info.uid !== 0) {
    return `belongs to uid ${info.uid}, not to the server's user (uid ${uid})`;
  }
  const mode = info.mode ?? 0;
  if ((mode & 0o022) !== 0) {
    return `may be written by other users (mode ${(mode & 0o777).toString(8)})`;
  }
  return undefined;
}

/** Reads `size` bytes of an open file, or fewer if it ends sooner. */
async function readWhole(file: Deno.FsFile, size: number): Promise<Uint8Array> {
  const data = new Uint8Array(size);
  let filled = 0;
  while (filled < size) {
    const count = await file.read(data.subarray(filled));
    if (count === null) return data.subarray(0, filled);
    filled += count;
  }
  return data;
}

/** Returns the header and the unpacked snapshot in shared memory, or a reason it is unusable. */
async function readFile(
  path: string,
  key: string,
  checkOwner = true,
): Promise<{ header: SnapshotHeader; snapshot: SharedArrayBuffer } | string> {
  let data: Uint8Array;
  try {
    // A FIFO or a device at the path would block the open or never end the read.
    if (!(await Deno.stat(path)).isFile) return `${path} is not a regular file`;
    using file = await Deno.open(path);
    // Checked on the open file, so a file swapped in after the check is not read.
    const info = await file.stat();
    if (!info.isFile) return `${path} is not a regular file`;
    const foreign = checkOwner ? foreignFileProblem(info) : undefined;
    if (foreign) return `${path} ${foreign}`;
    if (info.size > MAX_FILE_BYTES) {
      return `${path} is too large for a snapshot (${info.size} bytes)`;
    }
    data = await readWhole(file, info.size);
  } catch (error) {
    return error instanceof Deno.errors.NotFound
      ? NO_CACHED_SNAPSHOT
      : `cannot read ${path}: ${error}`;
  }
  const decoder = new TextDecoder();
  const magic = decoder.decode(data.subarray(0, MAGIC.length));
  if (magic !== MAGIC) {
    const otherVersion = decoder.decode(data.subarray(0, MAGIC_PREFIX.length)) === MAGIC_PREFIX;
    return otherVersion
      ? `${path} has another version of the snapshot file format (this wsgirun reads "${MAGIC.trim()}")`
      : `${path} is not a wsgirun snapshot`;
  }
  const hashed = MAGIC.length + HASH_LINE_BYTES;
  const sha256 = decoder.decode(data.subarray(MAGIC.length, hashed - 1));
  const headerEnd = data.indexOf(10, hashed);
  if (!/^[0-9a-f]{64}$/.test(sha256) || data[hashed - 1] !== 10 || headerEnd < 0) {
    return `${path} has a corrupt header`;
  }

  // The header is checked before the hash, which takes longer.
  let header: unknown;
  try {
    header = JSON.parse(decoder.decode(data.subarray(hashed, headerEnd)));
  } catch {
    return `${path} has a corrupt header`;
  }
  if (!isHeader(header)) return `${path} has a corrupt header`;
  const payload = data.subarray(headerEnd + 1);
  if (header.key !== key) return `${path} belongs to another build`;
  if (payload.length !== header.bytes) {
    return `${path} has the wrong length (${payload.length} bytes of snapshot, the header says ${header.bytes})`;
  }
  if (await sha256Hex(data.subarray(hashed)) !== sha256) {
    return `${path} is corrupt (SHA-256 mismatch)`;
  }
  try {
    return { header, snapshot: unpackSnapshot(payload, header.snapshotBytes) };
  } catch (error) {
    return `${path} is corrupt (${error instanceof Error ? error.message : error})`;
  }
}

/**
 * Packs `snapshot` into the file at `path` and returns it unpacked in shared
 * memory, as a read of the file would. Without a logger a failed write
 * throws. With one it is logged, and the snapshot is still returned for this
 * run.
 */
async function writeSnapshot(
  path: string,
  key: string,
  snapshot: Uint8Array,
  stamps: Pick<SnapshotHeader, "files" | "folders" | "builtAt"> = {},
  logger?: Logger,
): Promise<{ snapshot: SharedArrayBuffer; written: boolean }> {
  const packed = packSnapshot(snapshot);
  let written = true;
  try {
    await writeFile(
      path,
      { key, bytes: packed.length, snapshotBytes: snapshot.length, ...stamps },
      packed,
    );
  } catch (error) {
    if (!logger) throw error;
    written = false;
    logger.warning(
      `cannot write the snapshot cache file ${path}: ${errorText(error)}; ` +
        "this run uses the snapshot, the next one builds it again. " +
        `Let ${whoAmI()} write to ${path.slice(0, path.lastIndexOf("/"))} and remove ` +
        "anything that is not a snapshot file at that path, or set WSGIRUN_CACHE_DIR " +
        "(of the server; a daemon group that runs as another user has its own cache) to a writable folder",
    );
  }
  return { snapshot: unpackSnapshot(packed, snapshot.length), written };
}

/**
 * Creates `folder` for its owner only, and the folders above it as usual: a
 * mode given to a recursive mkdir would also close the folders it creates
 * above, such as a project's .cache that other users read.
 */
async function makePrivateFolder(folder: string): Promise<void> {
  try {
    await Deno.mkdir(folder, { mode: 0o700 });
    return;
  } catch (error) {
    if (error instanceof Deno.errors.AlreadyExists) return;
    if (!(error instanceof Deno.errors.NotFound)) throw error;
  }
  // Only when the parent is missing: a daemon process may write its cache
  // folder but not the folder above it.
  await Deno.mkdir(dirname(folder), { recursive: true });
  await Deno.mkdir(folder, { mode: 0o700 }).catch((error) => {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  });
}

async function writeFile(path: string, header: SnapshotHeader, payload: Uint8Array): Promise<void> {
  await makePrivateFolder(path.slice(0, path.lastIndexOf("/")));
  const temporary = `${path}.${Deno.pid}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  try {
    // An application snapshot contains what the application had in memory, such
    // as --env values and secrets read at import, so only the owner may read it.
    await Deno.writeFile(temporary, await encodeFile(header, payload), { mode: 0o600 });
    await Deno.rename(temporary, path);
  } catch (error) {
    await Deno.remove(temporary).catch(() => {});
    throw error;
  }
}

// ---- building ----

export interface BuiltSnapshot {
  bytes: Uint8Array;
  /** See SnapshotMessage. */
  files: string[];
  folders: string[];
}

/**
 * Runs one snapshot build in a worker with the isolates' read permissions.
 * A build that takes longer than `timeoutMs` fails, and its worker stops.
 */
export function buildInWorker(
  message: BuildSnapshotMessage,
  readPaths: string[],
  logger: Logger,
  timeoutMs = BUILD_TIMEOUT_MS,
): Promise<BuiltSnapshot> {
  const interrupt = new Int32Array(new SharedArrayBuffer(4));
  const writePaths = message.app ? withMountRoots(message.app, message.app.writePaths ?? []) : [];
  const worker = new Worker(ISOLATE_WORKER_URL, {
    type: "module",
    deno: {
      permissions: {
        read: message.app ? withMountRoots(message.app, readPaths) : readPaths,
        // The isolates' write folders, so that an application that writes a
        // file while it imports gets its snapshot, as it gets its isolates.
        write: writePaths.length > 0 ? writePaths : false,
        net: false,
        run: false,
        env: false,
        ffi: false,
        sys: false,
        import: false,
      },
    },
  });
  const { promise, resolve, reject } = Promise.withResolvers<
    BuiltSnapshot
  >();
  const timer = setTimeout(
    () => reject(new Error(`timed out after ${timeoutMs} ms`)),
    timeoutMs,
  );
  worker.onmessage = (event: MessageEvent<FromWorker>) => {
    const reply = event.data;
    if (reply.type === "snapshot") {
      resolve({ bytes: reply.bytes, files: reply.files, folders: reply.folders });
    } else if (reply.type === "snapshot-failed") reject(new Error(reply.reason));
    else if (reply.type === "log") logger.log(reply.level, reply.message);
  };
  worker.onerror = (event) => {
    event.preventDefault();
    reject(new Error(event.message));
  };
  worker.postMessage({ ...message, interrupt: interrupt.buffer });
  return promise.finally(() => {
    clearTimeout(timer);
    // Deno does not stop a worker that loops in wasm (see Isolate.terminate),
    // so an import that hangs first gets KeyboardInterrupt.
    Atomics.store(interrupt, 0, SIGINT);
    worker.terminate();
  });
}

async function fileStamps(files: string[]): Promise<FileStamp[]> {
  return await Promise.all(files.map(async (file): Promise<FileStamp> => {
    const info = await Deno.stat(file);
    return [
      file,
      info.size,
      info.mtime?.getTime() ?? 0,
      await Deno.realPath(file),
      info.ctime?.getTime() ?? 0,
    ];
  }));
}

/**
 * Names in a folder that an import could find: modules, compiled modules,
 * extension modules and folders that could be packages, and the `.pth`
 * files that add folders to `sys.path`.
 */
const IMPORTABLE_FILE = /^[A-Za-z_]\w*(\.[\w-]+)?\.(py|pyc|so)$|\.pth$/;
const IMPORTABLE_FOLDER = /^[A-Za-z_]\w*$/;

/**
 * Returns a digest of the importable names in `folder` and of the contents
 * of its `.pth` files, which decide further folders on `sys.path`, or "" when
 * it does not exist. Other names (data files, `__pycache__`) change without
 * effect on imports, so they are left out. A zip archive on `sys.path` is a
 * file: its digest covers its size and times, so a module added to it counts.
 */
async function folderDigest(folder: string): Promise<string> {
  const names: string[] = [];
  try {
    for await (const entry of Deno.readDir(folder)) {
      const name = entry.name;
      if (entry.isDirectory || entry.isSymlink) {
        if (IMPORTABLE_FOLDER.test(name) && name !== "__pycache__") names.push(`${name}/`);
      }
      if (entry.isDirectory || !IMPORTABLE_FILE.test(name)) continue;
      if (!name.endsWith(".pth")) {
        names.push(name);
        continue;
      }
      const text = await Deno.readTextFile(`${folder}/${name}`).catch((error) => String(error));
      names.push(`${name}\n${text}`);
    }
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "";
    if (!(error instanceof Deno.errors.NotADirectory)) throw error;
    const info = await Deno.stat(folder);
    return `file ${info.size} ${info.mtime?.getTime() ?? 0} ${info.ctime?.getTime() ?? 0}`;
  }
  return await sha256Hex(names.sort().join("\n"));
}

async function folderStamps(folders: string[]): Promise<FolderStamp[]> {
  return await Promise.all(
    folders.map(async (folder): Promise<FolderStamp> => [folder, await folderDigest(folder)]),
  );
}

/** Returns what changed since the snapshot among the application's imports, if anything. */
async function changedImport(
  files: FileStamp[],
  folders: FolderStamp[],
): Promise<string | undefined> {
  for (const [file, size, mtime, realPath, ctime] of files) {
    try {
      const info = await Deno.stat(file);
      if (info.size !== size || (info.mtime?.getTime() ?? 0) !== mtime) return `${file} changed`;
      if ((info.ctime?.getTime() ?? 0) !== ctime) return `${file} changed`;
      if (await Deno.realPath(file) !== realPath) return `${file} changed`;
    } catch {
      return `${file} changed`;
    }
  }
  for (const [folder, digest] of folders) {
    try {
      if (await folderDigest(folder) !== digest) {
        return `the modules, packages or .pth files in ${folder} changed`;
      }
    } catch {
      return `${folder} cannot be read`;
    }
  }
  return undefined;
}

export interface BootOptions {
  app: AppSpec;
  pyodideFolder: string;
  logger: Logger;
}

/** Hash of everything that decides a runtime snapshot's content. */
function runtimeKey(python: PythonVersion): Promise<string> {
  return sha256Hex(JSON.stringify({
    pyodide: PYODIDE_SPECIFIER[python],
    adapter: adapterSource,
    loader: appLoaderSource,
    modules: RUNTIME_MODULES,
    content: SNAPSHOT_CONTENT_VERSION,
    // Builds that write another file layout use other file names, so two
    // versions of wsgirun that share a cache folder do not rebuild each other's files.
    format: MAGIC,
  }));
}

async function runtimeSnapshot(
  options: BootOptions,
  wasmModule: WebAssembly.Module | null,
): Promise<{ key: string; snapshot: SharedArrayBuffer }> {
  const { app, logger } = options;
  const key = await runtimeKey(app.python);
  const name = runtimeFileName(app.python, key);
  if (SHIPPED_SNAPSHOTS_URL) {
    // The program's own files, owned by the account that installed the program, as its code is.
    const shipped = await readFile(fileURLToPath(new URL(name, SHIPPED_SNAPSHOTS_URL)), key, false);
    if (typeof shipped !== "string") {
      logger.debug(`runtime snapshot from the program's own files: ${name}`);
      return { key, snapshot: shipped.snapshot };
    }
    if (shipped !== NO_CACHED_SNAPSHOT) {
      logger.warning(
        `cannot use the runtime snapshot in the program's files: ${shipped}; ` +
          "let every user that runs the program read it (chmod -R a+rX on its snapshots folder)",
      );
    }
  }
  const path = `${snapshotCacheDir()}/${name}`;
  const cached = await readFile(path, key);
  if (typeof cached !== "string") {
    await touch(path);
    return { key, snapshot: cached.snapshot };
  }

  const reason = cached === NO_CACHED_SNAPSHOT && await hasOtherRuntimeSnapshot(app.python, name)
    ? "the cached one is of another wsgirun or Pyodide build"
    : cached;
  const recheck = async () => {
    const built = await readFile(path, key);
    if (typeof built === "string") return undefined;
    logger.info(`using the runtime snapshot that another build made meanwhile: ${path}`);
    return { key, snapshot: built.snapshot };
  };
  return await withBuildLock(path, logger, recheck, async () => {
    logger.info(
      `building the Python ${app.python} runtime snapshot (${reason}); ` +
        "this happens once per Python version and build",
    );
    const started = performance.now();
    const bytes = await buildRuntimeSnapshot(app.python, options.pyodideFolder, wasmModule, logger);
    const ms = Math.round(performance.now() - started);
    const { snapshot, written } = await writeSnapshot(path, key, bytes, undefined, logger);
    logger.info(
      `runtime snapshot built in ${ms} ms${written ? `: ${path}` : ", for this run only"}`,
    );
    return { key, snapshot };
  });
}

/** Maximum wait for another build of the same snapshot before this one builds without the lock. */
const BUILD_LOCK_WAIT_MS = 60_000;
/** Wait after which a process that waits for the build lock logs it. */
const BUILD_LOCK_NOTICE_MS = 500;

/** Returns the path of the lock file of the snapshot at `path`. */
function lockPathOf(path: string): string {
  return `${path}.lock`;
}

/**
 * Times a build opens the lock file again because another process removed it
 * while this one waited. A lock file is removed only after a build that kept
 * no snapshot, or when no build holds it, so the limit is reached only when
 * such builds end quickly one after another.
 */
const MAX_LOCK_ATTEMPTS = 20;

/** The open lock file of a snapshot, and whether this process holds its lock. */
type BuildLock = { file: Deno.FsFile; held: true } | {
  file: Deno.FsFile;
  held: false;
  reason: string;
};

/**
 * Runs `build` while holding the lock of the snapshot at `path` (an flock on
 * `path.lock`), so that servers and daemon processes that start together,
 * or two pools of one server during a reload, build each snapshot once.
 * Builds of other snapshots do not wait. With the lock taken it first calls
 * `recheck`, which returns what another build made meanwhile, if anything.
 * The lock ends with the process that holds it, however that process ends.
 *
 * When no snapshot exists at `path` after the build (it was skipped, not
 * kept or not written), the lock file is removed before the lock is released,
 * so the cache folder does not collect one empty file per such snapshot.
 */
async function withBuildLock<T>(
  path: string,
  logger: Logger,
  recheck: () => Promise<T | undefined>,
  build: () => Promise<T>,
): Promise<T> {
  const lockPath = lockPathOf(path);
  let lock: BuildLock;
  try {
    await makePrivateFolder(snapshotCacheDir());
    lock = await lockBuildFile(lockPath, logger);
  } catch (error) {
    const message = `snapshot builds are not coordinated: cannot open ${lockPath}: ${
      errorText(error)
    }`;
    // An unwritable cache folder is reported where the snapshot is written.
    if (error instanceof LockFileTypeError) logger.warning(message);
    else logger.debug(message);
    return await build();
  }
  try {
    if (lock.held) {
      const found = await recheck();
      if (found !== undefined) return found;
    } else {
      logger.warning(`building a snapshot without the lock ${lockPath} because ${lock.reason}`);
    }
    return await build();
  } finally {
    if (lock.held) {
      await removeLockWithoutSnapshot(path, logger, "no snapshot was kept after its build");
    }
    // Closing the file releases the lock.
    lock.file.close();
  }
}

/**
 * Opens and locks `lockPath`, waiting at most BUILD_LOCK_WAIT_MS. A holder
 * may remove the file before it releases the lock (see withBuildLock). A
 * process that waited on it then holds the lock of a file that is no longer
 * at that path, and a newer process may have locked a new file there. So
 * after each lock this checks that the path still names the locked file, and
 * else opens the path again. Throws when the file cannot be opened.
 */
async function lockBuildFile(lockPath: string, logger: Logger): Promise<BuildLock> {
  const notice = setTimeout(
    () => logger.info(`waiting for another build of the same snapshot to finish (${lockPath})`),
    BUILD_LOCK_NOTICE_MS,
  );
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"timeout">((
    resolve,
  ) => (timer = setTimeout(resolve, BUILD_LOCK_WAIT_MS, "timeout")));
  try {
    for (let attempt = 1;; attempt++) {
      await checkLockFileType(lockPath);
      const file = await Deno.open(lockPath, { create: true, write: true });
      const locked = file.lock(true).then(() => "locked" as const, (error) => errorText(error));
      const outcome = await Promise.race([locked, timeout]);
      if (outcome === "timeout") {
        return {
          file,
          held: false,
          reason: `another build held it for ${BUILD_LOCK_WAIT_MS / 1000} s`,
        };
      }
      if (outcome !== "locked") {
        return { file, held: false, reason: `locking it failed (${outcome})` };
      }

      let atPath: boolean;
      try {
        atPath = await isFileAtPath(file, lockPath);
      } catch (error) {
        const reason = `checking that the path still names the locked file failed (${
          errorText(error)
        })`;
        return { file, held: false, reason };
      }
      if (atPath) return { file, held: true };
      if (attempt === MAX_LOCK_ATTEMPTS) {
        return {
          file,
          held: false,
          reason: `it was removed ${attempt} times while this build waited for it`,
        };
      }
      logger.debug(
        `${lockPath} was removed while this build waited for its lock, so the file now at that path is locked`,
      );
      file.close();
    }
  } finally {
    clearTimeout(notice);
    clearTimeout(timer);
  }
}

/** Thrown when something other than a regular file is at a lock file's path. */
class LockFileTypeError extends Error {}

/**
 * Throws LockFileTypeError unless `lockPath` is a regular file or missing.
 * Opening a FIFO for writing blocks until a reader comes, and a symbolic
 * link would make the server create or lock a file elsewhere.
 */
async function checkLockFileType(lockPath: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(lockPath);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return;
    throw error;
  }
  if (info.isFile) return;
  let kind = "not a regular file";
  if (info.isSymlink) kind = "a symbolic link";
  if (info.isDirectory) kind = "a directory";
  throw new LockFileTypeError(`it is ${kind}; remove it`);
}

/** Returns whether `path` names the open `file`, and not a file created after that one was removed. */
async function isFileAtPath(file: Deno.FsFile, path: string): Promise<boolean> {
  const opened = await file.stat();
  let current: Deno.FileInfo;
  try {
    current = await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
  return current.dev === opened.dev && current.ino === opened.ino;
}

/**
 * Removes the lock file of the snapshot at `path` if no snapshot exists
 * there. The caller must hold the lock: a lock file removed while another
 * process holds it would let a third one lock a new file and build too.
 */
async function removeLockWithoutSnapshot(
  path: string,
  logger: Logger,
  reason: string,
): Promise<void> {
  const lockPath = lockPathOf(path);
  try {
    await Deno.lstat(path);
    return;
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      logger.debug(
        `kept the lock file ${lockPath} because checking for its snapshot failed: ${
          errorText(error)
        }`,
      );
      return;
    }
  }
  try {
    await Deno.remove(lockPath);
    logger.debug(`removed the lock file ${lockPath}: ${reason}`);
  } catch (error) {
    logger.debug(`cannot remove the lock file ${lockPath}: ${errorText(error)}`);
  }
}

/**
 * Removes the lock file of the snapshot at `path` when no snapshot exists
 * there and no build holds the lock: the file of a build that crashed, or of
 * a snapshot that was deleted. A held lock file is left to its holder.
 */
async function removeUnusedLockFile(path: string, logger: Logger): Promise<void> {
  const lockPath = lockPathOf(path);
  let file: Deno.FsFile;
  try {
    // Opening a FIFO would block, so only a regular file is opened.
    if (!(await Deno.lstat(lockPath)).isFile) return;
    file = await Deno.open(lockPath, { read: true });
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      logger.debug(`cannot open the lock file ${lockPath} to remove it: ${errorText(error)}`);
    }
    return;
  }
  try {
    if (!(await file.tryLock(true))) {
      logger.debug(`kept the lock file ${lockPath} because a build holds its lock`);
      return;
    }
    // The file was removed after it was opened here, and the path may name a newer one that a build uses.
    if (!(await isFileAtPath(file, lockPath))) return;
    await removeLockWithoutSnapshot(
      path,
      logger,
      "its snapshot does not exist and no build holds its lock",
    );
  } catch (error) {
    logger.debug(`cannot lock ${lockPath} to remove it: ${errorText(error)}`);
  } finally {
    file.close();
  }
}

/** Returns whether the cache folder has a runtime snapshot of `python` other than `name`. */
async function hasOtherRuntimeSnapshot(python: PythonVersion, name: string): Promise<boolean> {
  const prefix = `runtime-python${python}-`;
  try {
    for await (const entry of Deno.readDir(snapshotCacheDir())) {
      if (!entry.isFile || entry.name === name) continue;
      if (entry.name.startsWith(prefix) && entry.name.endsWith(".snapshot")) return true;
    }
  } catch {
    // A missing or unreadable folder has no other snapshot to mention.
  }
  return false;
}

function runtimeFileName(python: PythonVersion, key: string): string {
  return `runtime-python${python}-${key.slice(0, 16)}.snapshot`;
}

async function buildRuntimeSnapshot(
  python: PythonVersion,
  pyodideFolder: string,
  wasmModule: WebAssembly.Module | null,
  logger: Logger,
): Promise<Uint8Array> {
  const built = await buildInWorker(
    {
      type: "build-snapshot",
      python,
      modules: RUNTIME_MODULES,
      base: null,
      wasmModule,
    },
    [pyodideFolder],
    logger,
  );
  return built.bytes;
}

/**
 * Builds the runtime snapshot of `python` into `folder` (the program's own
 * snapshot folder when called by the build), and returns the file's path.
 */
export async function writeRuntimeSnapshot(
  python: PythonVersion,
  pyodideFolder: string,
  folder: string,
  logger: Logger,
): Promise<string> {
  const key = await runtimeKey(python);
  const wasmModule = await compiledInterpreter(python, pyodideFolder, logger);
  const bytes = await buildRuntimeSnapshot(python, pyodideFolder, wasmModule, logger);
  const path = `${folder}/${runtimeFileName(python, key)}`;
  await writeSnapshot(path, key, bytes);
  // A runtime snapshot contains no application data, and daemon processes that
  // run as other users read the program's copy.
  await Deno.chmod(folder, 0o755);
  await Deno.chmod(path, 0o644);
  return path;
}

function applicationKey(app: AppSpec, runtime: string): Promise<string> {
  return sha256Hex(JSON.stringify({
    runtime,
    script: app.scriptPath,
    module: app.module,
    callable: app.callable,
    pythonPath: app.pythonPath,
    home: app.home,
    environment: app.environment,
    hostModules: HOST_MODULES_KEY,
    stamps: APPLICATION_STAMP_VERSION,
  }));
}

function applicationPath(app: AppSpec, key: string): string {
  return `${snapshotCacheDir()}/app-${app.name.replace(/[^\w.-]/g, "_")}-${
    key.slice(0, 16)
  }.snapshot`;
}

/** Returns the cached application snapshot, or the reason it must be built. */
async function cachedApplicationSnapshot(
  app: AppSpec,
  key: string,
): Promise<SharedArrayBuffer | string> {
  const path = applicationPath(app, key);
  const cached = await readFile(path, key);
  if (typeof cached === "string") return cached;
  const changed = await changedImport(cached.header.files ?? [], cached.header.folders ?? []);
  if (changed) return changed;
  if (app.snapshotNotBefore !== undefined && (cached.header.builtAt ?? 0) < app.snapshotNotBefore) {
    return "the server received SIGHUP after it was built";
  }
  await touch(path);
  return cached.snapshot;
}

/** Sets a snapshot's modification time to now: it orders snapshots by last use. */
async function touch(path: string): Promise<void> {
  const now = new Date();
  await Deno.utime(path, now, now).catch(() => {});
}

/** Deletes the least recently used application snapshots beyond the limit. */
async function pruneApplicationSnapshots(logger: Logger): Promise<void> {
  const folder = snapshotCacheDir();
  const snapshots: { path: string; used: number }[] = [];
  try {
    for await (const entry of Deno.readDir(folder)) {
      if (!entry.isFile || !entry.name.startsWith("app-") || !entry.name.endsWith(".snapshot")) {
        continue;
      }
      const path = `${folder}/${entry.name}`;
      const info = await Deno.stat(path).catch(() => null);
      if (info) snapshots.push({ path, used: info.mtime?.getTime() ?? 0 });
    }
  } catch (error) {
    logger.warning(`cannot look for old application snapshots in ${folder}: ${errorText(error)}`);
    return;
  }
  snapshots.sort((a, b) => b.used - a.used);
  for (const { path } of snapshots.slice(MAX_APPLICATION_SNAPSHOTS)) {
    await Deno.remove(path).catch(() => {});
    logger.info(`removed the least recently used application snapshot ${path}`);
    await removeUnusedLockFile(path, logger);
  }
}

let runtimeSnapshotsPruned = false;

/**
 * Deletes runtime snapshots whose key is not the current one for their
 * Python version and whose last use is older than RUNTIME_SNAPSHOT_UNUSED_MS,
 * temporary files of builds that stopped more than LEFTOVER_MS ago, and lock
 * files whose snapshot does not exist and that no build holds.
 * Runs once per process.
 */
export async function pruneRuntimeSnapshots(logger: Logger, now = Date.now()): Promise<void> {
  if (runtimeSnapshotsPruned) return;
  runtimeSnapshotsPruned = true;
  const current = new Set(
    await Promise.all(
      PYTHON_VERSIONS.map(async (python) => runtimeFileName(python, await runtimeKey(python))),
    ),
  );
  const folder = snapshotCacheDir();
  try {
    for await (const entry of Deno.readDir(folder)) {
      const name = entry.name;
      if (entry.isFile && name.endsWith(".snapshot.lock")) {
        await removeUnusedLockFile(`${folder}/${name.slice(0, -".lock".length)}`, logger);
        continue;
      }
      const stale = /^runtime-python[\d.]+-\w+\.snapshot$/.test(name) && !current.has(name);
      // writeFile() renames its temporary file at once; one that is left belongs to a build that crashed.
      const leftover = /\.snapshot\.\d+\.\w+\.tmp$/.test(name);
      if (!entry.isFile || (!stale && !leftover)) continue;
      const path = `${folder}/${name}`;
      const used = (await Deno.stat(path).catch(() => null))?.mtime?.getTime();
      if (used === undefined || now - used < (stale ? RUNTIME_SNAPSHOT_UNUSED_MS : LEFTOVER_MS)) {
        continue;
      }
      const description = stale
        ? "a runtime snapshot of another build"
        : "a temporary file of a snapshot build that did not finish";
      try {
        await Deno.remove(path);
        logger.info(
          `removed ${path}: ${description}, unused for ${
            Math.floor((now - used) / 86_400_000)
          } days`,
        );
        if (stale) await removeUnusedLockFile(path, logger);
      } catch (error) {
        logger.warning(`cannot remove ${path} (${description}): ${error}`);
      }
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) {
      logger.warning(`cannot look for unused runtime snapshots in ${folder}: ${error}`);
    }
  }
}

/**
 * Returns whether a file may have changed while the application imported it.
 * The stamps are taken after the import, so a file saved during the build
 * would look unchanged next time although the snapshot contains its old
 * code. A modification time after `end` is a clock that runs ahead (a
 * network file system), not an edit. A file moved into place keeps its older
 * modification time, but its change time is the move's. Deno gives change
 * times in whole seconds, so a change time in the build's first second counts
 * only when it is later than the modification time's second.
 */
function changedDuringBuild(stamp: FileStamp, start: number, end: number): boolean {
  const [, , mtime, , ctime] = stamp;
  if (mtime >= start && mtime <= end) return true;
  const startSecond = Math.floor(start / 1000) * 1000;
  return ctime >= startSecond && ctime <= end && ctime > Math.floor(mtime / 1000) * 1000;
}

async function buildApplicationSnapshot(
  options: BootOptions,
  key: string,
  runtime: SharedArrayBuffer,
  wasmModule: WebAssembly.Module | null,
  reason: string,
): Promise<SharedArrayBuffer> {
  const { app, logger } = options;
  logger.info(`building the application snapshot (${reason})`);
  const started = performance.now();
  const buildStartedAt = Date.now();
  const built = await buildInWorker(
    {
      type: "build-snapshot",
      python: app.python,
      modules: [],
      base: runtime,
      wasmModule,
      app,
      identity: processIdentity(),
    },
    [options.pyodideFolder, ...appReadPaths(app)],
    logger,
  );
  const files = await fileStamps(built.files);
  const folders = await folderStamps(built.folders);
  const path = applicationPath(app, key);
  const builtAt = Date.now();
  const editedDuringBuild = files.find((stamp) =>
    changedDuringBuild(stamp, buildStartedAt, builtAt)
  );
  if (editedDuringBuild) {
    logger.info(
      `application snapshot not cached: ${
        editedDuringBuild[0]
      } changed while the application was imported; ` +
        "the next start builds it again",
    );
    return unpackSnapshot(packSnapshot(built.bytes), built.bytes.length);
  }
  const { snapshot, written } = await writeSnapshot(
    path,
    key,
    built.bytes,
    { files, folders, builtAt: buildStartedAt },
    logger,
  );
  if (written) await pruneApplicationSnapshots(logger);
  logger.info(
    `application snapshot built in ${Math.round(performance.now() - started)} ms ` +
      `(${files.length} imported ${files.length === 1 ? "file" : "files"} watched)` +
      (written ? `: ${path}` : ", for this run only"),
  );
  return snapshot;
}

/**
 * Prepares what the isolates of `options.app` start from: the application
 * snapshot when allowed and possible, else the runtime snapshot, else
 * nothing. Failures are logged with their reason and fall back one level.
 * Then unused runtime snapshots of other builds are deleted in the background.
 */
export async function prepareBoot(options: BootOptions): Promise<Boot> {
  const boot = await chooseBoot(options);
  // Not awaited, so that the cleanup delays no start.
  void pruneRuntimeSnapshots(options.logger);
  void warnOpenCacheFolder(options.logger);
  return boot;
}

let cacheFolderChecked = false;

/**
 * Logs a warning, once per process, when every user may write the cache
 * folder without the sticky bit: another user can then delete or replace
 * its files. Each file's owner and mode are still checked before it is
 * used, so a replaced file is rebuilt, but snapshots keep being rebuilt.
 */
async function warnOpenCacheFolder(logger: Logger): Promise<void> {
  if (cacheFolderChecked) return;
  cacheFolderChecked = true;
  const folder = snapshotCacheDir();
  const mode = (await Deno.stat(folder).catch(() => null))?.mode;
  if (mode === null || mode === undefined) return;
  if ((mode & 0o002) === 0 || (mode & 0o1000) !== 0) return;
  logger.warning(
    `the snapshot cache folder ${folder} may be written by every user (mode ${
      (mode & 0o7777).toString(8)
    }), so another user can delete or replace its snapshots; run \`chmod 700 ${folder}\``,
  );
}

async function chooseBoot(options: BootOptions): Promise<Boot> {
  const { app, logger } = options;
  // The module compiles in the background while the snapshot is read and checked.
  const compiling = compiledInterpreter(app.python, options.pyodideFolder, logger);
  const mode = app.snapshot ?? "app";
  if (mode === "off") return { snapshot: null, wasmModule: await compiling, kind: "none" };

  // A valid application snapshot needs no runtime snapshot: skip reading it.
  let appKey: string | undefined;
  let reason = "";
  if (mode === "app") {
    const runtime = await runtimeKey(app.python);
    appKey = await applicationKey(app, runtime);
    const cached = await cachedApplicationSnapshot(app, appKey);
    if (typeof cached !== "string") {
      // The runtime snapshot stays in use through this one, so it must not age out.
      void touch(`${snapshotCacheDir()}/${runtimeFileName(app.python, runtime)}`);
      return {
        snapshot: cached,
        wasmModule: await compiling,
        kind: "application",
        path: applicationPath(app, appKey),
      };
    }
    reason = cached;
  }
  const wasmModule = await compiling;

  let runtime: { key: string; snapshot: SharedArrayBuffer };
  try {
    runtime = await runtimeSnapshot(options, wasmModule);
  } catch (error) {
    logger.warning(
      `cannot use a runtime snapshot, isolates start from scratch: ${errorText(error)}`,
    );
    return { snapshot: null, wasmModule, kind: "none" };
  }
  if (!appKey) return { snapshot: runtime.snapshot, wasmModule, kind: "runtime" };

  try {
    const key = appKey;
    const recheck = async () => {
      const built = await cachedApplicationSnapshot(app, key);
      if (typeof built === "string") return undefined;
      logger.info("using the application snapshot that another build made meanwhile");
      return built;
    };
    const snapshot = await withBuildLock(
      applicationPath(app, key),
      logger,
      recheck,
      () => buildApplicationSnapshot(options, key, runtime.snapshot, wasmModule, reason),
    );
    return { snapshot, wasmModule, kind: "application", path: applicationPath(app, key) };
  } catch (error) {
    // The whole traceback stays: an import that fails only in the build (a
    // socket opened at import, for one) leaves no other trace of it.
    const text = errorText(error);
    const cause = /^Traceback/m.test(text)
      ? "the application raised an exception while it was imported for the snapshot, " +
        "so each isolate imports it itself and logs the error again if it fails there too"
      : "each isolate imports the application itself";
    logger.warning(`no application snapshot: ${cause}: ${text}`);
    return { snapshot: runtime.snapshot, wasmModule, kind: "runtime" };
  }
}

function errorText(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
