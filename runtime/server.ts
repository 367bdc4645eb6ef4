/**
 * The front: one `Deno.serve` listener that routes each request to a static
 * alias, to the backend of the mount it falls under (embedded isolates or a
 * daemon process group), or to a 404.
 */

import { type Logger, writeOutput } from "../supervisor/log.ts";
import { compileAccessLogFormat } from "./access_log.ts";
import { TrustedProxies } from "./proxy.ts";
import { type Endpoint, listen, type Peer } from "./listener.ts";
import {
  buildEnviron,
  decodePath,
  rawTarget,
  requestHost,
  serverName,
  unixServerPort,
} from "./environ.ts";
import { MountTable } from "./mounts.ts";
import type { ServerOptions } from "./options.ts";
import { matchAlias, serveStatic } from "./static_files.ts";
import { errorBodyBytes, errorResponse, type ResponseRecord } from "./wsgi_response.ts";
import { markServerStopping } from "../supervisor/backend.ts";
import { handleWsgiRequest } from "./wsgi_request.ts";

export interface RunningServer {
  /** The listening address (with the real port when --port 0 was given). */
  endpoint: Endpoint;
  mounts: MountTable;
  /** Resolves once every mount can serve; rejects if one cannot start. */
  ready: Promise<void>;
  /** Resolves when the listener has closed. */
  finished: Promise<void>;
  /**
   * Stops accepting, lets running responses finish within `timeoutMs` (by
   * default --shutdown-timeout, else the longest shutdown-timeout of the
   * daemon groups, else 5 s), then stops every backend.
   */
  shutdown(timeoutMs?: number): Promise<void>;
  /**
   * Starts fresh interpreters for every application and drains the old ones.
   * With `reimport` (SIGHUP), the application snapshots are built again.
   */
  reload(reason: string, reimport?: boolean): void;
}

/** Grace period for running responses when the server stops and no group sets its own. */
const DEFAULT_SHUTDOWN_MS = 5000;
/** Time the 503 responses of requests stopped at the end of a shutdown get to reach their clients. */
const FLUSH_AFTER_STOP_MS = 1000;

/** Describes an embedded pool's size for the start lines: "1 isolate", "4 isolates" or "1 to 4 isolates". */
function describeIsolates(options: ServerOptions): string {
  const { minThreads, threads } = options;
  if (minThreads < threads) return `${minThreads} to ${threads} isolates`;
  return `${threads} isolate${threads === 1 ? "" : "s"}`;
}

function delay<T>(ms: number, value: T): Promise<T> {
  return new Promise((resolve) => setTimeout(resolve, ms, value));
}

/**
 * Logs a forwarding header from a trusted proxy that was ignored because its
 * value is invalid: a warning the first time for each header, then at debug
 * level, because a misconfigured proxy sends it with every request.
 */
function logInvalidForwarding(
  logger: Logger,
  warned: Set<string>,
  proxy: string,
  header: string,
  value: string,
): void {
  const level = warned.has(header) ? "debug" : "warning";
  warned.add(header);
  logger[level](
    `ignored the invalid ${header} header '${value}' from the trusted proxy ${proxy}; ` +
      "check that proxy's configuration (this warning comes once per header)",
  );
}

/** Logs one line for each mount besides the main one, and for each mount in a daemon group. */
function logMounts(mounts: MountTable, options: ServerOptions, logger: Logger): void {
  for (const mount of mounts.mounts) {
    const url = mount.mountPoint || "/";
    if (mount.backend.name === "embedded") {
      if (mount.app === options.app) continue;
      logger.info(
        `mounted ${mount.app.name} at ${url}: embedded, Python ${mount.app.python}, ${
          describeIsolates(options)
        }`,
      );
      continue;
    }
    logger.info(
      `mounted ${mount.app.name} at ${url}: daemon group '${mount.backend.name}' on Python ${mount.app.python}`,
    );
  }
}

