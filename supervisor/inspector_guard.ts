/**
 * Deno 2.9.2 and later start the V8 inspector server on 127.0.0.1:9229 when
 * the process receives SIGUSR1, whatever listeners the program has. Any local
 * user can then connect to it and run JavaScript with the permissions of the
 * process, which for the front means all of them. Deno installs its handler
 * 500 ms after the process starts. This module closes that server as soon as
 * it appears, unless it was already open at start (a developer who runs
 * wsgirun with --inspect keeps theirs).
 */

import inspector from "node:inspector";

/** How often to look for the inspector server after SIGUSR1, in milliseconds. */
const POLL_MS = 2;
/** How long after the signal to look for it. */
const WATCH_MS = 2000;

/**
 * Closes the inspector server that SIGUSR1 opens, and calls `onClosed` with
 * its URL and the milliseconds it was open at most. `onClosed` also gets
 * undefined when the server did not appear (another process uses the port).
 * Needs the `sys` permission for "inspector".
 */
export function closeInspectorOnSigusr1(
  onClosed: (url: string | undefined, openMs: number) => void,
): void {
  if (inspector.url() !== undefined) return;
  Deno.addSignalListener("SIGUSR1", () => {
    const signalledAt = performance.now();
    const timer = setInterval(() => {
      const url = inspector.url();
      const waited = performance.now() - signalledAt;
      if (url === undefined && waited < WATCH_MS) return;
      clearInterval(timer);
      if (url !== undefined) inspector.close();
      onClosed(url, Math.round(waited));
    }, POLL_MS);
  });
}

/** Returns the log line for SIGUSR1, after the debugger that it opened was closed. */
export function sigusr1Message(url: string | undefined, openMs: number): string {
  const debuggerState = url === undefined
    ? `Deno opened no debugger within ${WATCH_MS} ms (another process may use 127.0.0.1:9229)`
    : `Deno opened its debugger at ${url}, which was closed after ${openMs} ms`;
  return `SIGUSR1: ${debuggerState}. wsgirun does not act on SIGUSR1: send SIGHUP to reload`;
}
