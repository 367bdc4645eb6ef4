/**
 * How the front starts a daemon process: which user it runs as, which
 * executable and arguments, which Deno permissions and which environment.
 *
 * Under `deno run`, `Deno.execPath()` is deno itself, so the command repeats
 * `run`, the entry module and the flags the program needs. A compiled binary
 * is the program itself and takes only the subcommand, because its
 * permissions were fixed when it was compiled.
 *
 * The group's display-name is the last argument, so `ps -ef` shows it and
 * `pkill -f '(wsgi:NAME)'` finds the group's processes. (Deno lets a process
 * rename itself through /proc/self/comm only with --allow-all.)
 *
 * The permissions of a daemon process under `deno run`, and why each one:
 * - `--allow-read`: the folders of the program's own modules that the
 *   isolate worker loads (wasm/ and supervisor/, code only), because Deno
 *   checks read access for a worker's modules. Pyodide's folder for the
 *   group's Python version, which the isolates load the interpreter from.
 *   The application's folders (script folder, python-path, home,
 *   allow-write folders), which the isolates mount. Nothing else: not the
 *   server's other files, not /etc.
 * - `--allow-write`: only the group's allow-write folders, if any, and the
 *   snapshot cache folder (below).
 * - `--allow-env=WSGIRUN_CACHE_DIR` and read and write access to that
 *   folder: the process keeps memory snapshots there, so a restarted or
 *   reloaded process starts its isolates in a fraction of a second. The
 *   isolates themselves cannot read it.
 * - `--allow-net`: only the group's allow-net hosts. The channel to the front
 *   is the process's standard input and output, which need no permission.
 * - `--allow-sys`: so the process can check that it does not run as root,
 *   tell its isolates what os.getuid() and os.getgid() return, and close the
 *   debugger that SIGUSR1 opens (inspector_guard.ts). Deno 2.9.6 has no
 *   descriptor for the inspector that --allow-sys=NAME accepts, so the
 *   process may read the other system facts too (host name, load). Its
 *   isolates may read none of them.
 * - no other `--allow-env`, and no `--allow-run` or `--allow-ffi`. The
 *   environment is cleared too, except for the variables that locate Deno's
 *   cache and glibc's malloc setting (see malloc.ts).
 * Deno's own module cache (DENO_DIR) is read by the Deno CLI, not through
 * these permissions.
 *
 * A group that runs as another user than the server gets cache folders that
 * user owns (Deno's cache and the snapshots), because the server's are
 * usually under root's home, which other users cannot read. They persist
 * between runs in the system's temporary folder, one per uid, and are used
 * only if they are private to that uid.
 */

import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import {
  appReadPaths,
  type AppSpec,
  PYODIDE_SPECIFIER,
  type PythonVersion,
  withMountRoots,
} from "./app_spec.ts";
import type { DaemonGroupSpec } from "./daemon_spec.ts";
import { DAEMON_SUBCOMMAND } from "./daemon_protocol.ts";
import { daemonMallocEnvironment } from "./malloc.ts";
import { pyodideFolder } from "./isolate.ts";
import { snapshotCacheDir } from "./snapshots.ts";
import { ISOLATE_WORKER_URL } from "./worker_url.ts";

/** A group that cannot start as configured (user unknown, would run as root, ...). */
export class DaemonConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DaemonConfigError";
  }
}

/** The account a group's processes run as; unset ids mean the server's own. */
export interface DaemonIdentity {
  uid?: number;
  gid?: number;
  /** For log lines: "nobody (uid 65534, gid 65534)" or "the server's user". */
  description: string;
}

/** Cache folders of a group's processes. */
export interface DaemonCache {
  /** Deno's module cache; unset means the server's own. */
  denoDir?: string;
  /** Folder of the processes' memory snapshots. */
  snapshotDir: string;
  /** A copy of the executable the group's user can run; unset means Deno.execPath(). */
  executable?: string;
}

/** Everything `Deno.Command` needs to start one daemon process. */
export interface DaemonLaunch {
  command: string;
  args: string[];
  cwd: string;
  env: Record<string, string>;
  uid?: number;
  gid?: number;
}

interface AccountEntry {
  name: string;
  id: number;
  /** The user's primary group (passwd entries only). */
  gid?: number;
}

/** Reads name:x:id:gid entries from /etc/passwd or /etc/group. */
function readAccounts(path: string): AccountEntry[] {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    throw new DaemonConfigError(`failed to read ${path} to look up accounts: ${error}`);
  }
  const entries: AccountEntry[] = [];
  for (const line of text.split("\n")) {
    const fields = line.split(":");
    if (fields.length < 3 || line.startsWith("#")) continue;
    const gid = fields.length > 3 ? Number(fields[3]) : undefined;
    entries.push({ name: fields[0], id: Number(fields[2]), gid });
  }
  return entries;
}

