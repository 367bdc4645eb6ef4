/**
 * Command-line parser for `wsgirun SCRIPT [options]`.
 *
 * One table, {@linkcode OPTIONS}, lists every option with its values, help text and
 * handler, so the parser and {@linkcode HELP_TEXT} cannot drift apart. Parsing does no
 * I/O except checking that named files and directories exist, which also turns them
 * into absolute real paths.
 *
 * The conventions follow most Unix tools. An option that takes a value accepts both
 * `--option VALUE` and `--option=VALUE`. A single-valued option given twice keeps the
 * last value. Arguments after `--` are never read as options.
 *
 * @module
 */

import { basename, dirname, resolve } from "node:path";
import { type AppSpec, PYTHON_VERSIONS, type PythonVersion } from "../supervisor/app_spec.ts";
import { LOG_LEVELS, type LogLevel } from "../supervisor/log.ts";
import { parseNetAllowEntry } from "../wasm/net_policy.ts";
import {
  type DaemonGroupSpec,
  DaemonSpecError,
  memoryLimitProblem,
  NO_VARIABLES,
  parseBytes,
  parseDaemonSpec,
  parseEnvironmentItem,
  parseSeconds,
  parseSize,
  SECONDS_FORM,
  SIZE_FORM,
} from "../supervisor/daemon_spec.ts";
import { AccessLogFormatError, compileAccessLogFormat, FORMAT_FORM } from "./access_log.ts";
import { type AddressRange, parseAddressRange, TRUSTED_PROXY_FORM } from "./proxy.ts";
import { type ConfigLine, ConfigSyntaxError, parseConfigText } from "./config_file.ts";
import { assignProcessGroups, MountConfigError, splitProcessGroup } from "./mounts.ts";
import type { MountSpec, ServerOptions, TlsFiles, UrlAlias } from "./options.ts";

export const WSGIRUN_VERSION = "0.1.0";

const MEBIBYTE = 1024 * 1024;
/**
 * Largest --read-ahead: each request that waits or runs can hold this much,
 * so the default queue limit of 100 already allows 1.6 GiB.
 */
const MAX_READ_AHEAD = 16 * MEBIBYTE;

/** Exit status for an invalid command line, the one Python's argparse uses too. */
export const USAGE_EXIT_CODE = 2;

/** An invalid command line. The message is one line that names the option, the value and what is accepted. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/**
 * Formats a usage error as the line to print on standard error.
 *
 * @example Print the error and exit
 * ```ts
 * try {
 *   parseCommandLine(Deno.args, { cwd: Deno.cwd(), cpus: navigator.hardwareConcurrency });
 * } catch (error) {
 *   if (!(error instanceof UsageError)) throw error;
 *   console.error(formatUsageError(error)); // wsgirun: invalid value for --port: ...
 *   Deno.exit(USAGE_EXIT_CODE);
 * }
 * ```
 */
export function formatUsageError(error: UsageError): string {
  return `wsgirun: ${error.message}`;
}

/** Facts about the process that the defaults depend on. */
export interface ParseEnvironment {
  /** Absolute working directory that relative paths and modules are resolved against. */
  cwd: string;
  /** Number of CPU cores, the default for `--threads`. */
  cpus: number;
  /** Reader of the server's environment variables for `--env NAME`, which returns undefined for an unset one. */
  variable?: (name: string) => string | undefined;
}

/** Result of parsing: the server options, or the help or version text to print. */
export type CommandLine =
  | { kind: "serve"; options: ServerOptions }
  | { kind: "help"; text: string }
  | { kind: "version"; text: string };

/** Option values collected before SCRIPT is resolved. */
export interface OptionValues {
  host: string;
  port: number;
  certFile?: string;
  keyFile?: string;
  unixSocket?: string;
  pidFile?: string;
  threads: number;
  python: PythonVersion;
  /** Absolute real paths from `--python-path`, in the order given. */
  pythonPath: string[];
  /** `--allow-net` values, checked and kept as given. */
  allowNet: string[];
  /** From `--env`, by name. */
  environment: Record<string, string>;
  /** Absolute real paths from `--write`. */
  writePaths: string[];
  callableObject?: string;
  mountPoint: string;
  urlAliases: UrlAlias[];
  trustedProxies: AddressRange[];
  accessLog: boolean;
  accessLogFormat: string;
  logLevel: LogLevel;
  preload: boolean;
  snapshot: "app" | "runtime" | "off";
  queueLimit: number;
  requestTimeoutMs: number;
  queueTimeoutMs: number;
  bodyTimeoutMs: number;
  sendTimeoutMs: number;
  readAheadBytes: number;
  /** From `--min-threads`; unset means the value of `threads`. */
  minThreads?: number;
  inactivityTimeoutMs: number;
  maximumRequests: number;
  memoryLimitBytes: number;
  memoryMaxBytes: number;
  /** From `--shutdown-timeout`; unset keeps the default that depends on the daemon groups. */
  shutdownTimeoutMs?: number;
  daemonGroups: DaemonGroupSpec[];
  processGroup?: string;
  /** `--mount` uses, with SCRIPT still unresolved and the folder it resolves against. */
  mounts: { mountPoint: string; script: string; processGroup?: string; cwd: string }[];
}

/** One command-line option: its names, the values it takes, its help and its handler. */
export interface OptionSpec {
  /** Long name with its dashes, such as "--port". */
  name: string;
  /** Single-letter alias with its dash, such as "-h". */
  shortName?: string;
  /** Names of the values the option takes, as the help shows them. Empty for a flag. */
  valueNames: readonly string[];
  /** Help paragraph that says what the option sets and in what unit. */
  help: string;
  /** Default as the help shows it, unset when the option has none. */
  defaultText?: string;
  /** Whether each use adds a value instead of replacing the previous one. */
  repeatable: boolean;
  /** The result that this option returns at once, for `--help` and `--version`. */
  result?: "help" | "version";
  /** Validates the values and stores them in `draft`. Relative paths resolve against `cwd`. */
  apply?: (
    values: readonly string[],
    draft: OptionValues,
    cwd: string,
    env: ParseEnvironment,
  ) => void;
}

const MAX_THREADS = 256;
/** The longest path of a Unix socket: sun_path has room for 108 bytes, the final zero included. */
const MAX_SOCKET_PATH_BYTES = 107;
const MAX_QUEUE_LIMIT = 100_000;
/** Options that configure embedded pools only; daemon groups take keys of their own. */
const EMBEDDED_ONLY_OPTIONS = new Set([
  "--threads",
  "--min-threads",
  "--inactivity-timeout",
  "--maximum-requests",
  "--memory-limit",
  "--memory-max",
  "--request-timeout",
  "--queue-timeout",
]);

/** Largest --maximum-requests, as for the maximum-requests key of daemon groups. */
const MAX_MAXIMUM_REQUESTS = 1_000_000_000;

