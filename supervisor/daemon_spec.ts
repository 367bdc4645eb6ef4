/**
 * Daemon process groups: what one `--daemon group=NAME,key=value,...`
 * defines, with mod_wsgi's key names and meanings, and the parser that checks
 * every key and value before anything starts.
 *
 * The parser reads the file system only to check that named folders exist
 * (which also turns them into absolute real paths). User and group names are
 * resolved later, when the server starts the group.
 */

import { resolve } from "node:path";
import { type AppSpec, PYTHON_VERSIONS, type PythonVersion } from "./app_spec.ts";
import { NetEntryError, parseNetAllowEntry } from "../wasm/net_policy.ts";

/** One daemon process group as the command line defines it. */
export interface DaemonGroupSpec {
  /** Unique name of the group, used by `--process-group` and in log lines. */
  name: string;
  /** Daemon processes kept running. @default 1 */
  processes: number;
  /** Maximum isolates (concurrent requests) per process, created on demand. @default 15 */
  threads: number;
  /** User name or numeric uid the processes run as (server started as root only). */
  user?: string;
  /** Group name or numeric gid the processes run as (server started as root only). */
  group?: string;
  /** Absolute real path of the working directory of the processes and their interpreters. */
  home?: string;
  /** Absolute real paths added to `sys.path` after the script's folder. */
  pythonPath: string[];
  /** Python version of the group; unset means the server's `--python`. */
  python?: PythonVersion;
  /** Name `ps` shows for the processes. @default "(wsgi:NAME)" */
  displayName: string;
  /** Requests after which a process is replaced; 0 turns it off. @default 0 */
  maximumRequests: number;
  /** Bytes of wasm memory above which an isolate of a process is replaced after its request; 0 turns it off. @default 0 */
  memoryLimitBytes: number;
  /** Bytes past which an isolate's wasm memory may not grow (see PoolOptions.memoryMaxBytes); 0 for no cap. @default 0 */
  memoryMaxBytes: number;
  /** Milliseconds after which a process is replaced; 0 turns it off. @default 0 */
  restartIntervalMs: number;
  /** Milliseconds an isolate may stay idle before it is retired; 0 keeps it. @default 60000 */
  inactivityTimeoutMs: number;
  /** Milliseconds a request may run before it fails with 504; 0 turns it off. @default 60000 */
  requestTimeoutMs: number;
  /** Milliseconds a request may wait for a free isolate before it fails with 503. @default 45000 */
  queueTimeoutMs: number;
  /** Milliseconds a process may take to become ready. @default 30000 */
  startupTimeoutMs: number;
  /** Milliseconds a replaced process may take to finish its requests. @default 15000 */
  gracefulTimeoutMs: number;
  /** Milliseconds the processes may take to finish their requests when the server stops. @default 5000 */
  shutdownTimeoutMs: number;
  /**
   * Milliseconds a process with requests may stay silent, without a reply
   * even to a ping, before the front kills it as hung; 0 turns it off.
   * @default 60000
   */
  socketTimeoutMs: number;
  /** Variables set in `os.environ` of the group's interpreters. */
  environment: Record<string, string>;
  /** Hosts (HOST or HOST:PORT) the application may connect to. */
  allowNet: string[];
  /** Absolute real paths of folders the application may write to. */
  allowWrite: string[];
}

/** An invalid group definition; the message names the key, the value and the accepted form. */
export class DaemonSpecError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "DaemonSpecError";
  }
}

const MAX_PROCESSES = 64;
const MAX_THREADS = 256;
/**
 * Maximum duration in seconds (about 24.8 days). setTimeout() takes at most
 * 2^31 - 1 ms and fires at once for anything longer.
 */
export const MAX_SECONDS = 2_147_483;

/** The accepted form of a duration in seconds, for error messages. */
export const SECONDS_FORM =
  `seconds from 0 to ${MAX_SECONDS} with at most 3 decimals, such as 30 or 2.5`;
const POSITIVE_SECONDS_FORM =
  `seconds above 0 up to ${MAX_SECONDS} with at most 3 decimals, such as 30 or 2.5`;

