import type { AppSpec } from "../supervisor/app_spec.ts";
import type { DaemonGroupSpec } from "../supervisor/daemon_spec.ts";
import type { LogLevel } from "../supervisor/log.ts";
import type { AddressRange } from "./proxy.ts";

/** A static folder served at a URL prefix without Python (`--url-alias`). */
export interface UrlAlias {
  /** URL prefix, starting with "/" and without a trailing "/" (unless it is "/"). */
  url: string;
  /** Absolute host path of a folder or a single file. */
  path: string;
}

/** A further application mounted at a URL prefix (`--mount URL SCRIPT`). */
export interface MountSpec {
  /** URL prefix, "" for the root, else "/prefix" without a trailing "/". */
  mountPoint: string;
  app: AppSpec;
  /** Daemon process group that runs the application; embedded when unset. */
  processGroup?: string;
}

/** A TLS certificate chain and its private key, read from their files at start. */
export interface TlsFiles {
  certFile: string;
  keyFile: string;
  cert: string;
  key: string;
}

/** Everything the command line sets for one server. */
export interface ServerOptions {
  /** @default "127.0.0.1" */
  host: string;
  /** @default 8000 */
  port: number;
  /** File the server writes its process id to once it listens (--pid). */
  pidFile?: string;
  /** Path of a Unix socket to listen on in place of `host` and `port` (--unix-socket). */
  unixSocket?: string;
  /** Certificate and key in PEM form, for HTTPS (--certfile, --keyfile); unset serves plain HTTP. */
  tls?: TlsFiles;
  /** Maximum isolates of an embedded pool. @default navigator.hardwareConcurrency */
  threads: number;
  /** Isolates an embedded pool starts with and keeps when idle, at most `threads`. @default threads */
  minThreads: number;
  /** Milliseconds an idle isolate above `minThreads` is kept; 0 keeps it. @default 60000 */
  inactivityTimeoutMs: number;
  /** Requests an embedded isolate serves before a fresh one replaces it; 0 turns it off. @default 0 */
  maximumRequests: number;
  /** Bytes of wasm memory above which an embedded isolate is replaced; 0 turns it off. @default 0 */
  memoryLimitBytes: number;
  /** Bytes past which an embedded isolate's wasm memory may not grow; 0 for no cap. @default 0 */
  memoryMaxBytes: number;
  /** URL prefix the application is mounted at: "" for the root, else "/prefix". @default "" */
  mountPoint: string;
  urlAliases: UrlAlias[];
  /** Reverse proxies whose X-Forwarded-* headers are trusted (--trusted-proxy). @default [] */
  trustedProxies: AddressRange[];
  /** Write one line per request to standard output. @default false */
  accessLog: boolean;
  /** Apache LogFormat directives of the access log, or a name in NAMED_FORMATS. @default "default" */
  accessLogFormat: string;
  /** @default "info" */
  logLevel: LogLevel;
  /**
   * Requests that may wait for a free isolate before new ones get 503.
   * @default 100
   */
  queueLimit: number;
  /** Milliseconds a request may run in an embedded isolate before it gets 504; 0 for no limit. @default 60000 */
  requestTimeoutMs: number;
  /** Milliseconds a request may wait for an embedded isolate before it gets 503; 0 for no limit. @default 45000 */
  queueTimeoutMs: number;
  /**
   * Milliseconds a request body may go without new bytes while the server
   * reads it before the request gets 408; 0 for no limit.
   * @default 20000
   */
  bodyTimeoutMs: number;
  /**
   * Milliseconds a streamed response may wait for the client to take more
   * bytes before the server stops it and frees its isolate; 0 for no limit.
   * @default 20000
   */
  sendTimeoutMs: number;
  /**
   * Largest request body with a Content-Length that the server reads whole
   * before it queues the request, so that a slow client does not hold an
   * isolate while it sends it; 0 streams every body.
   * @default 65536
   */
  readAheadBytes: number;
  /**
   * Milliseconds running requests get to finish when the server stops.
   * @default the longest shutdown-timeout of the daemon groups, else 5000
   */
  shutdownTimeoutMs?: number;
  /** Problems of the command line that do not stop the server, for the log at start. */
  warnings?: string[];
  app: AppSpec;
  /** Daemon process group that runs `app`; embedded when unset. */
  processGroup?: string;
  /** Applications mounted besides `app`, each embedded or in a group. */
  mounts: MountSpec[];
  /** Process groups from `--daemon`, each used by at least one mount. */
  daemonGroups: DaemonGroupSpec[];
}