function lookupUser(value: string): AccountEntry {
  const entries = readAccounts("/etc/passwd");
  const entry = /^[0-9]+$/.test(value)
    ? entries.find((candidate) => candidate.id === Number(value))
    : entries.find((candidate) => candidate.name === value);
  if (entry) return entry;
  if (/^[0-9]+$/.test(value)) return { name: value, id: Number(value) };
  throw new DaemonConfigError(
    `user '${value}' not found in /etc/passwd (give an existing user or a numeric uid)`,
  );
}

function lookupGroup(value: string): number {
  if (/^[0-9]+$/.test(value)) return Number(value);
  const entry = readAccounts("/etc/group").find((candidate) => candidate.name === value);
  if (!entry) {
    throw new DaemonConfigError(
      `group '${value}' not found in /etc/group (give an existing group or a numeric gid)`,
    );
  }
  return entry.id;
}

/**
 * Decides which account a group runs as. A server started as root must name
 * an unprivileged user, because a daemon never runs as root. A server
 * started as another user can only run its groups as itself.
 *
 * @throws {DaemonConfigError} With the key, the value and the fix.
 */
export function resolveIdentity(
  spec: DaemonGroupSpec,
  serverUid = Deno.uid(),
  serverGid = Deno.gid(),
): DaemonIdentity {
  const where = `group '${spec.name}'`;
  if (serverUid !== 0) {
    const user = spec.user === undefined ? undefined : lookupUser(spec.user);
    const gid = spec.group === undefined ? undefined : lookupGroup(spec.group);
    if ((user && user.id !== serverUid) || (gid !== undefined && gid !== serverGid)) {
      throw new DaemonConfigError(
        `${where}: user= and group= need the server to run as root (it runs as uid ${serverUid}); ` +
          "remove them to run the group as the server's user",
      );
    }
    return { description: `the server's user (uid ${serverUid})` };
  }

  if (spec.user === undefined) {
    throw new DaemonConfigError(
      `${where} would run as root: add user=NAME with an unprivileged account, such as ` +
        `user=nobody (a daemon never runs as root)`,
    );
  }
  const user = lookupUser(spec.user);
  if (user.id === 0) {
    throw new DaemonConfigError(
      `${where}: user=${spec.user} is root (a daemon never runs as root; give an unprivileged user)`,
    );
  }
  const gid = spec.group === undefined ? user.gid : lookupGroup(spec.group);
  if (gid === undefined) {
    throw new DaemonConfigError(
      `${where}: user=${spec.user} has no entry in /etc/passwd, so its group is unknown; add group=NAME`,
    );
  }
  if (gid === 0) {
    throw new DaemonConfigError(
      `${where}: group ${
        spec.group ?? "of user " + spec.user
      } is root's group (gid 0); give group=NAME with another group`,
    );
  }
  return { uid: user.id, gid, description: `${user.name} (uid ${user.id}, gid ${gid})` };
}

/** Finds deno.json or deno.jsonc in the folder of `file` or above it, as `deno run` would. */
function findConfigFile(file: string): string | undefined {
  let folder = dirname(file);
  for (;;) {
    for (const name of ["deno.json", "deno.jsonc"]) {
      try {
        if (Deno.statSync(`${folder}/${name}`).isFile) return `${folder}/${name}`;
      } catch {
        // Not in this folder; look in the parent.
      }
    }
    const parent = dirname(folder);
    if (parent === folder) return undefined;
    folder = parent;
  }
}

/**
 * Variables that tell the process where its caches are, and glibc's malloc
 * setting (see malloc.ts); nothing else of the server's environment.
 */
function cacheEnvironment(cache: DaemonCache): Record<string, string> {
  const env: Record<string, string> = {
    DENO_NO_UPDATE_CHECK: "1",
    NO_COLOR: "1",
    WSGIRUN_CACHE_DIR: cache.snapshotDir,
    ...daemonMallocEnvironment(),
  };
  if (cache.denoDir !== undefined) {
    env.DENO_DIR = cache.denoDir;
    return env;
  }
  for (const name of ["DENO_DIR", "HOME", "XDG_CACHE_HOME"]) {
    const value = Deno.env.get(name);
    if (value !== undefined) env[name] = value;
  }
  return env;
}

/**
 * Returns a folder only `uid` can use, creating it if needed. An existing
 * folder is used only if it is a real directory that `uid` owns with no
 * access for others, so no other user can plant files in a daemon's cache.
 */
