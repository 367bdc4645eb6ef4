/**
 * Starts a real wsgirun server as a subprocess for tests and talks to it
 * over loopback.
 */

const ROOT = new URL("../../", import.meta.url).pathname;
const MAIN = ROOT + "main.ts";
const CONFIG = ROOT + "deno.json";
const decoder = new TextDecoder();

/**
 * Snapshot cache shared by every server the tests start, inside the
 * repository's ignored .cache folder, so a run builds each runtime snapshot
 * once and never touches the user's own cache.
 */
export const TEST_CACHE_DIR = ROOT + ".cache/test-snapshots";

export interface TestServer extends AsyncDisposable {
  /** "http://127.0.0.1:PORT" */
  origin: string;
  port: number;
  process: Deno.ChildProcess;
  /** Everything the server wrote to standard error so far (its log). */
  log(): string;
  /** Everything the server wrote to standard output so far (the access log). */
  output(): string;
  /** Resolves when a log line matching `pattern` appears, or rejects after `timeoutMs`. */
  waitForLog(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends SIGTERM and waits for the process to exit; returns its status. */
  stop(): Promise<Deno.CommandStatus>;
}

/** Arguments of `deno` that run the server with `args`, under --allow-all unless `permissions` are given. */
export function serverArgs(args: string[], permissions = ["--allow-all"]): string[] {
  return ["run", ...permissions, "--config", CONFIG, MAIN, ...args];
}

/** Absolute path of a file in the repository. */
export function repoPath(relative: string): string {
  return ROOT + relative;
}

/**
 * Runs `main.ts SCRIPT ARGS --port 0` and waits until the first isolate is
 * ready (so a test's first request does not include Pyodide's start).
 */
export async function startServer(
  script: string,
  args: string[] = [],
  options: {
    waitForReady?: boolean;
    timeoutMs?: number;
    env?: Record<string, string>;
    /** Deno permission flags in place of --allow-all. */
    permissions?: string[];
  } = {},
): Promise<TestServer> {
  const permissions = options.permissions ?? ["--allow-all"];
  const command = new Deno.Command(Deno.execPath(), {
    // An empty script leaves SCRIPT to a --config file among `args`.
    args: serverArgs([...(script ? [script] : []), "--port", "0", ...args], permissions),
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    env: { WSGIRUN_CACHE_DIR: TEST_CACHE_DIR, ...options.env },
  });
  const process = command.spawn();
  let stderr = "";
  let stdout = "";
  const waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];

  const checkWaiters = () => {
    for (const waiter of [...waiters]) {
      const match = stderr.match(waiter.pattern);
      if (match) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(match[0]);
      }
    }
  };
  const readAll = async (stream: ReadableStream<Uint8Array>, append: (text: string) => void) => {
    for await (const chunk of stream) append(decoder.decode(chunk, { stream: true }));
  };
  const stderrDone = readAll(process.stderr, (text) => {
    stderr += text;
    checkWaiters();
  });
  const stdoutDone = readAll(process.stdout, (text) => (stdout += text));

  const waitForLog = (pattern: RegExp, timeoutMs = 60_000) => {
    const existing = stderr.match(pattern);
    if (existing) return Promise.resolve(existing[0]);
    const { promise, resolve, reject } = Promise.withResolvers<string>();
    const waiter = { pattern, resolve };
    waiters.push(waiter);
    const timer = setTimeout(() => {
      waiters.splice(waiters.indexOf(waiter), 1);
      reject(
        new Error(`no log line matching ${pattern} within ${timeoutMs} ms; log so far:\n${stderr}`),
      );
    }, timeoutMs);
    return promise.finally(() => clearTimeout(timer));
  };

  let status: Promise<Deno.CommandStatus> | undefined;
  const stop = () => {
    if (!status) {
      try {
        process.kill("SIGTERM");
      } catch {
        // Already exited.
      }
      status = Promise.all([process.status, stderrDone, stdoutDone]).then(([s]) => s);
    }
    return status;
  };

  // A server that exits during startup fails the wait at once, not after the timeout.
  const exited = process.status.then((status) => {
    throw new Error(`the server exited with code ${status.code} during startup; log:\n${stderr}`);
  });
  exited.catch(() => {});
  const untilExit = <T>(wait: Promise<T>) => Promise.race([wait, exited]);

  try {
    const listening = await untilExit(
      waitForLog(/listening on https?:\/\/[^:]+:(\d+)/, options.timeoutMs),
    );
    const port = Number(listening.match(/:(\d+)/)![1]);
    const scheme = listening.includes("https://") ? "https" : "http";
    if (options.waitForReady ?? true) {
      await untilExit(waitForLog(/isolate ready/, options.timeoutMs));
    }
    return {
      origin: `${scheme}://127.0.0.1:${port}`,
      port,
      process,
      log: () => stderr,
      output: () => stdout,
      waitForLog,
      stop,
      [Symbol.asyncDispose]: async () => {
        await stop();
      },
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** Sends raw bytes over TCP and returns everything the server sends until it closes or goes quiet. */
export async function rawRequest(
  port: number,
  bytes: string | Uint8Array,
  options: { quietMs?: number; timeoutMs?: number } = {},
): Promise<string> {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  const data = typeof bytes === "string" ? new TextEncoder().encode(bytes) : bytes;
  await connection.write(data);
  const chunks: Uint8Array[] = [];
  const buffer = new Uint8Array(65536);
  const quietMs = options.quietMs ?? 500;
  const deadline = Date.now() + (options.timeoutMs ?? 15_000);
  try {
    while (Date.now() < deadline) {
      const read = connection.read(buffer);
      let timer: ReturnType<typeof setTimeout> | undefined;
      const quiet = new Promise<"quiet">((resolve) => {
        timer = setTimeout(resolve, quietMs, "quiet");
      });
      const result = await Promise.race([read, quiet]);
      clearTimeout(timer);
      if (result === "quiet") {
        // Leave the pending read to fail when the connection closes below.
        read.catch(() => {});
        break;
      }
      if (result === null) break;
      chunks.push(buffer.slice(0, result));
    }
  } finally {
    try {
      connection.close();
    } catch {
      // Already closed by the server.
    }
  }
  let text = "";
  for (const chunk of chunks) text += String.fromCharCode(...chunk);
  return text;
}

/** Returns whether process `pid` has a listening TCP socket on `port` (IPv4 or IPv6). */
export function listensOn(pid: number, port: number): boolean {
  const inodes = new Set<string>();
  for (const entry of Deno.readDirSync(`/proc/${pid}/fd`)) {
    try {
      const target = Deno.readLinkSync(`/proc/${pid}/fd/${entry.name}`);
      const socket = /^socket:\[(\d+)\]$/.exec(target);
      if (socket) inodes.add(socket[1]);
    } catch {
      // The descriptor was closed while it was being read.
    }
  }
  const listening = "0A";
  const portHex = port.toString(16).toUpperCase().padStart(4, "0");
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    for (const line of Deno.readTextFileSync(table).split("\n").slice(1)) {
      const fields = line.trim().split(/\s+/);
      if (fields.length < 10) continue;
      if (fields[1].endsWith(`:${portHex}`) && fields[3] === listening && inodes.has(fields[9])) {
        return true;
      }
    }
  }
  return false;
}