/** Converts a duration such as "30" or "2.5" seconds to milliseconds; undefined when not in SECONDS_FORM. */
export function parseSeconds(value: string): number | undefined {
  // Number() would also accept "", "1e3" and "0x1f".
  if (!/^[0-9]+(\.[0-9]{1,3})?$/.test(value) || Number(value) > MAX_SECONDS) return undefined;
  return Math.round(Number(value) * 1000);
}

const MEBIBYTE = 1024 * 1024;
/** Smallest memory limit: a fresh isolate's wasm memory alone is about 30 MiB. */
const MIN_MEMORY_LIMIT = 32 * MEBIBYTE;
/** Largest memory limit: a wasm32 memory cannot grow past 4 GiB. */
const MAX_MEMORY_LIMIT = 4096 * MEBIBYTE;
const SIZE_UNITS: Record<string, number> = { "": 1, K: 1024, M: MEBIBYTE, G: 1024 * MEBIBYTE };

/** The accepted form of a memory size, for error messages. */
export const SIZE_FORM =
  "0 (off), or a size from 32M to 4G: bytes, or a number with K, M or G (powers of 1024), such as 512M";

/**
 * Converts a size such as "65536", "64K" or "1M" to bytes, with no range
 * check. Returns undefined when it is not a number with an optional K, M or G.
 */
export function parseBytes(value: string): number | undefined {
  const match = /^([0-9]{1,13})([KMG]?)$/i.exec(value);
  return match ? Number(match[1]) * SIZE_UNITS[match[2].toUpperCase()] : undefined;
}

/**
 * Converts a size such as "536870912", "512M" or "1G" to bytes; undefined
 * when not in SIZE_FORM. Plain numbers are bytes, as in mod_wsgi's memory-limit.
 */
export function parseSize(value: string): number | undefined {
  const bytes = parseBytes(value);
  if (bytes === undefined) return undefined;
  if (bytes === 0) return 0;
  return bytes >= MIN_MEMORY_LIMIT && bytes <= MAX_MEMORY_LIMIT ? bytes : undefined;
}

/** Group names: what a log line, a file name and `ps` can show without quoting. */
const GROUP_NAME = /^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/;
const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
/** A user or group: a POSIX account name or a numeric id. */
const ACCOUNT = /^([a-z_][a-z0-9_-]{0,31}\$?|[0-9]{1,10})$/i;

/** Reader of the server's environment variables, which returns undefined for an unset one. */
export type VariableReader = (name: string) => string | undefined;

/** Reader for an empty environment, where no variable is set. */
export const NO_VARIABLES: VariableReader = () => undefined;

/**
 * Reads an environment item: NAME=VALUE, or NAME alone for the server's own
 * variable NAME. Returns the name and the value, or, for an invalid item or
 * an unset variable, the accepted form for the error message.
 */
export function parseEnvironmentItem(
  item: string,
  variable: VariableReader,
): [string, string] | { expected: string } {
  const equals = item.indexOf("=");
  const name = equals < 0 ? item : item.slice(0, equals);
  if (!ENV_NAME.test(name)) {
    return {
      expected: "NAME=VALUE or NAME, with NAME of letters, digits and '_', such as DEBUG=1",
    };
  }
  if (equals >= 0) return [name, item.slice(equals + 1)];
  const inherited = variable(name);
  if (inherited === undefined) {
    return {
      expected:
        `NAME=VALUE, or the NAME of a variable of the server's environment, where ${name} is not set`,
    };
  }
  return [name, inherited];
}

type KeyParser = (
  value: string,
  spec: DaemonGroupSpec,
  cwd: string,
  variable: VariableReader,
) => void;

interface KeySpec {
  /** Accepted form, as error messages and the help show it. */
  form: string;
  /** Whether the key may be given more than once. */
  repeatable: boolean;
  parse: KeyParser;
}

