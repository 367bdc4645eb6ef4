/**
 * Locations of the program's own files that the bundle build moves: there
 * the worker is a sibling file of the bundle, and shipped snapshots sit in a
 * `snapshots` folder beside it. The bundle build replaces this module.
 */
export const ISOLATE_WORKER_URL = new URL("../wasm/isolate_worker.ts", import.meta.url);

/**
 * Runtime snapshots shipped with the program. `deno task compile` builds
 * them into dist/snapshots and embeds that folder in the binary. A run from
 * source ignores the folder, so a stale build never shadows the cache.
 */
export const SHIPPED_SNAPSHOTS_URL: URL | null = Deno.build.standalone
  ? new URL("../dist/snapshots/", import.meta.url)
  : null;
