/**
 * The server's main flow: parse the command line, start the mounts and the
 * listener, then act on signals until the server stops.
 *
 * Signal handlers only queue the signal; one loop takes them in order:
 * - SIGHUP: every application starts fresh interpreters (fresh processes for
 *   daemon groups) and the old ones finish their requests. Once the server
 *   is stopping, SIGHUP is ignored.
 * - SIGUSR1: Deno opens its debugger on this signal, which the server
 *   closes again at once and logs (see inspector_guard.ts).
 * - SIGTERM, SIGINT: stop accepting, let running requests finish within the
 *   shutdown timeout, stop the daemon processes and exit 0. A second one
 *   exits at once with status 1; daemon processes then see their channel
 *   close and stop too.
 * - SIGQUIT: exit at once with status 0, as gunicorn's quick shutdown.
 * - SIGTTIN, SIGUSR2: logged and ignored. gunicorn uses them to add a worker
 *   and to upgrade its binary, and their default actions would stop or end
 *   the server. SIGTTOU keeps its default action: the terminal sends it to a
 *   background process that writes while `stty tostop` is set, and a handler
 *   would make each such write of the log raise it again.
 */

import { DaemonConfigError } from "../supervisor/daemon_command.ts";
import { closeInspectorOnSigusr1, sigusr1Message } from "../supervisor/inspector_guard.ts";
import { Logger } from "../supervisor/log.ts";
import type { MallocNote } from "../supervisor/malloc.ts";
import { formatUsageError, parseCommandLine, UsageError } from "./cli.ts";
import { type RunningServer, startServer } from "./server.ts";
import { ListenConfigError } from "./listener.ts";

/** Exit status for invalid command lines and configurations, as in most Unix tools. */
const EXIT_USAGE = 2;
/** Exit status after a second stop signal cut the graceful stop short. */
const EXIT_INTERRUPTED = 1;
/** Exit status when the server cannot open its listening socket. */
const EXIT_FAILURE = 1;
/**
 * A stop signal this soon after the first one is the same stop delivered
 * twice: Ctrl-C under `deno task` reaches the server from the terminal and
 * again from the task runner, and a service manager may signal the whole
 * process group. A later one cuts the graceful stop short.
 */
const REPEATED_SIGNAL_MS = 1000;
/**
 * A SIGHUP this soon after the last one is the same one delivered twice, as
 * under `deno task` (about 10 ms apart). Shorter than REPEATED_SIGNAL_MS, so
 * that a deliberate second reload soon after a first one still happens.
 */
const REPEATED_RELOAD_MS = 250;

function parseOrExit(args: string[]) {
  try {
    return parseCommandLine(args, {
      cwd: Deno.cwd(),
      cpus: navigator.hardwareConcurrency,
      variable: (name) => Deno.env.get(name),
    });
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(formatUsageError(error));
    Deno.exit(EXIT_USAGE);
  }
}

/** Signals in the order they arrived; the handlers only append. */
class SignalQueue {
  #queue: Deno.Signal[] = [];
  #wake: (() => void) | null = null;

  constructor(signals: Deno.Signal[]) {
    for (const signal of signals) {
      Deno.addSignalListener(signal, () => {
        this.#queue.push(signal);
        this.#wake?.();
      });
    }
  }