async function privateFolder(path: string, uid: number, gid: number): Promise<string> {
  try {
    await Deno.mkdir(path, { mode: 0o700 });
    await Deno.chown(path, uid, gid);
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) throw error;
  }
  const info = await Deno.lstat(path);
  if (!info.isDirectory || info.uid !== uid || ((info.mode ?? 0) & 0o077) !== 0) {
    throw new DaemonConfigError(
      `cache folder ${path} is not a private folder of uid ${uid}; remove it so that wsgirun can create it`,
    );
  }
  return path;
}

/** Prepares the cache folders of a group's processes (see the module documentation). */
export async function prepareDaemonCache(identity: DaemonIdentity): Promise<DaemonCache> {
  if (identity.uid === undefined || identity.gid === undefined) {
    return { snapshotDir: snapshotCacheDir() };
  }
  const { uid, gid } = identity;
  const temporary = Deno.env.get("TMPDIR") || "/tmp";
  const root = await privateFolder(`${temporary}/wsgirun-daemon-cache-${uid}`, uid, gid);
  const cache: DaemonCache = {
    denoDir: await privateFolder(`${root}/deno`, uid, gid),
    snapshotDir: await privateFolder(`${root}/snapshots`, uid, gid),
  };
  const executable = await executableFor(root, uid, gid);
  if (executable !== undefined) cache.executable = executable;
  return cache;
}

/** Returns whether every folder above `path` lets other users pass through it. */
async function othersCanReach(path: string): Promise<boolean> {
  for (let folder = dirname(path);; folder = dirname(folder)) {
    const info = await Deno.stat(folder);
    if (((info.mode ?? 0) & 0o001) === 0) return false;
    if (dirname(folder) === folder) return true;
  }
}

/**
 * Returns a copy of the running executable that `uid` can run, or undefined
 * when `uid` can run the original. Deno installed through npm (npx) lives
 * under root's home, which other users cannot enter, so the copy goes into
 * the user's private cache folder, refreshed when the original changes.
 */
async function executableFor(root: string, uid: number, gid: number): Promise<string | undefined> {
  const original = Deno.execPath();
  const info = await Deno.stat(original);
  if (await othersCanReach(original) && ((info.mode ?? 0) & 0o001) !== 0) return undefined;
  const folder = await privateFolder(`${root}/bin`, uid, gid);
  const copy = `${folder}/${original.slice(original.lastIndexOf("/") + 1)}`;
  const existing = await Deno.stat(copy).catch(() => null);
  if (
    existing?.size !== info.size || (existing.mtime?.getTime() ?? 0) < (info.mtime?.getTime() ?? 0)
  ) {
    const temporaryCopy = `${copy}.${Deno.pid}.tmp`;
    await Deno.copyFile(original, temporaryCopy);
    await Deno.chown(temporaryCopy, uid, gid);
    await Deno.chmod(temporaryCopy, 0o500);
    await Deno.rename(temporaryCopy, copy);
  }
  return copy;
}

/** Permission bits of one class in a file mode: execute (enter a folder) and write. */
const ENTER = 0o1;
const WRITE = 0o2;

/**
 * Returns whether `uid` and `gid` have `access` (ENTER or WRITE) to what
 * `info` describes, by its owner, group and other bits.
 */
function permits(info: Deno.FileInfo, uid: number, gid: number, access: number): boolean {
  const mode = info.mode ?? 0;
  let shift = 0;
  if (info.uid === uid) shift = 6;
  else if (info.gid === gid) shift = 3;
  return ((mode >> shift) & access) !== 0;
}

/** An allow-write folder, or a file in one, that the group's user cannot write. */
export interface UnwritablePath {
  path: string;
  mode: number;
  owner: number | null;
}

/** Files checked in each allow-write folder, so that a large folder does not slow the start. */
const WRITE_CHECK_FILES = 1000;

/**
 * Returns the group's allow-write folders that its user cannot write, and
 * the files directly inside them that it cannot write (such as a SQLite
 * database that root created), by their owner, group and other bits. Like
 * unreachableFolder, the result is a reason to warn.
 */
export async function unwritablePaths(
  app: AppSpec,
  identity: DaemonIdentity,
): Promise<{ folders: UnwritablePath[]; files: Map<string, UnwritablePath[]> }> {
  const folders: UnwritablePath[] = [];
  const files = new Map<string, UnwritablePath[]>();
  const { uid, gid } = identity;
  if (uid === undefined || gid === undefined) return { folders, files };
  const describe = (path: string, info: Deno.FileInfo) => ({
    path,
    mode: (info.mode ?? 0) & 0o777,
    owner: info.uid,
  });
  for (const folder of app.writePaths ?? []) {
    const info = await Deno.stat(folder).catch(() => null);
    if (!info) continue;
    if (!permits(info, uid, gid, WRITE)) folders.push(describe(folder, info));
    const found: UnwritablePath[] = [];
    let checked = 0;
    try {
      for await (const entry of Deno.readDir(folder)) {
        if (!entry.isFile) continue;
        if (++checked > WRITE_CHECK_FILES) break;
        const path = `${folder}/${entry.name}`;
        const file = await Deno.stat(path).catch(() => null);
        if (file && !permits(file, uid, gid, WRITE)) found.push(describe(path, file));
      }
    } catch {
      // A folder the server cannot list is reported by the daemon when it is used.
    }
    if (found.length > 0) files.set(folder, found);
  }
  return { folders, files };
}