/** Every option wsgirun accepts, in the order the help lists them. */
export const OPTIONS: readonly OptionSpec[] = [
  {
    name: "--host",
    valueNames: ["HOST"],
    help: "IP address or host name to listen on. Use 0.0.0.0 (or :: for IPv6) " +
      "to accept connections from other machines.",
    defaultText: "127.0.0.1",
    repeatable: false,
    apply: ([value], draft) => {
      draft.host = parseHost(value);
    },
  },
  {
    name: "--port",
    valueNames: ["N"],
    help: "TCP port to listen on, from 0 to 65535. Port 0 lets the system pick a free port.",
    defaultText: "8000",
    repeatable: false,
    apply: ([value], draft) => {
      draft.port = parseInteger("--port", value, 0, 65535);
    },
  },
  {
    name: "--threads",
    valueNames: ["N"],
    help: "Maximum number of Python isolates (one Pyodide interpreter on its own worker " +
      `thread each) that serve requests in parallel, from 1 to ${MAX_THREADS}.`,
    defaultText: `the number of CPU cores, at most ${MAX_THREADS}`,
    repeatable: false,
    apply: ([value], draft) => {
      draft.threads = parseInteger("--threads", value, 1, MAX_THREADS);
    },
  },
  {
    name: "--min-threads",
    valueNames: ["N"],
    help: "Number of isolates that start with the server and stay running when idle, from " +
      "1 to --threads. Below --threads, the pool adds isolates one at a time while " +
      "requests wait and keeps one spare isolate ready: up to the number of CPU cores " +
      "(at least 2) at any time, and past it only while a running request blocks or " +
      "has run for 0.25 s. It retires isolates above N after --inactivity-timeout.",
    defaultText: "the value of --threads",
    repeatable: false,
    apply: ([value], draft) => {
      draft.minThreads = parseInteger("--min-threads", value, 1, MAX_THREADS);
    },
  },
  {
    name: "--inactivity-timeout",
    valueNames: ["SECONDS"],
    help: "Time in seconds (up to 3 decimals) an idle isolate above --min-threads waits " +
      "before it is retired. 0 keeps every isolate once started. Daemon groups take the " +
      "inactivity-timeout key instead.",
    defaultText: "60",
    repeatable: false,
    apply: ([value], draft) => {
      draft.inactivityTimeoutMs = parseDuration("--inactivity-timeout", value);
    },
  },
  {
    name: "--maximum-requests",
    valueNames: ["N"],
    help: "Number of requests an embedded isolate serves before a fresh one replaces it, " +
      "which bounds the memory of an application that leaks (an isolate's wasm memory " +
      "never shrinks). The fresh isolate starts first, so no request waits for it. 0 " +
      "turns it off. Daemon groups take the maximum-requests key instead.",
    defaultText: "0",
    repeatable: false,
    apply: ([value], draft) => {
      draft.maximumRequests = parseInteger("--maximum-requests", value, 0, MAX_MAXIMUM_REQUESTS);
    },
  },
  {
    name: "--memory-limit",
    valueNames: ["SIZE"],
    help: "Wasm memory above which an embedded isolate is replaced, checked after each " +
      "request: 0 or 32M to 4G, in bytes as in mod_wsgi, or a number with K, M or G, " +
      "such as 512M. A fresh isolate starts first. Until it is ready, the old one keeps serving, new requests " +
      "too, so memory can grow past the limit for that time. 0 turns it off. " +
      "Daemon groups take the memory-limit key instead.",
    defaultText: "0",
    repeatable: false,
    apply: ([value], draft) => {
      draft.memoryLimitBytes = parseMemorySize("--memory-limit", value);
    },
  },
  {
    name: "--memory-max",
    valueNames: ["SIZE"],
    help: "Wasm memory that an embedded isolate may never pass, in the same form as " +
      "--memory-limit. An allocation past it fails: Python raises MemoryError in the " +
      "request, which the application may catch, and the isolate serves on. Without it, " +
      "one request can grow its isolate to 4 GiB. 0 turns it off. " +
      "Daemon groups take the memory-max key instead.",
    defaultText: "0",
    repeatable: false,
    apply: ([value], draft) => {
      draft.memoryMaxBytes = parseMemorySize("--memory-max", value);
    },
  },
  {
    name: "--python",
    valueNames: ["VERSION"],
    help: `Python version to run: ${listAlternatives(PYTHON_VERSIONS)}.`,
    defaultText: "3.14",
    repeatable: false,
    apply: ([value], draft) => {
      draft.python = parseChoice("--python", value, PYTHON_VERSIONS);
    },
  },
  {
    name: "--python-path",
    valueNames: ["DIR"],
    help: "Directory to add to sys.path after the script's own directory (the working " +
      "directory for a module). Directories are searched in the order given.",
    repeatable: true,
    apply: ([value], draft, cwd) => {
      draft.pythonPath.push(parseExistingPath("--python-path", value, cwd, "directory"));
    },
  },
  {
    name: "--allow-net",
    valueNames: ["HOST[:PORT]"],
    help: "Let the application open TCP connections to HOST, on PORT only when given, " +
      "such as 127.0.0.1:5432 or db.example.com (write IPv6 as [::1]:5432). Hosts match " +
      "as written: localhost and 127.0.0.1 are different hosts. Any other connection " +
      "raises PermissionError in Python and is logged.",
    defaultText: "no connections",
    repeatable: true,
    apply: ([value], draft) => {
      try {
        parseNetAllowEntry(value);
      } catch (error) {
        throw new UsageError((error as Error).message);
      }
      draft.allowNet.push(value);
    },
  },
  {
    name: "--env",
    valueNames: ["NAME=VALUE"],
    help: "Set an environment variable in os.environ of every application, before it " +
      "is imported. NAME alone passes the server's own variable NAME, so that a " +
      "secret stays out of the command line. The applications see no other variable " +
      "of the server's environment.",
    defaultText: "no variables",
    repeatable: true,
    apply: ([value], draft, _cwd, env) => {
      const item = parseEnvironmentItem(value, env.variable ?? NO_VARIABLES);
      if ("expected" in item) throw invalidValue("--env", value, item.expected);
      draft.environment[item[0]] = item[1];
    },
  },
  {
    name: "--write",
    valueNames: ["DIR"],
    help: "Let the application create and change files in DIR and its subdirectories, " +
      "such as an SQLite database. Everything else stays read-only.",
    defaultText: "no writable directory",
    repeatable: true,
    apply: ([value], draft, cwd) => {
      draft.writePaths.push(parseExistingPath("--write", value, cwd, "directory"));
    },
  },
  {
    name: "--callable-object",
    valueNames: ["NAME"],
    help: "Name of the WSGI callable that SCRIPT defines. Cannot be combined with the " +
      "package.module:callable form of SCRIPT.",
    defaultText: "application",
    repeatable: false,
    apply: ([value], draft) => {
      draft.callableObject = parseIdentifier("--callable-object", value);
    },
  },
  {
    name: "--unix-socket",
    valueNames: ["PATH"],
    help: "Listen on a Unix socket at PATH in place of --host and --port, for a " +
      "reverse proxy on the same machine. Every local user may connect, as to a " +
      "loopback port; the permissions of its directory limit who reaches it. A socket " +
      "left behind by a server that no longer runs is replaced.",
    defaultText: "none (TCP)",
    repeatable: false,
    apply: ([value], draft, cwd) => {
      if (value === "") throw invalidValue("--unix-socket", value, "a path, not an empty one");
      const path = resolve(cwd, value);
      if (statPathKind(dirname(path)) !== "directory") {
        throw invalidValue("--unix-socket", value, `a path in an existing directory`);
      }
      const bytes = new TextEncoder().encode(path).length;
      if (bytes > MAX_SOCKET_PATH_BYTES) {
        throw invalidValue(
          "--unix-socket",
          value,
          `a path of at most ${MAX_SOCKET_PATH_BYTES} bytes, the limit of Linux, but ` +
            `${quote(path)} has ${bytes}; choose a shorter folder, such as /run`,
        );
      }
      draft.unixSocket = path;
    },
  },
  {
    name: "--certfile",
    valueNames: ["FILE"],
    help: "TLS certificate chain in PEM form: the server then speaks HTTPS (and HTTP/2 " +
      "where the client offers it), and wsgi.url_scheme is https. Give --keyfile too.",
    defaultText: "none (plain HTTP)",
    repeatable: false,
    apply: ([value], draft, cwd) => {
      draft.certFile = parseExistingPath("--certfile", value, cwd, "file");
    },
  },
  {
    name: "--keyfile",
    valueNames: ["FILE"],
    help: "Private key of --certfile in PEM form. Only the server reads it, before any " +
      "application starts.",
    defaultText: "none",
    repeatable: false,
    apply: ([value], draft, cwd) => {
      draft.keyFile = parseExistingPath("--keyfile", value, cwd, "file");
    },
  },
  {
    name: "--trusted-proxy",
    valueNames: ["ADDR"],
    help: "Address, or CIDR range such as 10.0.0.0/8, of a reverse proxy in front of " +
      "the server. For requests from it, REMOTE_ADDR, wsgi.url_scheme, HTTP_HOST and " +
      "SERVER_PORT come from its X-Forwarded-For, -Proto, -Host and -Port headers. " +
      "Once one is given, requests from other addresses lose those headers, so that " +
      "clients cannot fake them.",
    defaultText: "none (the headers pass as they came)",
    repeatable: true,
    apply: ([value], draft) => {
      const range = parseAddressRange(value);
      if (!range) throw invalidValue("--trusted-proxy", value, TRUSTED_PROXY_FORM);
      draft.trustedProxies.push(range);
    },
  },
  {
    name: "--mount-point",
    valueNames: ["PREFIX"],
    help: "URL path prefix the application is mounted at, such as /app. A trailing / " +
      "is ignored, and / mounts the application at the root.",
    defaultText: "/",
    repeatable: false,
    apply: ([value], draft) => {
      draft.mountPoint = parseUrlPrefix("--mount-point", value);
    },
  },
  {
    name: "--url-alias",
    valueNames: ["URL", "PATH"],
    help: "Serve the file or directory PATH under the URL path prefix URL without " +
      "Python, for example static files at /static.",
    repeatable: true,
    apply: ([url, path], draft, cwd) => {
      draft.urlAliases.push(parseUrlAlias(url, path, cwd, draft.urlAliases));
    },
  },
  {
    name: "--access-log",
    valueNames: [],
    help: "Write one line per request to standard output, in --access-log-format.",
    defaultText: "off",
    repeatable: false,
    apply: (_values, draft) => {
      draft.accessLog = true;
    },
  },
  {
    name: "--access-log-format",
    valueNames: ["FORMAT"],
    help: "Format of the access log lines, with Apache's LogFormat directives: %a " +
      "client address (from a --trusted-proxy's X-Forwarded-For), %h peer address, " +
      "%l and %u ident and Basic-auth user, %t arrival time, %r request " +
      "line, %m method, %U path, %q query string, %H protocol, %>s status, %b or %B body " +
      "bytes, %D microseconds, %T seconds, %L request id (as request=ID in the error " +
      "log), %p port, %P process id, %{Name}i request header, %% a percent sign. Or " +
      "a name: common, combined, or default (combined, then %D %L). Turns the access " +
      "log on.",
    defaultText: "default",
    repeatable: false,
    apply: ([value], draft) => {
      try {
        compileAccessLogFormat(value);
      } catch (error) {
        if (!(error instanceof AccessLogFormatError)) throw error;
        throw invalidValue("--access-log-format", value, `${FORMAT_FORM}; ${error.message}`);
      }
      draft.accessLog = true;
      draft.accessLogFormat = value;
    },
  },
  {
    name: "--pid",
    valueNames: ["FILE"],
    help: "Write the server's process id to FILE once it listens, for scripts and " +
      "service managers that signal it, and remove the file when it stops.",
    defaultText: "none",
    repeatable: false,
    apply: ([value], draft, cwd) => {
      if (value === "") throw invalidValue("--pid", value, "a file path, not an empty one");
      const path = resolve(cwd, value);
      if (statPathKind(dirname(path)) !== "directory") {
        throw invalidValue("--pid", value, "a path in an existing directory");
      }
      if (statPathKind(path) === "directory") {
        throw invalidValue("--pid", value, "a file path, but it is a directory");
      }
      draft.pidFile = path;
    },
  },
  {
    name: "--log-level",
    valueNames: ["LEVEL"],
    help: "Lowest level of the log messages written to standard error: " +
      `${listAlternatives(LOG_LEVELS)}, in any case.`,
    defaultText: "info",
    repeatable: false,
    apply: ([value], draft) => {
      // Any case, as gunicorn and Python's logging accept WARNING.
      const lower = value.toLowerCase();
      draft.logLevel = (LOG_LEVELS as readonly string[]).includes(lower)
        ? lower as LogLevel
        : parseChoice("--log-level", value, LOG_LEVELS);
    },
  },
  {
    name: "--preload",
    valueNames: [],
    help: "Import the application when each isolate starts instead of on its first " +
      "request, so that import errors show before the first request. Application " +
      "snapshots (--snapshot app, the default) import it at start already, except " +
      "for an application that cannot be snapshotted.",
    defaultText: "off",
    repeatable: false,
    apply: (_values, draft) => {
      draft.preload = true;
    },
  },
  {
    name: "--snapshot",
    valueNames: ["MODE"],
    help: "What new isolates start from. 'app' restores a memory snapshot taken after " +
      "the application was imported, where that is safe (no open files or " +
      "JavaScript objects kept at import); 'runtime' restores one taken before the " +
      "import; 'off' starts Pyodide from scratch (about 2 s per isolate). Snapshots " +
      "are cached in $WSGIRUN_CACHE_DIR, else $XDG_CACHE_HOME/wsgirun or " +
      "~/.cache/wsgirun, and rebuilt when Pyodide, wsgirun or an imported file changes.",
    defaultText: "app",
    repeatable: false,
    apply: ([value], draft) => {
      if (value !== "app" && value !== "runtime" && value !== "off") {
        throw new UsageError(
          `invalid value for --snapshot: '${value}' (expected app, runtime or off)`,
        );
      }
      draft.snapshot = value;
    },
  },
  {
    name: "--snapshot-app",
    valueNames: [],
    help: "Same as --snapshot app.",
    defaultText: "on",
    repeatable: false,
    apply: (_values, draft) => {
      draft.snapshot = "app";
    },
  },
  {
    name: "--no-snapshot-app",
    valueNames: [],
    help: "Same as --snapshot runtime: every isolate imports the application itself. " +
      "It leaves --snapshot off in force.",
    defaultText: "off",
    repeatable: false,
    apply: (_values, draft) => {
      if (draft.snapshot !== "off") draft.snapshot = "runtime";
    },
  },
  {
    name: "--queue-limit",
    valueNames: ["N"],
    help: "Maximum number of requests that wait for a free isolate, from 0 to " +
      `${MAX_QUEUE_LIMIT}. Requests beyond it get 503 Service Unavailable.`,
    defaultText: "100",
    repeatable: false,
    apply: ([value], draft) => {
      draft.queueLimit = parseInteger("--queue-limit", value, 0, MAX_QUEUE_LIMIT);
    },
  },
  {
    name: "--request-timeout",
    valueNames: ["SECONDS"],
    help: "Maximum time in seconds (up to 3 decimals) a request may run in an embedded " +
      "isolate. A request that runs longer gets 504 Gateway Timeout and its isolate is " +
      "replaced. 0 turns the limit off. Daemon groups take the request-timeout key instead.",
    defaultText: "60",
    repeatable: false,
    apply: ([value], draft) => {
      draft.requestTimeoutMs = parseDuration("--request-timeout", value);
    },
  },
  {
    name: "--queue-timeout",
    valueNames: ["SECONDS"],
    help: "Maximum time in seconds (up to 3 decimals) a request may wait for a free " +
      "embedded isolate before it gets 503 Service Unavailable. 0 turns the limit off. " +
      "Daemon groups take the queue-timeout key instead.",
    defaultText: "45",
    repeatable: false,
    apply: ([value], draft) => {
      draft.queueTimeoutMs = parseDuration("--queue-timeout", value);
    },
  },
  {
    name: "--body-timeout",
    valueNames: ["SECONDS"],
    help: "Maximum time in seconds (up to 3 decimals) a request body may go without new " +
      "bytes while it is read, in embedded and daemon mode, before the request gets " +
      "408 Request Timeout and its isolate is free again. 0 turns the limit off.",
    defaultText: "20",
    repeatable: false,
    apply: ([value], draft) => {
      draft.bodyTimeoutMs = parseDuration("--body-timeout", value);
    },
  },
  {
    name: "--send-timeout",
    valueNames: ["SECONDS"],
    help: "Maximum time in seconds (up to 3 decimals) a streamed response or static file " +
      "may wait for the client's socket to take more bytes, in embedded and daemon mode, " +
      "before the server stops it and its isolate is free again. The socket takes more once " +
      "the client has read about half of its send buffer (up to 4 MiB on Linux), so a " +
      "client that reads less than that within the time is stopped too. 0 turns the limit off.",
    defaultText: "20",
    repeatable: false,
    apply: ([value], draft) => {
      draft.sendTimeoutMs = parseDuration("--send-timeout", value);
    },
  },
  {
    name: "--read-ahead",
    valueNames: ["SIZE"],
    help: "Largest request body with a Content-Length that the server reads whole, in " +
      "embedded and daemon mode, before the request waits for an isolate, so that a " +
      "slow client does not hold an isolate while it uploads: bytes, or a number with " +
      `K or M, up to ${MAX_READ_AHEAD / MEBIBYTE}M. Larger and chunked bodies stream to the ` +
      "application as they arrive. Each request holds up to this much memory. 0 streams " +
      "every body.",
    defaultText: "64K",
    repeatable: false,
    apply: ([value], draft) => {
      const bytes = parseBytes(value);
      if (bytes === undefined || bytes > MAX_READ_AHEAD) {
        throw invalidValue(
          "--read-ahead",
          value,
          `0, or a size up to ${
            MAX_READ_AHEAD / MEBIBYTE
          }M: bytes, or a number with K or M, such as 1M`,
        );
      }
      draft.readAheadBytes = bytes;
    },
  },
  {
    name: "--shutdown-timeout",
    valueNames: ["SECONDS"],
    help: "Maximum time in seconds (up to 3 decimals) that running requests get to " +
      "finish after SIGTERM or SIGINT. Requests still running then get 503 Service " +
      "Unavailable, or lose their connection if their response has started, and the " +
      "server exits. 0 stops them at once.",
    defaultText: "5, or the groups' longest shutdown-timeout",
    repeatable: false,
    apply: ([value], draft) => {
      draft.shutdownTimeoutMs = parseDuration("--shutdown-timeout", value);
    },
  },
  {
    name: "--daemon",
    valueNames: ["SPEC"],
    help: "Define a daemon process group: SPEC is group=NAME (or NAME alone, as in " +
      "mod_wsgi) followed by ,key=value items with mod_wsgi's names. processes: " +
      "processes in the group (default 1). " +
      "threads: isolates per process, created on demand and retired when idle " +
      "(default 15). user, group: the account the processes run as (the server " +
      "must run as root, and a daemon never runs as root); only the first item, " +
      "group=NAME, names the process group. home: working directory. " +
      "python-path: DIR[:DIR...]. python: 3.12 or 3.14. display-name: the name ps " +
      "shows, where %{GROUP} is the group's name, up to 64 printable ASCII " +
      "characters (default (wsgi:NAME)). maximum-requests, restart-interval: replace " +
      "a process after that many requests or seconds (default 0, off). memory-limit: " +
      "replace an isolate whose wasm memory grew past this size, 0 or 32M to 4G, such " +
      "as 512M. memory-max: wasm memory an isolate may never pass (MemoryError in the " +
      "request). Timeouts in seconds: inactivity-timeout (idle isolate retired, 60), " +
      "request-timeout (504, 60), queue-timeout (503, 45), startup-timeout (30), " +
      "graceful-timeout (a reload drains for this long, 15), socket-timeout (a " +
      "process with requests that stays silent is pinged, then killed, 60), " +
      "shutdown-timeout (5). env=NAME=VALUE sets " +
      "os.environ (env=NAME alone passes the server's own NAME), allow-net=HOST[:PORT] and allow-write=DIR (or write=DIR) grant the application " +
      "network and write access, which it has none of by default. With one SCRIPT " +
      "and one group, SCRIPT runs in that group. Touching the script, or SIGHUP, " +
      "starts fresh processes and drains the old ones. Example: --daemon " +
      "group=site1,processes=2,threads=15,user=www-data.",
    defaultText: "none (embedded)",
    repeatable: true,
    apply: ([value], draft, cwd, env) => {
      try {
        draft.daemonGroups.push(parseDaemonSpec(value, cwd, env.variable ?? NO_VARIABLES));
      } catch (error) {
        if (!(error instanceof DaemonSpecError)) throw error;
        throw new UsageError(`invalid --daemon ${quote(value)}: ${error.message}`);
      }
    },
  },
  {
    name: "--process-group",
    valueNames: ["GROUP"],
    help: "Run SCRIPT in the daemon process group GROUP, defined with --daemon. " +
      "Without it, SCRIPT runs embedded unless it is the only application and " +
      "exactly one group is defined.",
    defaultText: "embedded, or the only group",
    repeatable: false,
    apply: ([value], draft) => {
      draft.processGroup = value;
    },
  },
  {
    name: "--mount",
    valueNames: ["URL", "SCRIPT"],
    help: "Serve another application at the URL path prefix URL. SCRIPT is a file or " +
      "package.module[:callable], optionally followed by :process-group=GROUP to " +
      "run it in a daemon group; without that it runs embedded. It shares " +
      "--python, --python-path, --env, --write, --allow-net, --snapshot, --threads " +
      "and --preload with SCRIPT. A file mounted this way defines application: " +
      "--callable-object applies to SCRIPT only.",
    defaultText: "none",
    repeatable: true,
    apply: ([url, script], draft, cwd) => {
      draft.mounts.push({
        mountPoint: parseUrlPrefix("--mount", url),
        ...splitProcessGroup(script),
        cwd,
      });
    },
  },
  {
    name: "--config",
    valueNames: ["FILE"],
    help: "Read settings from FILE: one per line, an option without its dashes followed " +
      "by its values (port 8000, daemon group=site,processes=2), and 'script SCRIPT' for " +
      "SCRIPT. Quote values that contain spaces, and start comments with #. Relative " +
      "paths in FILE resolve against its folder. Options on the command line come " +
      "after the file's, so they replace its values, or add to them where an option " +
      "may be given more than once.",
    defaultText: "none",
    repeatable: false,
  },
  {
    name: "--help",
    shortName: "-h",
    valueNames: [],
    help: "Print this help and exit.",
    repeatable: false,
    result: "help",
  },
  {
    name: "--version",
    valueNames: [],
    help: "Print the version and exit.",
    repeatable: false,
    result: "version",
  },
];

