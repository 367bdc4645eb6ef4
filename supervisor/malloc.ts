/**
 * Keeps freed buffers of this process from staying resident in glibc's
 * malloc arenas.
 *
 * glibc serves a large allocation with an mmap of its own and returns it to
 * the system when it is freed, but it raises the size limit for that to the
 * size of each such block freed, up to 32 MiB. An isolate's start reads
 * Pyodide's wasm file, its standard library and the memory snapshot into
 * buffers of several megabytes that are freed soon after. After the first
 * of them, buffers up to that size come from the arenas of the threads,
 * which keep their pages when the buffers are freed. Fixing the limit turns
 * that growth off. Measured with hello world and a warm snapshot cache
 * (Deno 2.9.6, glibc 2.36, 2 cores), 3 s after the last isolate was ready:
 * the server's resident memory went from 232 to 245 MB down to 188 to 191
 * MB with 1 isolate, from 331 to 256 MB with 2, and from 473 to 372 MB with 4.
 */

/** Allocations from this size up get an mmap of their own (glibc's default start value). */
export const MMAP_THRESHOLD_BYTES = 128 * 1024;

/** The variable through which glibc takes the same setting at the start of a process. */
export const MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_";

/** mallopt()'s parameter number for the mmap threshold, from glibc's malloc.h. */
const M_MMAP_THRESHOLD = -3;

/** What fixMmapThreshold() did, for the log. */
export interface MallocNote {
  level: "debug" | "warning";
  message: string;
}

/**
 * Fixes the mmap threshold of this process through glibc's mallopt(), unless
 * the user set MALLOC_MMAP_THRESHOLD_ already. Call it first thing: memory the
 * arenas kept before it stays theirs.
 */
export function fixMmapThreshold(): MallocNote {
  if (Deno.build.os !== "linux") return { level: "debug", message: "malloc: mmap threshold left as it is on this system" };
  if (Deno.env.get(MMAP_THRESHOLD_VARIABLE) !== undefined) {
    return { level: "debug", message: `malloc: ${MMAP_THRESHOLD_VARIABLE} is set, keeping it` };
  }
  let libc: Deno.DynamicLibrary<{ mallopt: { parameters: ["i32", "i32"]; result: "i32" } }> | undefined;
  try {
    libc = Deno.dlopen("libc.so.6", { mallopt: { parameters: ["i32", "i32"], result: "i32" } });
    if (libc.symbols.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) !== 1) throw new Error("mallopt() failed");
    return { level: "debug", message: `malloc: mmap threshold fixed at ${MMAP_THRESHOLD_BYTES} bytes` };
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      return {
        level: "warning",
        message: `malloc: cannot fix the mmap threshold without FFI permission (${reason}); ` +
          `the server may use about 100 MB more memory: run it with --allow-ffi, ` +
          `or set ${MMAP_THRESHOLD_VARIABLE}=${MMAP_THRESHOLD_BYTES}`,
      };
    }
    // Not glibc: mallopt() with this parameter is glibc's own.
    return { level: "debug", message: `malloc: mmap threshold left as it is: ${reason}` };
  } finally {
    libc?.close();
  }
}
