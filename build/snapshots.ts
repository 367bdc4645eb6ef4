/**
 * Builds the runtime snapshot of each Python version into dist/snapshots,
 * where the server looks before its cache folder. `deno task compile` runs
 * this first and embeds the folder, so a compiled binary starts its
 * isolates from a snapshot on its very first run.
 */

import { PYTHON_VERSIONS } from "../supervisor/app_spec.ts";
import { pyodideFolder } from "../supervisor/isolate.ts";
import { Logger } from "../supervisor/log.ts";
import { writeRuntimeSnapshot } from "../supervisor/snapshots.ts";

const folder = Deno.args[0] ?? new URL("../dist/snapshots", import.meta.url).pathname;
const logger = new Logger("info");

await Deno.remove(folder, { recursive: true }).catch(() => {});
for (const python of PYTHON_VERSIONS) {
  const path = await writeRuntimeSnapshot(python, pyodideFolder(python), folder, logger);
  logger.info(`built the Python ${python} runtime snapshot: ${path}`);
}
