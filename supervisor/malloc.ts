/**
 * Keeps freed buffers of this process from staying resident in glibc's
 * malloc arenas.
 *
 * glibc serves a large allocation with an mmap of its own and returns it to
 * the system when it is freed. It also raises the size limit for that to the
 * size of each such block freed, up to 32 MiB. An isolate's start reads
 * Pyodide's wasm file, its standard library and the memory snapshot into
 * buffers of several megabytes that are freed soon after. After the first
 * of them, buffers up to that size come from the arenas of the threads,
 * which keep their pages when the buffers are freed. Fixing the limit turns
 * that growth off.
 *
 * Measured with hello world and a warm snapshot cache (Deno 2.9.6, glibc
 * 2.36, 2 cores), 3 s after the last isolate was ready. The server's resident
 * memory fell from 232–245 MB to 188–191 MB with 1 isolate, from 330–331 MB
 * to 254–258 MB with 2, and from 473–478 MB to 371–372 MB with 4.
 */

/** Allocations from this size up get an mmap of their own (glibc's default start value). */
export const MMAP_THRESHOLD_BYTES = 128 * 1024;

/** The variable through which glibc takes the same setting at the start of a process. */
export const MMAP_THRESHOLD_VARIABLE = "MALLOC_MMAP_THRESHOLD_";

/** mallopt()'s parameter number for the mmap threshold, from glibc's malloc.h. */
const M_MMAP_THRESHOLD = -3;

/** The largest threshold glibc accepts on 64-bit systems (half its HEAP_MAX_SIZE). */
const MAX_THRESHOLD_BYTES = 32 * 1024 * 1024;

/**
 * Checks that glibc reads `value` as the threshold the user meant. glibc
 * 2.36 takes "", "abc" or "1e6" as 0, which maps every allocation on its own
 * and made isolate starts about 6 times slower, and ignores values above the
 * maximum.
 */
function isValidThreshold(value: string): boolean {
  return /^\d+$/.test(value) && Number(value) <= MAX_THRESHOLD_BYTES;
}

/** Checks whether GLIBC_TUNABLES sets the threshold, which glibc also reads at start. */
function tunablesSetThreshold(tunables = Deno.env.get("GLIBC_TUNABLES")): boolean {
  return tunables?.includes("glibc.malloc.mmap_threshold=") ?? false;
}

/**
 * Returns the variables that give a daemon process the same malloc setting: the
 * user's GLIBC_TUNABLES, and the user's valid MALLOC_MMAP_THRESHOLD_ or
 * MMAP_THRESHOLD_BYTES unless GLIBC_TUNABLES sets the threshold.
 */
export function daemonMallocEnvironment(): Record<string, string> {
  const env: Record<string, string> = {};
  const tunables = Deno.env.get("GLIBC_TUNABLES");
  if (tunables !== undefined) env.GLIBC_TUNABLES = tunables;
  if (tunablesSetThreshold(tunables)) return env;
  const user = Deno.env.get(MMAP_THRESHOLD_VARIABLE);
  env[MMAP_THRESHOLD_VARIABLE] = user !== undefined && isValidThreshold(user)
    ? user
    : String(MMAP_THRESHOLD_BYTES);
  return env;
}

/** A log line that reports the outcome of fixMmapThreshold(). */
export interface MallocNote {
  level: "debug" | "warning";
  message: string;
}

/**
 * Fixes the mmap threshold of this process through glibc's mallopt(), unless
 * the user set a valid MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES sets it. Call
 * it first thing: memory the arenas kept before it stays theirs.
 */
export function fixMmapThreshold(): MallocNote {
  if (Deno.build.os !== "linux") {
    return { level: "debug", message: "malloc: mmap threshold left as it is on this system" };
  }
  if (tunablesSetThreshold()) {
    return {
      level: "debug",
      message: "malloc: GLIBC_TUNABLES sets glibc.malloc.mmap_threshold, keeping it",
    };
  }
  const user = Deno.env.get(MMAP_THRESHOLD_VARIABLE);
  if (user !== undefined && isValidThreshold(user)) {
    return { level: "debug", message: `malloc: ${MMAP_THRESHOLD_VARIABLE} is set, keeping it` };
  }
  const fixed = fixThroughLibc();
  if (user === undefined) return fixed;
  const invalid =
    `${MMAP_THRESHOLD_VARIABLE}=${
      JSON.stringify(user)
    } is invalid: glibc needs a number of bytes ` +
    `from 0 to ${MAX_THRESHOLD_BYTES}`;
  if (fixed.level === "debug") {
    return {
      level: "warning",
      message: `malloc: ${invalid}; ${fixed.message.replace("malloc: ", "")} instead`,
    };
  }
  return {
    level: "warning",
    message:
      `malloc: ${invalid}, and without FFI permission the server cannot replace it, so isolates ` +
      `start several times slower: correct or unset it, or run the server with --allow-ffi`,
  };
}

/** Returns the warning for a server that may not call mallopt(), with `detail` after its first clause. */
function withoutFfi(detail = ""): MallocNote {
  return {
    level: "warning",
    message: `malloc: cannot fix the mmap threshold without FFI permission${detail}; ` +
      `the server may use about 100 MB more memory: run it with --allow-ffi, ` +
      `or set ${MMAP_THRESHOLD_VARIABLE}=${MMAP_THRESHOLD_BYTES}`,
  };
}

function fixThroughLibc(): MallocNote {
  // Without the permission dlopen() would prompt on a terminal instead of failing.
  if (Deno.permissions.querySync({ name: "ffi" }).state !== "granted") return withoutFfi();
  let libc:
    | Deno.DynamicLibrary<{ mallopt: { parameters: ["i32", "i32"]; result: "i32" } }>
    | undefined;
  try {
    libc = Deno.dlopen("libc.so.6", { mallopt: { parameters: ["i32", "i32"], result: "i32" } });
    if (libc.symbols.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) !== 1) {
      throw new Error("mallopt() failed");
    }
    return {
      level: "debug",
      message: `malloc: mmap threshold fixed at ${MMAP_THRESHOLD_BYTES} bytes`,
    };
  } catch (error) {
    const reason = error instanceof Error ? error.message : String(error);
    if (error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied) {
      return withoutFfi(` (${reason})`);
    }
    // Not glibc: mallopt() with this parameter is glibc's own.
    return { level: "debug", message: `malloc: mmap threshold left as it is: ${reason}` };
  } finally {
    libc?.close();
  }
}