  async next(): Promise<Deno.Signal> {
    while (this.#queue.length === 0) {
      await new Promise<void>((resolve) => (this.#wake = resolve));
      this.#wake = null;
    }
    return this.#queue.shift()!;
  }
}

/** The reason, with what to do instead, for each ignored signal that other servers act on. */
const IGNORED_SIGNALS: Partial<Record<Deno.Signal, string>> = {
  SIGTTIN: "pools grow on their own up to --threads and a group's processes; " +
    "restart the server with higher values for more",
  SIGUSR2: "wsgirun has no in-place upgrade; send SIGHUP to reload the applications, " +
    "or restart the server to run a new wsgirun",
};

/** Acts on signals until a stop signal has stopped the server; never returns. */
async function handleSignals(server: RunningServer, logger: Logger): Promise<never> {
  const signals = new SignalQueue([
    "SIGINT",
    "SIGTERM",
    "SIGHUP",
    "SIGQUIT",
    ...Object.keys(IGNORED_SIGNALS) as Deno.Signal[],
  ]);
  let stoppingSince: number | undefined;
  let reloadedAt = -Infinity;
  for (;;) {
    const signal = await signals.next();
    const ignored = IGNORED_SIGNALS[signal];
    if (ignored) {
      logger.warning(`${signal} ignored: ${ignored}`);
      continue;
    }
    if (signal === "SIGQUIT") {
      logger.warning(
        "SIGQUIT: exiting at once; running requests are cut off, and daemon processes stop " +
          "when their channel closes",
      );
      Deno.exit(0);
    }
    const reload = signal === "SIGHUP";
    if (reload && stoppingSince !== undefined) {
      logger.info(`${signal} ignored: the server is stopping`);
      continue;
    }
    if (reload && performance.now() - reloadedAt < REPEATED_RELOAD_MS) {
      logger.info(
        `${signal} again within ${REPEATED_RELOAD_MS} ms: taken as the same reload`,
      );
      continue;
    }
    if (reload) {
      reloadedAt = performance.now();
      logger.info(`${signal}: reloading every application`);
      server.reload(`the server received ${signal}`, true);
      continue;
    }
    if (stoppingSince !== undefined) {
      if (performance.now() - stoppingSince < REPEATED_SIGNAL_MS) {
        logger.info(
          `${signal} again within ${REPEATED_SIGNAL_MS} ms: taken as the same stop (send it again later to exit at once)`,
        );
        continue;
      }
      logger.warning(`${signal} during the graceful stop: exiting at once`);
      Deno.exit(EXIT_INTERRUPTED);
    }
    stoppingSince = performance.now();
    logger.info(`${signal}: stopping gracefully`);
    server.shutdown().then(() => Deno.exit(0));
  }
}

async function start(
  options: Parameters<typeof startServer>[0],
  logger: Logger,
): Promise<RunningServer> {
  try {
    return await startServer(options, logger);
  } catch (error) {
    if (error instanceof DaemonConfigError || error instanceof ListenConfigError) {
      console.error(`wsgirun: ${error.message}`);
      Deno.exit(EXIT_USAGE);
    }
    const reason = listenFailure(error);
    if (reason === undefined) throw error;
    console.error(`wsgirun: cannot listen on ${options.host}:${options.port}: ${reason}`);
    Deno.exit(EXIT_FAILURE);
  }
}

/** Returns why the listening socket could not be opened, with the fix, or undefined for other errors. */
function listenFailure(error: unknown): string | undefined {
  if (error instanceof Deno.errors.AddrInUse) {
    return "the address is already in use; stop the server that uses it or choose another --port";
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return "no network interface of this machine has that address; give --host one of its addresses, " +
      "or 0.0.0.0 for all of them";
  }
  if (error instanceof Deno.errors.PermissionDenied) {
    return `permission denied (${error.message}); ports below 1024 need root or the CAP_NET_BIND_SERVICE capability`;
  }
  // Deno 2.9.6 reports an unknown host name with a plain Error.
  if (error instanceof Error && error.message.startsWith("failed to lookup address information")) {
    return `the host name cannot be resolved (${error.message}); give --host an IP address or a name that resolves`;
  }
  return undefined;
}

/**
 * Exits with a usage error when the pid file names a running wsgirun, as
 * gunicorn refuses to start then: the new server would take the file over,
 * and its removal at exit would leave the other server without one.
 */
function exitIfPidFileInUse(path: string): void {
  let pid: number;
  let command: string;
  try {
    pid = Number(Deno.readTextFileSync(path).trim());
    if (!Number.isSafeInteger(pid) || pid <= 0 || pid === Deno.pid) return;
    command = Deno.readTextFileSync(`/proc/${pid}/cmdline`);
  } catch {
    return; // No pid file, or its process has ended.
  }
  // A pid that the system gave to another program since is no server's.
  if (!/deno|wsgirun/.test(command)) return;
  console.error(
    `wsgirun: the pid file ${path} names process ${pid}, a server that is still running; ` +
      "stop it first, or give this server another --pid",
  );
  Deno.exit(EXIT_USAGE);
}

/**
 * Writes the process id to `path` through a temporary file, so that a reader
 * never sees a half-written file, and removes it when the process exits,
 * unless another server wrote its own id there meanwhile.
 */
function writePidFile(path: string, logger: Logger): void {
  const text = `${Deno.pid}\n`;
  const temporary = `${path}.${Deno.pid}.tmp`;
  try {
    Deno.writeTextFileSync(temporary, text);
    Deno.renameSync(temporary, path);
  } catch (error) {
    logger.error(
      `cannot write the pid file ${path}: ${error instanceof Error ? error.message : error}; ` +
        "the server runs on without it (check that folder's permissions)",
    );
    return;
  }
  globalThis.addEventListener("unload", () => {
    try {
      if (Deno.readTextFileSync(path) === text) Deno.removeSync(path);
    } catch {
      // Already removed, or replaced by a file that is not ours to remove.
    }
  });
}

/** `mallocNote`: what main.ts did to the C library's malloc settings, for the log. */
export async function runFront(args: string[], mallocNote?: MallocNote): Promise<void> {
  const command = parseOrExit(args);
  if (command.kind !== "serve") {
    console.log(command.text);
    return;
  }
  const options = command.options;
  const logger = new Logger(options.logLevel);
  closeInspectorOnSigusr1((url, openMs) =>
    logger.child({ pid: Deno.pid }).warning(sigusr1Message(url, openMs))
  );
  if (mallocNote) logger.child({ pid: Deno.pid }).log(mallocNote.level, mallocNote.message);
  for (const warning of options.warnings ?? []) logger.child({ pid: Deno.pid }).warning(warning);
  if (options.pidFile !== undefined) exitIfPidFileInUse(options.pidFile);
  const server = await start(options, logger);
  if (options.pidFile !== undefined) writePidFile(options.pidFile, logger.child({ pid: Deno.pid }));
  server.ready.catch((error) => {
    logger.child({ app: options.app.name, pid: Deno.pid }).critical(
      `the application cannot start: ${error.message}. The server keeps running and returns 503 for its requests`,
    );
  });
  await handleSignals(server, logger.child({ pid: Deno.pid }));
}