// ---------------------------------------------------------------------------
// Help text

const HELP_WIDTH = 80;
/** Column where option descriptions start. */
const HELP_COLUMN = 26;

const HELP_HEAD = `Usage: wsgirun SCRIPT [options]
       wsgirun --help | --version

Serve a Python WSGI application over HTTP, and more at other URL prefixes with
--mount. Applications run in Pyodide isolates (CPython compiled to WebAssembly)
on worker threads of this process, or in daemon processes with --daemon.

SCRIPT names the application in one of two forms:
  FILE                    Path of a Python file that defines the WSGI callable,
                          as mod_wsgi loads it, such as app.wsgi. The file's
                          directory comes first on sys.path.
  package.module[:callable]
                          Module to import, as gunicorn names it, such as
                          mysite.wsgi:application. The working directory comes
                          first on sys.path.
An existing file wins over the module form. A name that ends in .py or .wsgi
must be an existing file.`;

const HELP_TAIL = `Options that take a value accept both '--option VALUE' and '--option=VALUE'.
Arguments after '--' are never read as options.

Touching a script file, or sending the server SIGHUP, reloads the application:
fresh interpreters take new requests, and the old ones finish theirs.

Examples:
  wsgirun app.wsgi
      Serve app.wsgi at http://127.0.0.1:8000/ with one isolate per CPU core.
  wsgirun app.wsgi --threads 4 --python 3.12 --python-path ./pylib
      Run four Python 3.12 isolates that can also import modules from ./pylib.
  wsgirun mysite.wsgi:application --url-alias /static ./static
      Serve the callable 'application' of the module mysite/wsgi.py, and the
      files of ./static at /static without Python.
  wsgirun --config site.conf --port 9000
      Take the settings, SCRIPT included, from site.conf, with port 9000.`;