/** Every key a group accepts, with mod_wsgi's name. */
const KEYS: Record<string, KeySpec> = {
  "processes": {
    form: `an integer from 1 to ${MAX_PROCESSES}`,
    repeatable: false,
    parse: (value, spec) => {
      spec.processes = parseInteger("processes", value, 1, MAX_PROCESSES);
    },
  },
  "threads": {
    form: `an integer from 1 to ${MAX_THREADS}`,
    repeatable: false,
    parse: (value, spec) => {
      spec.threads = parseInteger("threads", value, 1, MAX_THREADS);
    },
  },
  "user": {
    form: "a user name or numeric uid",
    repeatable: false,
    parse: (value, spec) => {
      spec.user = parseAccount("user", value);
    },
  },
  "group": {
    form: "a group name or numeric gid",
    repeatable: false,
    parse: (value, spec) => {
      spec.group = parseAccount("group", value);
    },
  },
  "home": {
    form: "an existing directory",
    repeatable: false,
    parse: (value, spec, cwd) => {
      spec.home = parseDirectory("home", value, cwd);
    },
  },
  "python-path": {
    form: "existing directories separated by ':'",
    repeatable: true,
    parse: (value, spec, cwd) => {
      for (const part of value.split(":")) {
        spec.pythonPath.push(parseDirectory("python-path", part, cwd));
      }
    },
  },
  "python": {
    form: PYTHON_VERSIONS.join(" or "),
    repeatable: false,
    parse: (value, spec) => {
      const version = PYTHON_VERSIONS.find((candidate) => candidate === value);
      if (!version) throw invalidKey("python", value, PYTHON_VERSIONS.join(" or "));
      spec.python = version;
    },
  },
  "display-name": {
    form: "printable ASCII without spaces; %{GROUP} stands for (wsgi:NAME)",
    repeatable: false,
    parse: (value, spec) => {
      if (!/^[\x21-\x7e]{1,64}$/.test(value)) {
        throw invalidKey(
          "display-name",
          value,
          "1 to 64 printable ASCII characters without spaces",
        );
      }
      spec.displayName = value.replaceAll("%{GROUP}", `(wsgi:${spec.name})`);
    },
  },
  "maximum-requests": {
    form: "an integer from 0 (off) to 1000000000",
    repeatable: false,
    parse: (value, spec) => {
      spec.maximumRequests = parseInteger("maximum-requests", value, 0, 1_000_000_000);
    },
  },
  "memory-limit": sizeKey("memory-limit", (spec, bytes) => (spec.memoryLimitBytes = bytes)),
  "memory-max": sizeKey("memory-max", (spec, bytes) => (spec.memoryMaxBytes = bytes)),
  "restart-interval": secondsKey("restart-interval", (spec, ms) => (spec.restartIntervalMs = ms)),
  "inactivity-timeout": secondsKey(
    "inactivity-timeout",
    (spec, ms) => (spec.inactivityTimeoutMs = ms),
  ),
  "request-timeout": secondsKey("request-timeout", (spec, ms) => (spec.requestTimeoutMs = ms)),
  "queue-timeout": secondsKey("queue-timeout", (spec, ms) => (spec.queueTimeoutMs = ms)),
  "startup-timeout": {
    form: POSITIVE_SECONDS_FORM,
    repeatable: false,
    parse: (value, spec) => {
      // 0 would give every process and isolate no time to start at all.
      const ms = parseSeconds(value);
      if (ms === undefined || ms === 0) {
        throw invalidKey("startup-timeout", value, POSITIVE_SECONDS_FORM);
      }
      spec.startupTimeoutMs = ms;
    },
  },
  "graceful-timeout": secondsKey("graceful-timeout", (spec, ms) => (spec.gracefulTimeoutMs = ms)),
  "shutdown-timeout": secondsKey("shutdown-timeout", (spec, ms) => (spec.shutdownTimeoutMs = ms)),
  "socket-timeout": secondsKey("socket-timeout", (spec, ms) => (spec.socketTimeoutMs = ms)),
  "env": {
    form:
      "NAME=VALUE with NAME of letters, digits and '_', or NAME alone for the server's own variable",
    repeatable: true,
    parse: (value, spec, _cwd, variable) => {
      const item = parseEnvironmentItem(value, variable);
      if ("expected" in item) throw invalidKey("env", value, item.expected);
      spec.environment[item[0]] = item[1];
    },
  },
  "allow-net": {
    form: "HOST or HOST:PORT, such as 127.0.0.1:5432 or [::1]:80",
    repeatable: true,
    parse: (value, spec) => {
      // The same check as --allow-net's, so that both accept the same entries.
      try {
        parseNetAllowEntry(value);
      } catch (error) {
        if (!(error instanceof NetEntryError)) throw error;
        throw invalidKey("allow-net", value, error.expected);
      }
      spec.allowNet.push(value);
    },
  },
  "allow-write": {
    form: "an existing directory",
    repeatable: true,
    parse: (value, spec, cwd) => {
      spec.allowWrite.push(parseDirectory("allow-write", value, cwd));
    },
  },
  // The same setting under the name the embedded option --write suggests.
  "write": {
    form: "an existing directory (same as allow-write)",
    repeatable: true,
    parse: (value, spec, cwd) => {
      spec.allowWrite.push(parseDirectory("write", value, cwd));
    },
  },
};

