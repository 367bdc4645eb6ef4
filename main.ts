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
  checkFrontPermissions();
  // Before the front's modules load: see supervisor/malloc.ts.
  const { fixMmapThreshold } = await import("./supervisor/malloc.ts");
  const mallocNote = fixMmapThreshold();
  const { runFront } = await import("./runtime/front_main.ts");
  await runFront(Deno.args, mallocNote);
}

/**
 * Exits with a usage error unless the server has the permissions it needs:
 * it reads the applications' files, listens, starts daemon processes and
 * reads the environment. FFI is optional (see supervisor/malloc.ts).
 */
function checkFrontPermissions(): void {
  const names = ["read", "write", "net", "env", "run", "sys"] as const;
  const missing = names.filter((name) => Deno.permissions.querySync({ name }).state !== "granted");
  if (missing.length === 0 || Deno.args.includes("--help") || Deno.args.includes("-h")) return;
  console.error(
    `wsgirun: missing Deno permissions: ${missing.join(", ")}; ` +
      "start it with `deno run --allow-all` (see README.md)",
  );
  Deno.exit(2);
}