/** Full `--help` output, at most 80 columns wide. */
export const HELP_TEXT: string = [
  HELP_HEAD,
  "",
  "Options:",
  ...OPTIONS.flatMap(formatOptionHelp),
  "",
  HELP_TAIL,
].join("\n");

/** Returns how an option is written, such as "--url-alias URL PATH" or "-h, --help". */
export function optionSynopsis(spec: OptionSpec): string {
  const names = spec.shortName ? `${spec.shortName}, ${spec.name}` : spec.name;
  return [names, ...spec.valueNames].join(" ");
}

function formatOptionHelp(spec: OptionSpec): string[] {
  const synopsis = `  ${optionSynopsis(spec)}`;
  const indent = " ".repeat(HELP_COLUMN);
  const sentences = spec.repeatable ? `${spec.help} May be given more than once.` : spec.help;
  const lines = wrapWords(sentences, HELP_WIDTH - HELP_COLUMN);
  if (spec.defaultText !== undefined) {
    lines.push(...wrapWords(`Default: ${spec.defaultText}`, HELP_WIDTH - HELP_COLUMN));
  }

  // A synopsis that reaches into the description column gets a line of its own.
  if (synopsis.length + 2 > HELP_COLUMN) {
    return [synopsis, ...lines.map((line) => indent + line)];
  }
  const [first, ...rest] = lines;
  return [synopsis.padEnd(HELP_COLUMN) + first, ...rest.map((line) => indent + line)];
}