export function startServer(options: ServerOptions, logger: Logger): Promise<RunningServer> {
  const app = options.app;
  const appLogger = logger.child({ app: app.name, pid: Deno.pid });
  let mounts: MountTable;
  try {
    mounts = new MountTable(options, logger);
  } catch (error) {
    return Promise.reject(error);
  }
  const ready = mounts.start();
  let requestCount = 0;
  const requestPrefix = Math.random().toString(36).slice(2, 6);
  const accessLine = options.accessLog ? compileAccessLogFormat(options.accessLogFormat) : null;
  const proxies = new TrustedProxies(options.trustedProxies);
  const scheme = options.tls ? "https" : "http";
  /** Headers of a trusted proxy whose invalid value was logged as a warning; later ones go to debug. */
  const warnedHeaders = new Set<string>();

  const handler = async (request: Request, peer: Peer) => {
    const requestId = `${requestPrefix}-${++requestCount}`;
    const arrival = {
      wallMs: options.accessLog ? Date.now() : 0,
      monotonicMs: performance.now(),
      requestId,
    };
    const requestLogger = appLogger.child({ request: requestId });
    const host = requestHost(request, scheme === "https");
    const target = rawTarget(request.url, host, endpoint.port ?? 0, endpoint.urlScheme);
    const remote = peer.address;
    const forwarded = proxies.enabled
      ? proxies.resolve(
        remote,
        request.headers,
        (header, value) =>
          logInvalidForwarding(requestLogger, warnedHeaders, remote, header, value),
      )
      : undefined;
    const done = (response: ResponseRecord) => {
      if (!accessLine) return;
      const line = accessLine({
        request,
        uri: target.uri,
        remote,
        client: forwarded?.client ?? remote,
        serverPort: endpoint.port,
        response,
        arrivalWallMs: arrival.wallMs,
        arrivalMs: arrival.monotonicMs,
        requestId,
      });
      writeOutput(Deno.stdout, line + "\n");
    };

    try {
      const alias = matchAlias(options.urlAliases, target.text);
      if (alias) {
        return await serveStatic(request, alias.alias, alias.rest, {
          logger: requestLogger,
          onDone: done,
          sendTimeoutMs: options.sendTimeoutMs,
        });
      }

      const path = decodePath(target.path);
      const route = mounts.route(path);
      if (!route) {
        done({ status: 404, bytes: errorBodyBytes("Not Found") });
        return errorResponse(404, "Not Found");
      }
      const environ = buildEnviron(request, target, route.scriptName, route.pathInfo, {
        serverName: serverName(host, endpoint.hostname),
        serverPort: endpoint.port ?? unixServerPort(host, scheme),
        remoteAddr: remote,
        remotePort: peer.port,
        scheme,
        host,
      });
      if (proxies.enabled) {
        proxies.apply(environ, forwarded, (name) => serverName(name, endpoint.hostname));
      }
      return await handleWsgiRequest({
        request,
        requestId,
        environ,
        backend: route.mount.backend,
        logger: route.mount.logger.child({ request: requestId }),
        filePaths: route.mount.filePaths,
        bodyTimeoutMs: options.bodyTimeoutMs,
        sendTimeoutMs: options.sendTimeoutMs,
        readAheadBytes: options.readAheadBytes,
        onDone: done,
      });
    } catch (error) {
      requestLogger.error(
        `request failed in the server: ${error instanceof Error ? error.stack : error}`,
      );
      done({ status: 500, bytes: errorBodyBytes("Internal Server Error"), error: String(error) });
      return errorResponse(500, "Internal Server Error");
    }
  };

  // The handler runs only once the server listens, when endpoint is set.
  let endpoint: Endpoint;
  const onError = (error: unknown) => {
    // The handler catches its own errors, so what reaches here is a
    // response stream that was aborted on purpose and already logged.
    appLogger.debug(`connection aborted: ${error}`);
    return errorResponse(500, "Internal Server Error");
  };

  return listen(options, handler, onError).then(({ server, endpoint: listening }) => {
    endpoint = listening;
    const runsIn = options.processGroup === undefined
      ? `Python ${app.python}, ${describeIsolates(options)}`
      : `daemon group '${options.processGroup}'`;
    const where = endpoint.port === undefined
      ? `${endpoint.url}, URL path ${options.mountPoint || "/"}`
      : endpoint.url + (options.mountPoint || "/");
    appLogger.info(`listening on ${where} (${runsIn})`);
    logMounts(mounts, options, appLogger);
    const groupShutdownMs = mounts.groups.length > 0
      ? Math.max(...mounts.groups.map((group) => group.spec.shutdownTimeoutMs))
      : DEFAULT_SHUTDOWN_MS;
    const shutdownMs = options.shutdownTimeoutMs ?? groupShutdownMs;
    return {
      endpoint,
      mounts,
      ready,
      finished: server.finished,
      reload: (reason, reimport) => mounts.reload(reason, reimport),
      async shutdown(timeoutMs = shutdownMs) {
        appLogger.info("shutting down: no new connections");
        markServerStopping();
        mounts.stopReloads();
        const drained = server.shutdown().then(() => "drained");
        const result = await Promise.race([drained, delay(timeoutMs, "timeout")]);
        if (result === "timeout") {
          appLogger.warning(`responses still running after ${timeoutMs} ms; stopping them`);
        }
        await mounts.stop();
        if (result === "timeout") {
          // Stopping the backends failed the requests that had not sent a
          // response head with 503; give Deno a moment to write those out.
          await Promise.race([drained, delay(FLUSH_AFTER_STOP_MS, "timeout")]);
        }
        appLogger.info("server stopped");
      },
    };
  });
}
