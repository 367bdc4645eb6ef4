/**
 * Host folders that every isolate may read besides Pyodide's and the
 * application's, because host_modules.ts shows them inside the isolate.
 */

/** Folder in which Python's zoneinfo and Debian's pytz look for the time zone database. */
export const ZONEINFO_FOLDER = "/usr/share/zoneinfo";

/** Returns the real paths of the host's shared data folders that exist on this machine. */
export function hostReadPaths(): string[] {
  try {
    return [Deno.realPathSync(ZONEINFO_FOLDER)];
  } catch {
    // No time zone database on this host: zoneinfo then finds no zones.
    return [];
  }
}