/** Breaks `text` into lines of at most `width` characters at spaces; longer words stay whole. */
function wrapWords(text: string, width: number): string[] {
  const lines: string[] = [];
  let line = "";
  for (const word of text.split(/\s+/).filter((w) => w !== "")) {
    if (line === "") {
      line = word;
    } else if (line.length + 1 + word.length <= width) {
      line += ` ${word}`;
    } else {
      lines.push(line);
      line = word;
    }
  }
  if (line !== "") lines.push(line);
  return lines;
}

function listAlternatives(values: readonly string[]): string {
  if (values.length === 1) return values[0];
  return `${values.slice(0, -1).join(", ")} or ${values[values.length - 1]}`;
}

// ---------------------------------------------------------------------------
// Parsing

/**
 * Parses the arguments after the program name.
 *
 * `--help` or `--version` anywhere before `--` returns that result, even when other
 * arguments are invalid. Otherwise every option is validated in order, then SCRIPT.
 * Relative paths and the module form resolve against `env.cwd`.
 *
 * @param args Arguments without the program name, such as `Deno.args`.
 * @param env Working directory and CPU count the defaults depend on.
 * @returns The server options, or the help or version text to print.
 * @throws {UsageError} An option, value or SCRIPT is unknown, missing or invalid.
 *
 * @example Parse a script with two options
 * ```ts
 * const line = parseCommandLine(["app.wsgi", "--port=9000", "--threads", "2"], {
 *   cwd: Deno.cwd(),
 *   cpus: navigator.hardwareConcurrency,
 * });
 * if (line.kind === "serve") console.log(line.options.port); // 9000
 * ```
 */
export function parseCommandLine(args: readonly string[], env: ParseEnvironment): CommandLine {
  const tokens = tokenize(args);

  const action = tokens.uses.find((use) => use.spec.result !== undefined)?.spec.result;
  if (action === "help") return { kind: "help", text: HELP_TEXT };
  if (action === "version") return { kind: "version", text: `wsgirun ${WSGIRUN_VERSION}` };
  if (tokens.error) throw tokens.error;

  const cwd = resolve(env.cwd);
  const config = readConfigUses(tokens, cwd);
  // The command line comes last, so that its values replace those of the file.
  const uses = [...(config?.uses ?? []), ...tokens.uses];
  if (tokens.positionals.length === 0 && config && !config.script) {
    throw new UsageError(
      "missing SCRIPT: name a WSGI script file or package.module:callable, on the command " +
        "line or with a 'script' line in the --config file",
    );
  }
  const script = tokens.positionals.length === 0 && config?.script
    ? config.script
    : { value: selectScriptArgument(tokens.positionals), cwd };
  const scriptArgument = script.value;

  const draft = defaultOptionValues(env);
  for (const use of uses) applyUse(use, draft, cwd, env);

  const limitProblem = memoryLimitProblem(
    draft.memoryLimitBytes,
    draft.memoryMaxBytes,
    ["--memory-limit", "--memory-max"],
  );
  if (limitProblem) throw new UsageError(limitProblem);
  settleListenOptions(uses, draft);

  const minThreads = draft.minThreads ?? draft.threads;
  if (minThreads > draft.threads) {
    throw new UsageError(
      `invalid value for --min-threads: '${minThreads}' (expected an integer from 1 to --threads, which is ${draft.threads})`,
    );
  }

  checkAliasesLeaveMounts(draft.urlAliases, [
    draft.mountPoint,
    ...draft.mounts.map((mount) => mount.mountPoint),
  ]);

  const app = buildApp(scriptArgument, draft, script.cwd, draft.callableObject);
  const mounts: MountSpec[] = draft.mounts.map((mount) => ({
    mountPoint: mount.mountPoint,
    app: buildApp(mount.script, draft, mount.cwd, undefined),
    processGroup: mount.processGroup,
  }));
  let processGroup: string | undefined;
  try {
    processGroup = assignProcessGroups({
      main: { mountPoint: draft.mountPoint, app, processGroup: draft.processGroup },
      mounts,
      groups: draft.daemonGroups,
    });
  } catch (error) {
    if (!(error instanceof MountConfigError)) throw error;
    throw new UsageError(error.message);
  }

  const options: ServerOptions = {
    host: draft.host,
    port: draft.port,
    tls: readTlsFiles(draft.certFile, draft.keyFile),
    unixSocket: draft.unixSocket,
    pidFile: draft.pidFile,
    threads: draft.threads,
    minThreads,
    inactivityTimeoutMs: draft.inactivityTimeoutMs,
    maximumRequests: draft.maximumRequests,
    memoryLimitBytes: draft.memoryLimitBytes,
    memoryMaxBytes: draft.memoryMaxBytes,
    mountPoint: draft.mountPoint,
    urlAliases: draft.urlAliases,
    trustedProxies: draft.trustedProxies,
    accessLog: draft.accessLog,
    accessLogFormat: draft.accessLogFormat,
    logLevel: draft.logLevel,
    queueLimit: draft.queueLimit,
    requestTimeoutMs: draft.requestTimeoutMs,
    queueTimeoutMs: draft.queueTimeoutMs,
    bodyTimeoutMs: draft.bodyTimeoutMs,
    sendTimeoutMs: draft.sendTimeoutMs,
    readAheadBytes: draft.readAheadBytes,
    app,
    mounts,
    daemonGroups: draft.daemonGroups,
  };
  if (processGroup !== undefined) options.processGroup = processGroup;
  const allInGroups = processGroup !== undefined &&
    mounts.every((mount) => mount.processGroup !== undefined);
  const ignored = uses.map((use) => use.spec.name).filter((name) =>
    EMBEDDED_ONLY_OPTIONS.has(name)
  );
  const warnings: string[] = [];
  if (allInGroups && ignored.length > 0) {
    warnings.push(
      `${[...new Set(ignored)].join(", ")} ${
        ignored.length === 1 ? "sets" : "set"
      } embedded pools only, and every ` +
        "application here runs in a daemon group: use the group's keys (threads, maximum-requests, memory-limit, memory-max, " +
        "inactivity-timeout, request-timeout, queue-timeout) instead",
    );
  }
  if (options.unixSocket === undefined && draft.trustedProxies.some((r) => r.text === "unix")) {
    warnings.push(
      "--trusted-proxy unix trusts the peers of --unix-socket, which is not given: the " +
        "server listens on TCP, and requests from addresses that no --trusted-proxy names " +
        "lose their X-Forwarded-* headers",
    );
  }
  if (warnings.length > 0) options.warnings = warnings;
  if (draft.shutdownTimeoutMs !== undefined) options.shutdownTimeoutMs = draft.shutdownTimeoutMs;
  return { kind: "serve", options };
}