/** The keys a group accepts, in the order the help lists them. */
export const DAEMON_KEYS: readonly string[] = Object.keys(KEYS);

/** Returns a group with every default and no key applied. */
export function defaultGroupSpec(name: string): DaemonGroupSpec {
  return {
    name,
    processes: 1,
    threads: 15,
    pythonPath: [],
    displayName: `(wsgi:${name})`,
    maximumRequests: 0,
    memoryLimitBytes: 0,
    memoryMaxBytes: 0,
    restartIntervalMs: 0,
    inactivityTimeoutMs: 60_000,
    requestTimeoutMs: 60_000,
    queueTimeoutMs: 45_000,
    // mod_wsgi-express uses 15 s. A cold Pyodide start took 2-7 s on two busy
    // cores here, and several processes of a server start at the same time.
    startupTimeoutMs: 30_000,
    gracefulTimeoutMs: 15_000,
    shutdownTimeoutMs: 5_000,
    socketTimeoutMs: 60_000,
    environment: {},
    allowNet: [],
    allowWrite: [],
  };
}

/**
 * Parses `group=NAME,key=value,...` (or mod_wsgi's `NAME,key=value,...`).
 *
 * The first item names the group. After it, `group=` is mod_wsgi's Unix
 * group key. Values cannot contain ','; keys marked repeatable may be given
 * more than once. Relative paths resolve against `cwd`.
 *
 * @throws {DaemonSpecError} An item is empty, a key unknown or repeated, or a value invalid.
 */
export function parseDaemonSpec(
  text: string,
  cwd: string,
  variable: VariableReader = NO_VARIABLES,
): DaemonGroupSpec {
  const [first, ...items] = text.split(",");
  const name = first.startsWith("group=") ? first.slice("group=".length) : first;
  if (first.includes("=") && !first.startsWith("group=")) {
    throw new DaemonSpecError(
      `the first item must name the group as group=NAME, not ${quote(first)}`,
    );
  }
  if (!GROUP_NAME.test(name)) {
    throw new DaemonSpecError(
      `invalid group name ${quote(name)} (expected 1 to 64 letters, digits, '_', '.' or '-', ` +
        "not starting with '.' or '-')",
    );
  }

  const spec = defaultGroupSpec(name);
  const seen = new Set<string>();
  for (const [index, item] of items.entries()) {
    const equals = item.indexOf("=");
    if (equals <= 0) {
      // A comma ends every value, so one inside a value makes its rest an item of its own.
      const previous = index > 0 ? items[index - 1] : first;
      const comma = previous.includes("=") && !Object.hasOwn(KEYS, item)
        ? `; a comma ends each value, so ${quote(previous)} ended before ',${item}': ` +
          "a value cannot contain a comma (give env=NAME alone to pass such a value from the server's environment)"
        : "";
      throw new DaemonSpecError(
        `invalid item ${quote(item)} (expected key=value, such as processes=2)${comma}`,
      );
    }
    const key = item.slice(0, equals);
    const value = item.slice(equals + 1);
    const keySpec = Object.hasOwn(KEYS, key) ? KEYS[key] : undefined;
    if (!keySpec) {
      throw new DaemonSpecError(
        `unknown key ${quote(key)} (accepted keys: ${DAEMON_KEYS.join(", ")})`,
      );
    }
    if (seen.has(key) && !keySpec.repeatable) {
      throw new DaemonSpecError(`key ${quote(key)} is given twice (give it once)`);
    }
    seen.add(key);
    keySpec.parse(value, spec, cwd, variable);
  }
  const limitProblem = memoryLimitProblem(
    spec.memoryLimitBytes,
    spec.memoryMaxBytes,
    ["memory-limit", "memory-max"],
  );
  if (limitProblem) throw new DaemonSpecError(limitProblem);
  return spec;
}

