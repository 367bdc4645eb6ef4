/**
 * Location of the isolate worker's entry module. The bundle build replaces
 * this module, because there the worker is a sibling file of the bundle.
 */
export const ISOLATE_WORKER_URL = new URL("../wasm/isolate_worker.ts", import.meta.url);