/** Applies one option use, and names the file and line of a use from a configuration file in its error. */
function applyUse(
  use: OptionUse,
  draft: OptionValues,
  cwd: string,
  env: ParseEnvironment,
): void {
  try {
    use.spec.apply?.(use.values, draft, use.cwd ?? cwd, env);
  } catch (error) {
    if (!(error instanceof UsageError) || use.origin === undefined) throw error;
    throw new UsageError(`${use.origin}: ${error.message}`);
  }
}

/**
 * Makes the use of one line of a configuration file. Its words after the
 * name are the values as written, even one that starts with "--", which on
 * the command line would start the next option.
 */
function configUse(
  option: string,
  words: string[],
  name: string,
  origin: string,
): OptionUse {
  // "port=8000" as well as "port 8000", as --port=8000 on the command line.
  const { name: bare, inlineValue } = splitInlineValue(option);
  const values = inlineValue === undefined ? words : [inlineValue, ...words];
  const spec = findOption(bare);
  if (!spec) {
    throw new UsageError(
      `${origin}: unknown option ${quote(bare)}; run 'wsgirun --help' for the list`,
    );
  }
  if (values.length < spec.valueNames.length) {
    throw new UsageError(`${origin}: ${missingValue(spec, values).message}`);
  }
  if (values.length > spec.valueNames.length) {
    throw new UsageError(
      `${origin}: unexpected value ${quote(values[spec.valueNames.length])} after ${name} ` +
        `(expected ${optionSynopsis(spec).replace(/^--/, "")}; quote a value that contains spaces)`,
    );
  }
  return { spec, values };
}

/** Decodes UTF-8 text, and fails on bytes that are not UTF-8 instead of replacing them. */
function decodeUtf8(bytes: Uint8Array): string {
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    throw new Error("the file is not UTF-8 text; save it as UTF-8");
  }
}

/** Options that a configuration file cannot set, because they act before it is read. */
const COMMAND_LINE_ONLY = new Set(["--config", "--help", "--version"]);

/**
 * Reads the file of --config into option uses whose relative paths resolve
 * against the file's folder, and the SCRIPT of its `script` line. Returns
 * undefined without --config.
 */
function readConfigUses(
  tokens: Tokens,
  cwd: string,
): { uses: OptionUse[]; script?: { value: string; cwd: string } } | undefined {
  // As for every option given once, the last one counts.
  const configOption = tokens.uses.findLast((use) => use.spec.name === "--config");
  if (!configOption) return undefined;
  const path = parseExistingPath("--config", configOption.values[0], cwd, "file");
  let lines: ConfigLine[];
  try {
    lines = parseConfigText(decodeUtf8(Deno.readFileSync(path)));
  } catch (error) {
    if (error instanceof ConfigSyntaxError) {
      throw new UsageError(`${path} line ${error.line}: ${error.message}`);
    }
    const reason = error instanceof Error ? error.message : String(error);
    throw new UsageError(`cannot read --config ${quote(path)}: ${reason}`);
  }

  const folder = dirname(path);
  const uses: OptionUse[] = [];
  let script: { value: string; cwd: string } | undefined;
  for (const { words: [name, ...values], line } of lines) {
    const origin = `${path} line ${line}`;
    if (name === "script") {
      if (values.length !== 1) {
        throw new UsageError(`${origin}: script takes one value, the SCRIPT to serve`);
      }
      script = { value: values[0], cwd: folder };
      continue;
    }
    const option = name.startsWith("--") ? name : `--${name}`;
    if (COMMAND_LINE_ONLY.has(option)) {
      throw new UsageError(`${origin}: ${option} works on the command line only`);
    }
    uses.push({ ...configUse(option, values, name, origin), cwd: folder, origin });
  }
  return { uses, script };
}

/** Resolves a SCRIPT argument into the application it names, with the shared options. */
function buildApp(
  scriptArgument: string,
  draft: OptionValues,
  cwd: string,
  callableObject: string | undefined,
): AppSpec {
  const script = resolveScript(scriptArgument, cwd);
  const app: AppSpec = {
    name: script.name,
    callable: selectCallable(scriptArgument, script.callable, callableObject),
    python: draft.python,
    pythonPath: [...new Set([script.directory, ...draft.pythonPath])],
    preload: draft.preload,
    snapshot: draft.snapshot,
  };
  if (draft.allowNet.length > 0) app.allowNet = [...draft.allowNet];
  if (Object.keys(draft.environment).length > 0) app.environment = { ...draft.environment };
  if (draft.writePaths.length > 0) app.writePaths = [...new Set(draft.writePaths)];
  if (script.scriptPath !== undefined) app.scriptPath = script.scriptPath;
  if (script.module !== undefined) app.module = script.module;
  return app;
}

function defaultOptionValues(env: ParseEnvironment): OptionValues {
  return {
    host: "127.0.0.1",
    port: 8000,
    threads: Math.min(MAX_THREADS, Math.max(1, Math.floor(env.cpus) || 1)),
    python: "3.14",
    pythonPath: [],
    allowNet: [],
    environment: {},
    writePaths: [],
    mountPoint: "",
    urlAliases: [],
    trustedProxies: [],
    accessLog: false,
    accessLogFormat: "default",
    logLevel: "info",
    preload: false,
    snapshot: "app",
    queueLimit: 100,
    requestTimeoutMs: 60_000,
    queueTimeoutMs: 45_000,
    bodyTimeoutMs: 20_000,
    sendTimeoutMs: 20_000,
    readAheadBytes: 64 * 1024,
    inactivityTimeoutMs: 60_000,
    maximumRequests: 0,
    memoryLimitBytes: 0,
    memoryMaxBytes: 0,
    daemonGroups: [],
    mounts: [],
  };
}

interface OptionUse {
  spec: OptionSpec;
  values: string[];
  /** The folder that relative paths resolve against, for a use from a configuration file. */
  cwd?: string;
  /** The file and line of a use from a configuration file, for error messages. */
  origin?: string;
}

interface Tokens {
  uses: OptionUse[];
  positionals: string[];
  /** First structural error, thrown only when no `--help` or `--version` follows it. */
  error?: UsageError;
}

/** Splits arguments into option uses and positionals without validating any value. */
function tokenize(args: readonly string[]): Tokens {
  const tokens: Tokens = { uses: [], positionals: [] };
  const fail = (error: UsageError) => {
    tokens.error ??= error;
  };

  let index = 0;
  while (index < args.length) {
    const arg = args[index++];
    if (arg === "--") {
      tokens.positionals.push(...args.slice(index));
      break;
    }
    // "-" alone is an ordinary argument, as in most Unix tools.
    if (!arg.startsWith("-") || arg === "-") {
      tokens.positionals.push(arg);
      continue;
    }

    const { name, inlineValue } = splitInlineValue(arg);
    const spec = findOption(name);
    if (!spec) {
      fail(new UsageError(`unknown option '${name}'; run 'wsgirun --help' for the list`));
      continue;
    }
    if (inlineValue !== undefined && spec.valueNames.length === 0) {
      fail(invalidValue(name, inlineValue, `no value, because ${name} is a flag`));
      continue;
    }

    const values = inlineValue === undefined ? [] : [inlineValue];
    while (values.length < spec.valueNames.length && index < args.length) {
      if (looksLikeOption(args[index])) break;
      values.push(args[index++]);
    }
    if (values.length < spec.valueNames.length) {
      fail(missingValue(spec, values));
      continue;
    }
    tokens.uses.push({ spec, values });
  }
  return tokens;
}

