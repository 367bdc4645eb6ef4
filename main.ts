/**
 * wsgirun: serves a Python WSGI application from Pyodide isolates.
 *
 * Run `deno task wsgirun --help` for the options. Startup goes in stages:
 * parse the command line, start the isolate pool and the listener, then wait
 * for a signal to stop.
 */

import { formatUsageError, parseCommandLine, UsageError } from "./runtime/cli.ts";
import { type RunningServer, startServer } from "./runtime/server.ts";
import { Logger } from "./supervisor/log.ts";

/** Exit status for invalid command lines, as in most Unix tools. */
const EXIT_USAGE = 2;

function parseOrExit(args: string[]) {
  try {
    return parseCommandLine(args, { cwd: Deno.cwd(), cpus: navigator.hardwareConcurrency });
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    console.error(formatUsageError(error));
    Deno.exit(EXIT_USAGE);
  }
}

/** Stops gracefully on SIGINT or SIGTERM; a second signal stops at once. */
function stopOnSignals(server: RunningServer): void {
  let stopping = false;
  const stop = async () => {
    if (stopping) Deno.exit(1);
    stopping = true;
    await server.shutdown();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
}

async function main(args: string[]): Promise<void> {
  const command = parseOrExit(args);
  if (command.kind !== "serve") {
    console.log(command.text);
    return;
  }
  const options = command.options;
  const logger = new Logger(options.logLevel);
  const server = await startServer(options, logger);
  stopOnSignals(server);
  server.ready.catch((error) => {
    logger.critical(`the application cannot start: ${error.message}`);
  });
  await server.finished;
}

if (import.meta.main) {
  await main(Deno.args);
}