/**
 * Says what is wrong when a memory limit (replace the isolate after its
 * request) is at or above the memory cap (refuse the allocation). Memory
 * never gets past the cap, so such a limit never acts. Returns undefined
 * when the two fit. The last argument contains the names of the two settings.
 */
export function memoryLimitProblem(
  limitBytes: number,
  maxBytes: number,
  [limit, max]: [string, string],
): string | undefined {
  if (limitBytes === 0 || maxBytes === 0 || limitBytes < maxBytes) return undefined;
  return `${limit} (${limitBytes} bytes) is not below ${max} (${maxBytes} bytes), so an ` +
    `isolate never passes it: give a ${limit} below ${max}, or leave ${limit} out`;
}

/**
 * Returns the application as the group runs it: the group's Python version,
 * its python-path after the script's own path, its home and environment,
 * and the server's --allow-net and --write grants plus the group's own.
 */
export function groupAppSpec(app: AppSpec, group: DaemonGroupSpec): AppSpec {
  const spec: AppSpec = {
    ...app,
    python: group.python ?? app.python,
    pythonPath: [...new Set([...app.pythonPath, ...group.pythonPath])],
    // Variables from --env apply to every application; the group's env keys add to them.
    environment: { ...app.environment, ...group.environment },
    writePaths: [...new Set([...(app.writePaths ?? []), ...group.allowWrite])],
    allowNet: [...new Set([...(app.allowNet ?? []), ...group.allowNet])],
  };
  if (group.home !== undefined) spec.home = group.home;
  return spec;
}

function secondsKey(key: string, set: (spec: DaemonGroupSpec, ms: number) => void): KeySpec {
  return {
    form: SECONDS_FORM,
    repeatable: false,
    parse: (value, spec) => {
      const ms = parseSeconds(value);
      if (ms === undefined) throw invalidKey(key, value, SECONDS_FORM);
      set(spec, ms);
    },
  };
}

function sizeKey(key: string, set: (spec: DaemonGroupSpec, bytes: number) => void): KeySpec {
  return {
    form: SIZE_FORM,
    repeatable: false,
    parse: (value, spec) => {
      const bytes = parseSize(value);
      if (bytes === undefined) throw invalidKey(key, value, SIZE_FORM);
      set(spec, bytes);
    },
  };
}

function parseInteger(key: string, value: string, min: number, max: number): number {
  const number = Number(value);
  if (!/^[0-9]+$/.test(value) || number < min || number > max) {
    throw invalidKey(key, value, `an integer from ${min} to ${max}`);
  }
  return number;
}

function parseAccount(key: "user" | "group", value: string): string {
  if (!ACCOUNT.test(value)) {
    throw invalidKey(
      key,
      value,
      key === "user" ? "a user name or numeric uid" : "a group name or numeric gid",
    );
  }
  return value;
}

function parseDirectory(key: string, value: string, cwd: string): string {
  if (value === "") {
    // resolve() would turn it into the server's working folder.
    throw invalidKey(key, value, "an existing directory, not an empty path");
  }
  const path = resolve(cwd, value);
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch {
    throw invalidKey(key, value, `an existing directory, but ${quote(path)} does not exist`);
  }
  if (!info.isDirectory) {
    throw invalidKey(key, value, `an existing directory, but ${quote(path)} is a file`);
  }
  // Symbolic links stay, as for the server's own folders (see runtime/cli.ts).
  return path;
}

// deno-lint-ignore no-control-regex -- control characters are what must be escaped
const CONTROL_CHARACTERS = /[\x00-\x1f\x7f]/g;

function invalidKey(key: string, value: string, expected: string): DaemonSpecError {
  return new DaemonSpecError(`invalid value for ${key}: ${quote(value)} (expected ${expected})`);
}

function quote(value: string): string {
  const escaped = value.replace(
    CONTROL_CHARACTERS,
    (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, "0")}`,
  );
  return `'${escaped}'`;
}