/** Splits "--port=80" into its name and value. Short options never carry a value. */
function splitInlineValue(arg: string): { name: string; inlineValue?: string } {
  const equals = arg.indexOf("=");
  if (!arg.startsWith("--") || equals < 0) return { name: arg };
  return { name: arg.slice(0, equals), inlineValue: arg.slice(equals + 1) };
}

function findOption(name: string): OptionSpec | undefined {
  return OPTIONS.find((spec) => spec.name === name || spec.shortName === name);
}

/**
 * Reports whether an argument ends the values of the option before it. Values that
 * start with a single dash, such as "-1", are kept so that their check names them.
 */
function looksLikeOption(arg: string): boolean {
  return arg.startsWith("--") || OPTIONS.some((spec) => spec.shortName === arg);
}

function missingValue(spec: OptionSpec, given: readonly string[]): UsageError {
  const missing = spec.valueNames.slice(given.length);
  const what = spec.valueNames.length === 1 ? "value" : missing.join(" and ");
  const after = given.map((value) => ` ${quote(value)}`).join("");
  return new UsageError(
    `missing ${what} for ${spec.name}${after} (expected ${optionSynopsis(spec)})`,
  );
}

function selectScriptArgument(positionals: readonly string[]): string {
  if (positionals.length === 0) {
    throw new UsageError("missing SCRIPT: name a WSGI script file or package.module:callable");
  }
  if (positionals.length > 1) {
    throw new UsageError(
      `unexpected argument ${quote(positionals[1])} after SCRIPT ${quote(positionals[0])} ` +
        "(give one SCRIPT, and quote a path that contains spaces)",
    );
  }
  return positionals[0];
}

function selectCallable(
  scriptArgument: string,
  scriptCallable: string | undefined,
  callableObject: string | undefined,
): string {
  if (scriptCallable !== undefined && callableObject !== undefined) {
    throw new UsageError(
      `conflicting callables: SCRIPT ${quote(scriptArgument)} names ${quote(scriptCallable)} ` +
        `and --callable-object names ${quote(callableObject)} (give the callable only once)`,
    );
  }
  return scriptCallable ?? callableObject ?? "application";
}

// ---------------------------------------------------------------------------
// SCRIPT

/** Dotted module name with an optional callable, as gunicorn accepts it. */
const MODULE_PATTERN = /^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$/;
/** Names that can only mean a script file, never the module form. */
const SCRIPT_FILE_SUFFIX = /\.(py|wsgi)$/;

interface ResolvedScript {
  /** Name for log lines: the file's base name or the module name. */
  name: string;
  scriptPath?: string;
  module?: string;
  /** Callable named after the colon of the module form. */
  callable?: string;
  /** Directory that comes first on sys.path. */
  directory: string;
}

/**
 * Decides whether SCRIPT is a script file or a module. An existing file wins, so
 * a file called "app" is never read as the module "app".
 */
function resolveScript(value: string, cwd: string): ResolvedScript {
  const path = resolve(cwd, value);
  const kind = statPathKind(path);

  if (kind === "file") {
    // Symbolic links in the folders stay, so that a reload after a deploy
    // that switches a link such as current -> releases/42 loads the new
    // release. A script that is itself a link is followed: its folder is
    // the one its imports live in.
    const scriptPath = Deno.lstatSync(path).isSymlink ? Deno.realPathSync(path) : path;
    return { name: basename(path), scriptPath, directory: dirname(scriptPath) };
  }
  if (!SCRIPT_FILE_SUFFIX.test(value) && MODULE_PATTERN.test(value)) {
    const [module, callable] = value.split(":");
    return { name: module, module, callable, directory: realPathOrSelf(cwd) };
  }
  if (kind === "missing") throw scriptNotFound(value, path);
  throw new UsageError(
    `invalid SCRIPT: ${quote(value)} (expected a WSGI script file, but ${quote(path)} ` +
      `is a ${kind === "directory" ? "directory" : "special file"})`,
  );
}

function scriptNotFound(value: string, path: string): UsageError {
  let hint = "";
  // Django names its module mysite.wsgi, so that name may mean the module, not a file.
  if (value.endsWith(".wsgi") && MODULE_PATTERN.test(value)) {
    hint = `, or write '${value}:application' for the module ${value}`;
  }
  return new UsageError(
    `script file not found: ${quote(value)} (no file at ${quote(path)}${hint})`,
  );
}

// ---------------------------------------------------------------------------
// Value checks

/** Rejects --host, --port and --certfile next to --unix-socket, which replaces the TCP socket. */
/**
 * Settles --unix-socket against --host, --port and --certfile, which it
 * replaces. Given in the same place, they clash. Given one in the
 * --config file and the other on the command line, the command line wins,
 * as it does for every option.
 */
function settleListenOptions(uses: readonly OptionUse[], draft: OptionValues): void {
  const socket = uses.findLast((use) => use.spec.name === "--unix-socket");
  if (!socket) return;
  const tcp = uses.filter((use) => TCP_OPTIONS.has(use.spec.name));
  const fromFile = (use: OptionUse) => use.origin !== undefined;
  const clashing = tcp.filter((use) => fromFile(use) === fromFile(socket));
  if (clashing.length > 0) {
    const names = [...new Set(clashing.map((use) => use.spec.name))];
    const certificateNote = names.includes("--certfile")
      ? "; the proxy in front of the socket speaks HTTPS to clients"
      : "";
    throw new UsageError(
      `${socket.origin ? `${socket.origin}: ` : ""}--unix-socket cannot be combined with ` +
        `${names.join(" or ")}: the server listens on the Unix socket alone${certificateNote}`,
    );
  }
  if (tcp.length === 0) return;
  if (fromFile(socket)) {
    draft.unixSocket = undefined;
  } else {
    draft.certFile = undefined;
    draft.keyFile = undefined;
  }
}

/** Options of the TCP socket, which --unix-socket replaces. */
const TCP_OPTIONS = new Set(["--host", "--port", "--certfile", "--keyfile"]);

/**
 * Reads the PEM files of --certfile and --keyfile, which go together.
 * Deno checks that the key belongs to the certificate when the server
 * starts to listen.
 */
function readTlsFiles(certFile?: string, keyFile?: string): TlsFiles | undefined {
  if (certFile === undefined && keyFile === undefined) return undefined;
  if (certFile === undefined || keyFile === undefined) {
    const [given, missing] = certFile === undefined
      ? ["--keyfile", "--certfile"]
      : ["--certfile", "--keyfile"];
    throw new UsageError(`${given} needs ${missing}: give the certificate and its key together`);
  }
  const cert = readPem("--certfile", certFile, "CERTIFICATE");
  const key = readPem("--keyfile", keyFile, "PRIVATE KEY");
  return { certFile, keyFile, cert, key };
}