/**
 * Returns the first folder on the way to the program's code or the
 * application's folders that the group's user cannot enter, with its mode,
 * or undefined when there is none. Supplementary groups of the user are not
 * looked at, so the result is a reason to warn, not to reject the group.
 */
export async function unreachableFolder(
  app: AppSpec,
  identity: DaemonIdentity,
): Promise<{ folder: string; mode: number } | undefined> {
  const { uid, gid } = identity;
  if (uid === undefined || gid === undefined) return undefined;
  const entry = Deno.mainModule.startsWith("file:")
    ? [dirname(fileURLToPath(Deno.mainModule))]
    : [];
  const targets = [...codeFolders(), ...entry, ...appReadPaths(app)];
  for (const target of targets) {
    for (let folder = target;; folder = dirname(folder)) {
      const info = await Deno.stat(folder).catch(() => null);
      if (info && !permits(info, uid, gid, ENTER)) {
        return { folder, mode: (info.mode ?? 0) & 0o777 };
      }
      if (dirname(folder) === folder) break;
    }
  }
  return undefined;
}

/** Returns the folders of the program's own modules that a daemon process's isolates load. */
function codeFolders(): string[] {
  const code = [ISOLATE_WORKER_URL, new URL(import.meta.url)]
    .filter((url) => url.protocol === "file:")
    .map((url) => dirname(fileURLToPath(url)));
  return [...new Set(code)];
}

/**
 * Returns the real path of the Pyodide package of `python` in the
 * node_modules folder beside `config`, if `deno install` has put it there.
 * A daemon process resolves Pyodide through that folder, which may have
 * been installed after the server started and resolved its own copy.
 */
function installedPyodide(config: string, python: PythonVersion): string | undefined {
  const version = PYODIDE_SPECIFIER[python].slice(PYODIDE_SPECIFIER[python].lastIndexOf("@") + 1);
  try {
    return Deno.realPathSync(
      `${dirname(config)}/node_modules/.deno/pyodide@${version}/node_modules/pyodide`,
    );
  } catch {
    return undefined;
  }
}

/**
 * Returns the Deno permission flags of a daemon process (see the module
 * documentation). `config` is the configuration file the process runs with.
 */
export function permissionFlags(app: AppSpec, cache: DaemonCache, config?: string): string[] {
  const installed = config ? installedPyodide(config, app.python) : undefined;
  const read = withMountRoots(app, [
    ...codeFolders(),
    pyodideFolder(app.python),
    ...(installed ? [installed] : []),
    ...appReadPaths(app),
    cache.snapshotDir,
  ]);
  const write = withMountRoots(app, [...(app.writePaths ?? []), cache.snapshotDir]);
  // An empty list after "=" would grant access everywhere, so a flag is left out when it has none.
  const flags = [
    `--allow-read=${read.join(",")}`,
    "--allow-env=WSGIRUN_CACHE_DIR",
    "--allow-sys",
  ];
  if (write.length) flags.push(`--allow-write=${write.join(",")}`);
  if (app.allowNet?.length) flags.push(`--allow-net=${app.allowNet.join(",")}`);
  return flags;
}

/**
 * Builds the command that starts one daemon process of a group.
 */
export function buildDaemonLaunch(
  spec: DaemonGroupSpec,
  app: AppSpec,
  identity: DaemonIdentity,
  cache: DaemonCache,
): DaemonLaunch {
  const launch: DaemonLaunch = {
    command: cache.executable ?? Deno.execPath(),
    args: [],
    cwd: app.home ?? app.pythonPath[0],
    env: cacheEnvironment(cache),
  };
  if (identity.uid !== undefined) launch.uid = identity.uid;
  if (identity.gid !== undefined) launch.gid = identity.gid;

  if (Deno.build.standalone) {
    launch.args = [DAEMON_SUBCOMMAND, spec.displayName];
    return launch;
  }

  const entry = fileURLToPath(Deno.mainModule);
  const config = findConfigFile(entry);
  launch.args = [
    "run",
    "--no-prompt",
    // Modules and npm packages come from the cache the server already filled.
    "--cached-only",
    ...(config ? ["--config", config] : []),
    "--unstable-worker-options",
    ...permissionFlags(app, cache, config),
    entry,
    DAEMON_SUBCOMMAND,
    spec.displayName,
  ];
  return launch;
}
