/**
 * wsgirun: serves Python WSGI applications from Pyodide isolates.
 *
 * Run `deno task wsgirun --help` for the options. The same program is also
 * the entry of a daemon process: the server starts it again with the
 * internal DAEMON_SUBCOMMAND argument. The two entries are imported lazily,
 * so a daemon process loads none of the front's modules.
 */

import { DAEMON_SUBCOMMAND } from "./supervisor/daemon_protocol.ts";

if (import.meta.main) {
  if (Deno.args[0] === DAEMON_SUBCOMMAND) {
    const { runDaemon } = await import("./supervisor/daemon_main.ts");
    Deno.exit(await runDaemon());
  }
  // Before the front's modules load: see supervisor/malloc.ts.
  const { fixMmapThreshold } = await import("./supervisor/malloc.ts");
  const mallocNote = fixMmapThreshold();
  const { runFront } = await import("./runtime/front_main.ts");
  await runFront(Deno.args, mallocNote);
}