/** Reads a PEM file that must contain a block whose label ends in `label`, such as "PRIVATE KEY". */
function readPem(option: string, path: string, label: string): string {
  let text: string;
  try {
    text = Deno.readTextFileSync(path);
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    throw new UsageError(`cannot read ${option} ${quote(path)}: ${reason}`);
  }
  if (!new RegExp(`-----BEGIN [A-Z ]*${label}-----`).test(text)) {
    throw new UsageError(
      `${option} ${quote(path)} is not a PEM file with a '-----BEGIN ...${label}-----' line`,
    );
  }
  if (/-----BEGIN ENCRYPTED PRIVATE KEY-----|Proc-Type: 4,ENCRYPTED/.test(text)) {
    throw new UsageError(
      `${option} ${quote(path)} is encrypted, and the server cannot ask for its passphrase; ` +
        `give it a key without one, such as the output of 'openssl pkey -in ${path}'`,
    );
  }
  return text;
}

type PathKind = "file" | "directory" | "special" | "missing";

function statPathKind(path: string): PathKind {
  try {
    const info = Deno.statSync(path);
    if (info.isFile) return "file";
    return info.isDirectory ? "directory" : "special";
  } catch (error) {
    if (error instanceof Deno.errors.NotFound || error instanceof Deno.errors.NotADirectory) {
      return "missing";
    }
    const reason = error instanceof Error ? error.message : String(error);
    throw new UsageError(`failed to check ${quote(path)}: ${reason}`);
  }
}

/** Returns the real path of `path`, or `path` itself when it cannot be resolved. */
function realPathOrSelf(path: string): string {
  try {
    return Deno.realPathSync(path);
  } catch {
    // A removed working directory has no real path. Keeping the path as given lets the
    // module import report the failure.
    return path;
  }
}

/**
 * Checks that `value` names an existing path of the given kind and returns
 * its absolute path. Symbolic links stay in it, so that a reload, or a
 * static file request, follows a switched link.
 */
function parseExistingPath(
  option: string,
  value: string,
  cwd: string,
  expected: "directory" | "file" | "file or directory",
): string {
  // An unset shell variable ("--write $DATA_DIR") must not mean the working folder.
  if (value === "") {
    throw invalidValue(option, value, `an existing ${expected}, not an empty path`);
  }
  const path = resolve(cwd, value);
  const kind = statPathKind(path);
  const accepted = kind === "directory"
    ? expected !== "file"
    : kind === "file" && expected !== "directory";
  if (accepted) return path;

  const found = kind === "missing"
    ? "does not exist"
    : `is a ${kind === "special" ? "special file" : kind}`;
  throw invalidValue(option, value, `an existing ${expected}, but ${quote(path)} ${found}`);
}

function parseUrlAlias(
  url: string,
  path: string,
  cwd: string,
  existing: readonly UrlAlias[],
): UrlAlias {
  const prefix = parseUrlPrefix("--url-alias", url);
  if (prefix === "") {
    throw invalidValue(
      "--url-alias",
      url,
      "a URL path prefix other than '/', such as '/static'. Use --mount-point to choose " +
        "where the application is served",
    );
  }
  if (existing.some((alias) => alias.url === prefix)) {
    throw invalidValue("--url-alias", url, "a URL that no other --url-alias uses");
  }
  // Links stay: static files resolve the alias's real path for each request.
  return { url: prefix, path: parseExistingPath("--url-alias", path, cwd, "file or directory") };
}

/**
 * Rejects a --url-alias at or above a mount point. Aliases are matched
 * before mounts, so every request for that mount would get a static file.
 */
function checkAliasesLeaveMounts(aliases: UrlAlias[], mountPoints: string[]): void {
  for (const alias of aliases) {
    const shadowed = mountPoints.find((mountPoint) =>
      mountPoint === alias.url || mountPoint.startsWith(alias.url + "/")
    );
    if (shadowed === undefined) continue;
    throw new UsageError(
      `invalid value for --url-alias: '${alias.url}' covers the application mounted at ` +
        `'${shadowed}', whose requests would all get static files (expected a URL outside ` +
        "every mount point, such as '/static' beside '/app')",
    );
  }
}

/** Characters allowed in a URL path segment by RFC 3986 (pchar), without percent-encoding. */
const URL_PATH_CHARACTERS = /^[A-Za-z0-9\-._~!$&'()*+,;=:@/]*$/;

/**
 * Normalizes a URL path prefix: "/app/" becomes "/app" and "/" becomes "".
 *
 * The front compares prefixes with the raw request target, so a prefix must already
 * be in the form a request carries. Percent-encoding, queries and dot segments would
 * never match. Empty segments and ".." could make two prefixes overlap unnoticed.
 */
function parseUrlPrefix(option: string, value: string): string {
  if (!value.startsWith("/")) {
    throw invalidValue(option, value, "a URL path that starts with '/', such as '/app'");
  }
  if (/[?#%]/.test(value)) {
    throw invalidValue(option, value, "a decoded URL path without '?', '#' or '%'");
  }
  if (!URL_PATH_CHARACTERS.test(value)) {
    throw invalidValue(
      option,
      value,
      "a URL path of ASCII letters, digits, '/' and -._~!$&'()*+,;=:@",
    );
  }
  if (value.includes("//")) {
    throw invalidValue(option, value, "a URL path without empty segments ('//')");
  }
  if (value.includes(":process-group=")) {
    throw invalidValue(
      option,
      value,
      "a URL path; ':process-group=GROUP' goes after SCRIPT, as in --mount /app app.wsgi:process-group=GROUP",
    );
  }
  const prefix = value.endsWith("/") ? value.slice(0, -1) : value;
  if (prefix.split("/").some((segment) => segment === "." || segment === "..")) {
    throw invalidValue(option, value, "a URL path without '.' or '..' segments");
  }
  return prefix;
}

function parseHost(value: string): string {
  const expected = "a host name or IP address, such as 127.0.0.1, 0.0.0.0 or ::1";
  if (value.startsWith("[") && value.endsWith("]")) {
    throw invalidValue("--host", value, "an IPv6 address without brackets, such as ::1");
  }
  // '%' belongs to IPv6 zone ids such as fe80::1%eth0.
  if (!/^[A-Za-z0-9._:%-]+$/.test(value) || value.startsWith("-")) {
    throw invalidValue("--host", value, expected);
  }
  return value;
}

function parseInteger(option: string, value: string, min: number, max: number): number {
  const expected = `an integer from ${min} to ${max}`;
  // Number() would also accept "", " 8", "0x1f" and "1e3".
  if (!/^[0-9]+$/.test(value)) throw invalidValue(option, value, expected);

  const number = Number(value);
  if (number < min || number > max) throw invalidValue(option, value, expected);
  return number;
}

function parseDuration(option: string, value: string): number {
  const ms = parseSeconds(value);
  if (ms === undefined) throw invalidValue(option, value, SECONDS_FORM);
  return ms;
}

function parseMemorySize(option: string, value: string): number {
  const bytes = parseSize(value);
  if (bytes === undefined) throw invalidValue(option, value, SIZE_FORM);
  return bytes;
}

function parseChoice<T extends string>(option: string, value: string, choices: readonly T[]): T {
  const choice = choices.find((candidate) => candidate === value);
  if (choice === undefined) throw invalidValue(option, value, listAlternatives(choices));
  return choice;
}

function parseIdentifier(option: string, value: string): string {
  // NOTE: Python also allows non-ASCII identifiers, but this check rejects them.
  if (!/^[A-Za-z_]\w*$/.test(value)) {
    throw invalidValue(option, value, "a Python identifier, such as 'application' or 'app'");
  }
  return value;
}

function invalidValue(option: string, value: string, expected: string): UsageError {
  return new UsageError(`invalid value for ${option}: ${quote(value)} (expected ${expected})`);
}

/** Quotes a value for a one-line message, escaping control characters. */
function quote(value: string): string {
  // deno-lint-ignore no-control-regex -- control characters are exactly what must be escaped
  const escaped = value.replace(/[\x00-\x1f\x7f]/g, (character) => {
    if (character === "\n") return "\\n";
    if (character === "\t") return "\\t";
    return `\\x${character.charCodeAt(0).toString(16).padStart(2, "0")}`;
  });
  return `'${escaped}'`;
}
