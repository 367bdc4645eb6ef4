/**
 * Daemon mode: process groups started with --daemon, tested with real
 * processes, real signals and real HTTP over loopback.
 *
 * The tests run as root, so every group runs as the user nobody, which also
 * checks that a daemon with dropped privileges can load the program,
 * Pyodide and its snapshots.
 *
 * One server runs most cases as steps, because each start loads Pyodide:
 * - SCRIPT (a copy of fixtures/daemon_site, so touching it changes no
 *   repository file) in group "site": 2 processes, Python 3.14;
 * - fixtures/daemon_other at /other in group "other": Python 3.12;
 * - the same file at /embedded, embedded in the server process.
 * The streamed upload and download move 1 GiB each, the size the memory
 * target is set for.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { parseCommandLine, UsageError } from "../runtime/cli.ts";
import type { ServerOptions } from "../runtime/options.ts";
import { DaemonConfigError, resolveIdentity } from "../supervisor/daemon_command.ts";
import {
  DAEMON_FRAMES,
  decodeRequest,
  decodeStart,
  encodeFrame,
  encodeRequest,
  encodeStart,
  Frame,
  FRONT_FRAMES,
  readFrames,
} from "../supervisor/daemon_protocol.ts";
import { DaemonSpecError, defaultGroupSpec, parseDaemonSpec } from "../supervisor/daemon_spec.ts";
import { replacedToRetire } from "../supervisor/daemon_group.ts";
import { listensOn, repoPath, serverArgs, startServer, type TestServer } from "./helpers/server.ts";
import { peakResident, residentBytes, statusField, uploadGenerated } from "./helpers/transfer.ts";
import { countMatches, delay, runLoad, waitForCount } from "./helpers/load.ts";

const SITE_FIXTURE = repoPath("tests/fixtures/daemon_site");
const OTHER_SCRIPT = repoPath("tests/fixtures/daemon_other/app.wsgi");
const BROKEN_SCRIPT = repoPath("tests/fixtures/daemon_broken/app.wsgi");
const HOME_DIR = repoPath("tests/fixtures/daemon_home");
const NOBODY = 65534;
const MiB = 1024 * 1024;
const TRANSFER_BYTES = 1024 * MiB;
/** Size of the upload sent with chunked transfer coding, in pieces of CHUNKED_PIECE_BYTES. */
const CHUNKED_BYTES = 256 * MiB;
const CHUNKED_PIECE_BYTES = 16 * 1024;
/**
 * Rate at which the chunked upload is sent. Deno 2.9.6's server buffers a
 * chunked body without limit once the client sends faster than the handler
 * reads, so an unpaced client tests Deno, not wsgirun (see the NOTE in
 * daemon_process.ts).
 */
const CHUNKED_BYTES_PER_SECOND = 32 * MiB;
/** Growth of a process's resident memory that a streamed transfer may cause. */
const RSS_GROWTH_LIMIT = 64 * MiB;

// ---------------------------------------------------------------------------
// Helpers

/** Asserts that no process of a transfer (the front first, then daemons) grew by RSS_GROWTH_LIMIT or more. */
function assertBoundedGrowth(pids: number[], before: number[], peaks: number[]): void {
  pids.forEach((pid, index) => {
    const growth = peaks[index] - before[index];
    const role = index === 0 ? "the front" : "a daemon process";
    assert.ok(
      growth < RSS_GROWTH_LIMIT,
      `${role} (pid ${pid}) grew by ${Math.round(growth / MiB)} MiB`,
    );
  });
}

/** Copies a fixture folder to a temporary folder that the user nobody can read. */
async function copyFixture(source: string): Promise<string> {
  const folder = await Deno.realPath(await Deno.makeTempDir({ prefix: "wsgirun_daemon_test_" }));
  await Deno.chmod(folder, 0o755);
  for await (const entry of Deno.readDir(source)) {
    if (entry.isFile) await Deno.copyFile(join(source, entry.name), join(folder, entry.name));
  }
  return folder;
}

/** Returns the pids of the server's daemon processes, read from /proc. */
function daemonPids(server: TestServer): number[] {
  const pids: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const parent = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (parent !== server.process.pid) continue;
      const commandLine = Deno.readTextFileSync(`/proc/${entry.name}/cmdline`);
      if (commandLine.includes("__wsgirun_daemon")) pids.push(Number(entry.name));
    } catch {
      // The process exited while it was being read.
    }
  }
  return pids;
}

/** Returns the daemon pid that served a request, from its id in the daemon, "FRONT-ID@PID". */
function servingPid(requestId: string): number {
  return Number(requestId.split("@")[1]);
}

/**
 * Sends small uploads before a transfer is measured. They let each
 * interpreter's wasm heap grow to its working size (wasm memory never
 * shrinks), and they start the spare isolate that a busy pool adds, which
 * the group retires after 2 s idle. Two uploads run at once, so that both
 * processes get one: the measured transfer may go to either. Growth after
 * that would be buffering.
 */
async function warmUpTransfers(port: number): Promise<void> {
  for (let i = 0; i < 2; i++) {
    const uploads = [0, 1].map(() => uploadGenerated(port, "/do/upload", 16 * MiB));
    for (const answer of await Promise.all(uploads)) assert.equal(answer, String(16 * MiB));
  }
}

/**
 * Runs `transfer` after a warm-up and asserts that no process grew by
 * RSS_GROWTH_LIMIT or more. A new isolate (about 70 MB) is not buffering:
 * when one started during the transfer, for example a spare after an idle
 * one retired, the transfer runs again, up to three times, and only the
 * last run counts.
 */
async function assertTransferBounded(
  server: TestServer,
  transfer: () => Promise<void>,
): Promise<void> {
  const attempts = 3;
  for (let attempt = 1; attempt <= attempts; attempt++) {
    await warmUpTransfers(server.port);
    const pids = transferPids(server);
    const before = pids.map(residentBytes);
    const logStart = server.log().length;
    const done = transfer();
    const peaks = await peakResident(pids, done);
    await done;
    // An isolate that started near the end of the transfer logs its ready
    // line later, and a daemon's lines pass through the front.
    await delay(1000);
    if (attempt < attempts && /isolate ready/.test(server.log().slice(logStart))) continue;
    assertBoundedGrowth(pids, before, peaks);
    return;
  }
}

/** Returns the front's pid and the pids of the group "site", which serve the transfers. */
function transferPids(server: TestServer): number[] {
  const site = daemonPids(server).filter((pid) =>
    Deno.readTextFileSync(`/proc/${pid}/cmdline`).includes("(wsgi:site)")
  );
  return [server.process.pid, ...site];
}

async function getText(url: string): Promise<{ status: number; body: string }> {
  const response = await fetch(url);
  return { status: response.status, body: await response.text() };
}

const CRC_TABLE = Uint32Array.from({ length: 256 }, (_, index) => {
  let value = index;
  for (let bit = 0; bit < 8; bit++) value = value & 1 ? 0xedb88320 ^ (value >>> 1) : value >>> 1;
  return value;
});

/** Continues the CRC-32 (the one zlib.crc32 computes) of earlier bytes over `bytes`. */
function crc32(bytes: Uint8Array, previous = 0): number {
  let crc = ~previous;
  for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return ~crc >>> 0;
}

/**
 * POSTs `size` bytes with chunked transfer coding: a stream body whose
 * pieces of `pieceBytes` each start with their index, sent at no more than
 * `bytesPerSecond`. Returns the response body and the CRC-32 of what was sent.
 */
async function uploadChunked(
  url: string,
  size: number,
  pieceBytes: number,
  bytesPerSecond: number,
): Promise<{ status: number; body: string; crc: number }> {
  const started = performance.now();
  let sent = 0;
  let crc = 0;
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (sent >= size) {
        controller.close();
        return;
      }
      const wait = started + (sent / bytesPerSecond) * 1000 - performance.now();
      if (wait > 0) await delay(wait);
      const piece = new Uint8Array(Math.min(pieceBytes, size - sent)).fill(0x62);
      new DataView(piece.buffer).setUint32(0, sent / pieceBytes);
      crc = crc32(piece, crc);
      sent += piece.length;
      controller.enqueue(piece);
    },
  });
  const response = await fetch(url, { method: "POST", body });
  return { status: response.status, body: await response.text(), crc };
}

function usageError(args: string[], cwd: string): string {
  try {
    parseCommandLine(args, { cwd, cpus: 2 });
  } catch (error) {
    if (error instanceof UsageError) return error.message;
    throw error;
  }
  assert.fail(`expected a UsageError for ${args.join(" ")}`);
}

function serveOptions(args: string[], cwd: string): ServerOptions {
  const result = parseCommandLine(args, { cwd, cpus: 2 });
  if (result.kind !== "serve") throw new Error(`expected serve options for ${args.join(" ")}`);
  return result.options;
}

// ---------------------------------------------------------------------------
// Group definitions

Deno.test("parseDaemonSpec defaults", () => {
  const spec = parseDaemonSpec("group=site1", "/");

  assert.deepEqual(spec, defaultGroupSpec("site1"));
  assert.equal(spec.processes, 1);
  assert.equal(spec.threads, 15);
  assert.equal(spec.displayName, "(wsgi:site1)");
  assert.equal(spec.queueTimeoutMs, 45_000);
  assert.equal(spec.requestTimeoutMs, 60_000);
  assert.equal(spec.gracefulTimeoutMs, 15_000);
  assert.equal(spec.shutdownTimeoutMs, 5_000);
  assert.equal(spec.socketTimeoutMs, 60_000);
});

Deno.test("replaced processes retire oldest first", () => {
  const process = (name: string, state: string, startedAt: number) => ({ name, state, startedAt });
  const replaced = [
    process("oldest", "ready", 1),
    process("starting", "starting", 4),
    process("newest", "ready", 3),
    process("middle", "ready", 2),
  ];
  const names = (keep: number) => replacedToRetire(replaced, keep).map((p) => p.name);
  // The newest ready ones keep serving; the oldest have served the most.
  assert.deepEqual(names(2), ["oldest", "starting"]);
  assert.deepEqual(names(1), ["oldest", "starting", "middle"]);
  assert.deepEqual(names(0), ["oldest", "starting", "newest", "middle"]);
  assert.deepEqual(names(5), ["starting"]);
});

Deno.test("parseDaemonSpec every key", () => {
  const spec = parseDaemonSpec(
    "group=site1,processes=2,threads=4,user=nobody,group=nogroup,home=.,python-path=.,python=3.12," +
      "display-name=%{GROUP}-x,maximum-requests=100,memory-limit=512M,memory-max=1G,restart-interval=3600,inactivity-timeout=2.5," +
      "request-timeout=30,queue-timeout=10,startup-timeout=20,graceful-timeout=7,shutdown-timeout=3," +
      "socket-timeout=9," +
      "env=A=1,env=B=x=y,allow-net=127.0.0.1:5432,allow-net=[::1]:80,allow-write=.",
    HOME_DIR,
  );

  assert.equal(spec.name, "site1");
  assert.equal(spec.processes, 2);
  assert.equal(spec.threads, 4);
  assert.equal(spec.user, "nobody");
  assert.equal(spec.group, "nogroup");
  assert.equal(spec.home, HOME_DIR);
  assert.deepEqual(spec.pythonPath, [HOME_DIR]);
  assert.equal(spec.python, "3.12");
  assert.equal(spec.displayName, "(wsgi:site1)-x");
  assert.equal(spec.maximumRequests, 100);
  assert.equal(spec.memoryLimitBytes, 512 * 1024 * 1024);
  assert.equal(spec.memoryMaxBytes, 1024 * 1024 * 1024);
  assert.equal(spec.restartIntervalMs, 3_600_000);
  assert.equal(spec.inactivityTimeoutMs, 2_500);
  assert.equal(spec.requestTimeoutMs, 30_000);
  assert.equal(spec.queueTimeoutMs, 10_000);
  assert.equal(spec.startupTimeoutMs, 20_000);
  assert.equal(spec.gracefulTimeoutMs, 7_000);
  assert.equal(spec.socketTimeoutMs, 9_000);
  assert.equal(spec.shutdownTimeoutMs, 3_000);
  assert.deepEqual(spec.environment, { A: "1", B: "x=y" });
  assert.deepEqual(spec.allowNet, ["127.0.0.1:5432", "[::1]:80"]);
  assert.deepEqual(spec.allowWrite, [HOME_DIR]);
});

Deno.test("parseDaemonSpec write alias", () => {
  const spec = parseDaemonSpec("group=site1,write=.,allow-write=.", HOME_DIR);

  assert.deepEqual(spec.allowWrite, [HOME_DIR, HOME_DIR]);
});

Deno.test("parseDaemonSpec bare group name", () => {
  const spec = parseDaemonSpec("site1,processes=3", "/");

  assert.equal(spec.name, "site1");
  assert.equal(spec.processes, 3);
  assert.equal(spec.group, undefined);
});

Deno.test("parseDaemonSpec rejects invalid input", () => {
  const cases: [string, RegExp][] = [
    ["processes=2", /first item must name the group as group=NAME, not 'processes=2'/],
    ["group=-x", /invalid group name '-x'/],
    ["group=a,colour=red", /unknown key 'colour' \(accepted keys: processes, threads, /],
    ["group=a,threads=0", /invalid value for threads: '0' \(expected an integer from 1 to 256\)/],
    ["group=a,threads=2,threads=3", /key 'threads' is given twice/],
    ["group=a,processes=x", /invalid value for processes: 'x'/],
    ["group=a,python=3.11", /invalid value for python: '3.11' \(expected 3.12 or 3.14\)/],
    ["group=a,queue-timeout=1m", /invalid value for queue-timeout: '1m' \(expected seconds from 0/],
    [
      "group=a,memory-limit=1M",
      /invalid value for memory-limit: '1M' \(expected 0 \(off\), or a size from 32M to 4G/,
    ],
    [
      "group=a,memory-max=2M",
      /invalid value for memory-max: '2M' \(expected 0 \(off\), or a size from 32M to 4G/,
    ],
    [
      "group=a,memory-limit=1G,memory-max=512M",
      /memory-limit \(1073741824 bytes\) is not below memory-max \(536870912 bytes\)/,
    ],
    ["group=a,env=1A=2", /invalid value for env: '1A=2' \(expected NAME=VALUE/],
    ["group=a,allow-net=host:99999", /invalid value for allow-net: 'host:99999'/],
    [
      "group=a,allow-net=127.0.0.1:0",
      /invalid value for allow-net: '127\.0\.0\.1:0' \(expected .*the port must be a number from 1 to 65535\)/,
    ],
    [
      "group=a,home=/no/such/folder",
      /invalid value for home: '\/no\/such\/folder' \(expected an existing directory/,
    ],
    ["group=a,user=x y", /invalid value for user: 'x y'/],
    ["group=a,threads", /invalid item 'threads' \(expected key=value, such as processes=2\)$/],
    [
      "group=a,env=A=1,2",
      /invalid item '2' \(expected key=value, such as processes=2\); a comma ends each value, so 'env=A=1' ended before ',2': a value cannot contain a comma \(give env=NAME alone/,
    ],
    [
      "group=a,startup-timeout=0",
      /invalid value for startup-timeout: '0' \(expected seconds above 0/,
    ],
    ["group=a,home=", /invalid value for home: '' \(expected an existing directory, not an empty/],
    ["group=a,allow-write=", /invalid value for allow-write: '' \(expected an existing directory/],
    ["group=a,python-path=/tmp:", /invalid value for python-path: '' \(expected an existing/],
  ];
  for (const [text, pattern] of cases) {
    assert.throws(() => parseDaemonSpec(text, "/"), (error: Error) => {
      assert.ok(error instanceof DaemonSpecError, text);
      assert.match(error.message, pattern, text);
      return true;
    });
  }
});

Deno.test("parseDaemonSpec env NAME passes a variable", () => {
  const variables: Record<string, string> = { DB_URL: "postgres://a,b@host/db" };
  const read = (name: string) => variables[name];
  const spec = parseDaemonSpec("group=a,env=DB_URL,env=MODE=x", "/", read);
  assert.deepEqual(spec.environment, { DB_URL: "postgres://a,b@host/db", MODE: "x" });

  assert.throws(() => parseDaemonSpec("group=a,env=API_KEY", "/", read), (error: Error) => {
    assert.match(error.message, /invalid value for env: 'API_KEY' \(expected .*API_KEY is not set/);
    return true;
  });
});

// ---------------------------------------------------------------------------
// Mounts and groups on the command line

Deno.test("parseCommandLine one group takes the script", () => {
  const options = serveOptions([OTHER_SCRIPT, "--daemon", "group=site1,user=nobody"], "/");

  assert.equal(options.processGroup, "site1");
  assert.equal(options.daemonGroups.length, 1);
  assert.deepEqual(options.mounts, []);
});

Deno.test("parseCommandLine embedded options in daemon mode", () => {
  const daemonOnly = serveOptions(
    [
      OTHER_SCRIPT,
      "--daemon",
      "group=site1,user=nobody",
      "--threads",
      "4",
      "--memory-limit",
      "512M",
    ],
    "/",
  );
  const mixed = serveOptions(
    [
      OTHER_SCRIPT,
      "--daemon",
      "group=site1,user=nobody",
      "--process-group",
      "site1",
      "--mount",
      "/e",
      OTHER_SCRIPT,
      "--threads",
      "4",
    ],
    "/",
  );

  assert.equal(daemonOnly.warnings?.length, 1);
  assert.match(
    daemonOnly.warnings![0],
    /^--threads, --memory-limit set embedded pools only, and every application here runs in a daemon group/,
  );
  // An embedded mount uses them.
  assert.equal(mixed.warnings, undefined);
});

Deno.test("parseCommandLine mounts mixed", () => {
  const options = serveOptions([
    OTHER_SCRIPT,
    "--daemon",
    "group=a,user=nobody",
    "--daemon",
    "group=b,user=nobody,python=3.12",
    "--process-group",
    "a",
    "--mount",
    "/b",
    `${BROKEN_SCRIPT}:process-group=b`,
    "--mount",
    "/embedded/",
    OTHER_SCRIPT,
  ], "/");

  assert.equal(options.processGroup, "a");
  assert.equal(options.mounts.length, 2);
  assert.equal(options.mounts[0].mountPoint, "/b");
  assert.equal(options.mounts[0].processGroup, "b");
  assert.equal(options.mounts[0].app.scriptPath, BROKEN_SCRIPT);
  assert.equal(options.mounts[1].mountPoint, "/embedded");
  assert.equal(options.mounts[1].processGroup, undefined);
});

Deno.test("parseCommandLine rejects group mistakes", () => {
  const daemon = ["--daemon", "group=a,user=nobody"];
  assert.match(
    usageError([OTHER_SCRIPT, "--daemon", "group=a,threads=x"], "/"),
    /^invalid --daemon 'group=a,threads=x': invalid value for threads: 'x'/,
  );
  assert.match(
    usageError([OTHER_SCRIPT, ...daemon, "--process-group", "b"], "/"),
    /process group 'b' is not defined \(define it with --daemon group=b,\.\.\.; defined groups: a\)/,
  );
  assert.match(
    usageError([OTHER_SCRIPT, ...daemon, "--mount", "/x", BROKEN_SCRIPT], "/"),
    /group 'a' is not used by any mount/,
  );
  assert.match(
    usageError([
      OTHER_SCRIPT,
      ...daemon,
      "--process-group",
      "a",
      "--mount",
      "/x",
      `${BROKEN_SCRIPT}:process-group=a`,
    ], "/"),
    /group 'a' would run .* and .*; a group runs one application/,
  );
  assert.match(
    usageError([OTHER_SCRIPT, ...daemon, ...daemon], "/"),
    /group 'a' is defined by more than one --daemon/,
  );
  assert.match(
    usageError([OTHER_SCRIPT, "--mount", "/", BROKEN_SCRIPT], "/"),
    /two applications are mounted at '\/'/,
  );
});

Deno.test("resolveIdentity as root", () => {
  const nobody = resolveIdentity(parseDaemonSpec("group=a,user=nobody", "/"), 0, 0);
  assert.equal(nobody.uid, NOBODY);
  assert.equal(nobody.gid, NOBODY);

  const cases: [string, RegExp][] = [
    ["group=a", /group 'a' would run as root: add user=NAME/],
    ["group=a,user=root", /user=root is root \(a daemon never runs as root/],
    ["group=a,user=0", /user=0 is root/],
    ["group=a,user=nobody,group=root", /root's group \(gid 0\)/],
    ["group=a,user=no-such-user-x", /user 'no-such-user-x' not found in \/etc\/passwd/],
  ];
  for (const [text, pattern] of cases) {
    assert.throws(() => resolveIdentity(parseDaemonSpec(text, "/"), 0, 0), (error: Error) => {
      assert.ok(error instanceof DaemonConfigError, text);
      assert.match(error.message, pattern, text);
      return true;
    });
  }
});

Deno.test("resolveIdentity as another user", () => {
  assert.equal(resolveIdentity(parseDaemonSpec("group=a", "/"), 1000, 1000).uid, undefined);
  assert.throws(
    () => resolveIdentity(parseDaemonSpec("group=a,user=nobody", "/"), 1000, 1000),
    /user= and group= need the server to run as root \(it runs as uid 1000\)/,
  );
});

// ---------------------------------------------------------------------------
// The channel's frames

Deno.test("frames request round trip", () => {
  const body = new TextEncoder().encode("body bytes");
  const decoded = decodeRequest(
    encodeRequest("ab12-7", "POST", '{"PATH_INFO":"/é"}', body) as Uint8Array<ArrayBuffer>,
  );

  assert.equal(decoded.requestId, "ab12-7");
  assert.equal(decoded.method, "POST");
  assert.equal(decoded.environ, '{"PATH_INFO":"/é"}');
  assert.equal(decoded.bodyMode, 0);
  assert.deepEqual(decoded.body, body);
  assert.equal(decoded.waitedMs, 0);
  const waited = encodeRequest("ab12-9", "GET", "{}", null, 1234.4) as Uint8Array<ArrayBuffer>;
  assert.equal(decodeRequest(waited).waitedMs, 1234);
  assert.equal(
    decodeRequest(encodeRequest("ab12-8", "GET", "{}", null) as Uint8Array<ArrayBuffer>).bodyMode,
    1,
  );
});

Deno.test("frames start round trip", () => {
  const body = new TextEncoder().encode("hello");
  const decoded = decodeStart(
    encodeStart(201, ["X-A", "1"], true, body) as Uint8Array<ArrayBuffer>,
  );

  assert.equal(decoded.status, 201);
  assert.deepEqual(decoded.headers, ["X-A", "1"]);
  assert.equal(decoded.complete, true);
  assert.deepEqual(decoded.body, body);
});

Deno.test("frames split across reads", async () => {
  const payload = new Uint8Array(100_000).map((_, i) => i % 251);
  const bytes = new Uint8Array([
    ...encodeFrame(Frame.CANCEL, 7),
    ...encodeFrame(Frame.BODY, 8, payload),
    ...encodeFrame(Frame.BODY_ABORT, 9, new Uint8Array([1, 2])),
  ]);
  // Deliver the bytes in pieces of 5, 4093 and the rest, cutting headers and payloads.
  const pieces = [bytes.slice(0, 5), bytes.slice(5, 4098), bytes.slice(4098)];
  const stream = ReadableStream.from(pieces);
  const frames: [number, number, number][] = [];
  let received: Uint8Array | undefined;
  await readFrames(stream, FRONT_FRAMES, (type, id, data) => {
    frames.push([type, id, data.length]);
    if (type === Frame.BODY) received = data.slice();
  });

  assert.deepEqual(frames, [[Frame.CANCEL, 7, 0], [Frame.BODY, 8, payload.length], [
    Frame.BODY_ABORT,
    9,
    2,
  ]]);
  assert.deepEqual(received, payload);
});

Deno.test("frame header over the payload limit", async () => {
  // RESPONSE_BODY with a length of 1 GiB, which the reader must not allocate.
  const header = encodeFrame(Frame.RESPONSE_BODY, 1).slice(0, 5);
  const bytes = new Uint8Array([...header, 0, 0, 0, 0x40]);
  const stream = ReadableStream.from([bytes]);

  await assert.rejects(
    readFrames(stream, DAEMON_FRAMES, () => {}),
    /invalid frame header \(type 23, 1073741824 bytes\)/,
  );
});

Deno.test("frame of the other direction rejected", async () => {
  // A REQUEST frame, which only the front sends, read by the front.
  const stream = ReadableStream.from([encodeFrame(Frame.REQUEST, 1)]);

  await assert.rejects(
    readFrames(stream, DAEMON_FRAMES, () => {}),
    /invalid frame header \(type 2, 0 bytes\)/,
  );
});

Deno.test("forged daemon frames kill the process", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    // One process for each forgery, so that each is the first request of its
    // process and has frame id 1, and no restart delay adds up.
    await using server = await startServer(join(folder, "app.wsgi"), [
      "--daemon",
      "group=forger,user=nobody,processes=4,threads=1",
    ], { waitForReady: false });
    await waitForCount(server, /daemon process ready/, 4, 0, 120_000);
    const frame = (bytes: number[]) => `forge-frame?bytes=${bytes.join(",")}`;
    const forgeries = [
      // A PONG that no PING asked for.
      { path: frame([Frame.PONG, 0, 0, 0, 0, 0, 0, 0, 0]), log: /wrote an unexpected PONG frame/ },
      // A body frame that announces 1 GiB.
      {
        path: frame([Frame.RESPONSE_BODY, 1, 0, 0, 0, 0, 0, 0, 0x40]),
        log: /wrote an invalid frame header \(type 23, 1073741824 bytes\)/,
      },
      // A START frame whose payload does not decode.
      {
        path: frame([Frame.START, 1, 0, 0, 0, 3, 0, 0, 0, 1, 2, 3]),
        log: /wrote an invalid frame payload \(type 22: RangeError/,
      },
      // 20 MiB of valid body frames that the client never took.
      { path: "forge-body", log: /wrote an oversized response body \(\d+ bytes that the client/ },
    ];
    for (const forgery of forgeries) {
      await getText(`${server.origin}/do/sandbox/${forgery.path}`).catch(() => undefined);
      await server.waitForLog(forgery.log, 10_000);
    }
    // The group starts fresh processes and serves again.
    await waitForCount(server, /daemon process ready/, 5, 0, 60_000);
    assert.equal((await getText(`${server.origin}/do/describe`)).status, 200);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon standard error relayed with its ids", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=forger,user=nobody,processes=1,threads=1",
    );
    const [pid] = daemonPids(server);
    await getText(`${server.origin}/do/sandbox/forge-log?pid=${pid}`);
    await server.waitForLog(/forged after a return/, 10_000);
    await getText(`${server.origin}/do/sandbox/long-line`);
    await waitForCount(server, /wrote to standard error: A+/, 4, 0, 10_000);

    // Lines that claim another group are relayed with this group's ids.
    const wrapped =
      /WARNING \[app=app\.wsgi group=forger process=\d+\] daemon process wrote to standard error: /;
    for (const text of ["forged line", "forged twice"]) {
      assert.match(server.log(), new RegExp(`${wrapped.source}.*${text}`), text);
    }
    // A carriage return breaks the relayed line, and the rest gets the ids too.
    assert.match(
      server.log(),
      /WARNING \[app=app\.wsgi group=forger process=\d+\] \S+ CRITICAL \[group=victim pid=1\] forged after a return/,
    );
    assert.doesNotMatch(server.log(), /^\S+ (ERROR|CRITICAL) \[group=victim/m);
    // The carriage return is escaped, so it cannot hide the prefix on a terminal.
    assert.doesNotMatch(server.log(), /\r/);
    // A line without end comes in pieces of 64 KiB: 200 KiB make 4.
    assert.equal(countMatches(server.log(), /wrote to standard error: A{65536}(?!A)/), 3);

    // A real response body above the frame limit streams in frames of its own.
    const big = await fetch(`${server.origin}/do/big-list?mib=40`);
    assert.equal(big.status, 200);
    assert.equal(big.headers.get("content-length"), String(40 * MiB));
    assert.equal((await big.arrayBuffer()).byteLength, 40 * MiB);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Start-up checks of the real program

Deno.test("server refuses a root daemon", async () => {
  const command = new Deno.Command(Deno.execPath(), {
    args: serverArgs([OTHER_SCRIPT, "--daemon", "group=a"]),
    stdout: "piped",
    stderr: "piped",
  });
  const output = await command.output();
  const stderr = new TextDecoder().decode(output.stderr);

  assert.equal(output.code, 2);
  assert.match(stderr, /wsgirun: group 'a' would run as root: add user=NAME/);
});

Deno.test("unwritable allow-write folder is reported", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  const data = join(folder, "data");
  // Owned by root, who runs the tests, and not writable by others.
  await Deno.mkdir(data, { mode: 0o755 });
  await Deno.chmod(data, 0o755);
  // A folder that the user nobody may write, with a database that root created in it.
  const databases = join(folder, "databases");
  await Deno.mkdir(databases);
  await Deno.chown(databases, NOBODY, NOBODY);
  const database = join(databases, "site.sqlite3");
  await Deno.writeFile(database, new Uint8Array(0), { mode: 0o644 });
  await Deno.chmod(database, 0o644);
  try {
    await using server = await startSiteGroup(
      folder,
      `group=readonly,user=nobody,processes=1,threads=1,allow-write=${data},allow-write=${databases}`,
    );
    const write = await getText(
      `${server.origin}/do/sandbox/sqlite-write?path=${encodeURIComponent(database)}`,
    );

    assert.match(
      server.log(),
      new RegExp(
        `WARNING \\[app=app\\.wsgi group=readonly\\] nobody \\(uid 65534[^)]*\\) cannot write ` +
          `${data} \\(mode 755\\), so the application gets PermissionError`,
      ),
    );
    assert.match(
      server.log(),
      new RegExp(
        `WARNING .*cannot write 1 file in the allow-write folder ${databases}: ` +
          "site\\.sqlite3 \\(mode 644, owner uid 0\\)\\. Writes to them fail",
      ),
    );
    assert.doesNotMatch(server.log(), new RegExp(`cannot write ${databases} \\(mode`));
    assert.equal(write.body, "denied: OperationalError");
    await server.waitForLog(
      /sandbox denied sqlite-write: OperationalError: attempt to write a readonly database: the user the application runs as cannot write '.*site\.sqlite3' or its folder/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon app snapshot watches its home folder", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  const home = await Deno.realPath(await Deno.makeTempDir({ prefix: "wsgirun_daemon_home_" }));
  await Deno.chmod(home, 0o755);
  // The script imports an optional module that its group's home provides
  // later: "" on sys.path is the working folder, which is the home.
  await Deno.writeTextFile(
    join(folder, "optional.wsgi"),
    `
try:
    import optional_module
except ImportError:
    optional_module = None
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [getattr(optional_module, "WHERE", "none").encode()]
`,
  );
  const run = async () => {
    await using server = await startServer(join(folder, "optional.wsgi"), [
      "--daemon",
      `group=homes,user=nobody,processes=1,threads=1,home=${home}`,
    ], { waitForReady: false });
    await server.waitForLog(/daemon process ready/, 120_000);
    return (await getText(server.origin + "/")).body;
  };
  try {
    assert.equal(await run(), "none");
    await Deno.writeTextFile(join(home, "optional_module.py"), 'WHERE = "home"\n');
    assert.equal(await run(), "home");
  } finally {
    await Deno.remove(folder, { recursive: true });
    await Deno.remove(home, { recursive: true });
  }
});

Deno.test("daemon files get the server's umask", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  await Deno.chown(folder, NOBODY, NOBODY);
  // Another umask than the usual 022, which the server inherits from this process.
  const umask = Deno.umask(0o027);
  try {
    await using server = await startSiteGroup(
      folder,
      `group=masks,user=nobody,processes=1,threads=1,allow-write=${folder}`,
    );
    const response = await getText(server.origin + "/do/sandbox/write");

    assert.equal(response.status, 200);
    // The process inherits the umask but may not read it; the front passes it on.
    const mode = (await Deno.stat(join(folder, "written.txt"))).mode! & 0o777;
    assert.equal(mode.toString(8), "640", server.log());
  } finally {
    Deno.umask(umask);
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("private app folder is reported", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  await Deno.chmod(folder, 0o700);
  try {
    await using server = await startServer(join(folder, "app.wsgi"), [
      "--daemon",
      "group=private,user=nobody,processes=1,threads=1",
    ], { waitForReady: false });
    await server.waitForLog(/cannot enter/);
    const line = server.log().split("\n").find((text) => text.includes("cannot enter")) ?? "";

    assert.match(line, /WARNING \[app=app\.wsgi group=private\] nobody \(uid 65534/);
    assert.ok(line.includes(`cannot enter ${folder} (mode 700)`), line);

    // The spawns fail, and the group is retried until it is marked failed.
    await server.waitForLog(/group marked failed/, 30_000);
    const response = await getText(server.origin + "/");
    assert.equal(response.status, 503);
    assert.equal(countMatches(server.log(), /failed to start a daemon process: /), 3);
    // Deno's error names the program; the log adds the folder that is the cause.
    assert.ok(server.log().includes(`and to enter its working folder ${folder})`), server.log());
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon memory limit replaces isolate", async () => {
  const folder = await Deno.realPath(await Deno.makeTempDir({ prefix: "wsgirun_daemon_test_" }));
  await Deno.chmod(folder, 0o755);
  // Returns how many requests its interpreter served; ?grow keeps 80 MiB more.
  await Deno.writeTextFile(
    join(folder, "app.wsgi"),
    `
import time

served = 0
allocations = []

def application(environ, start_response):
    global served
    served += 1
    if environ["QUERY_STRING"] == "grow":
        allocations.append(bytearray(80 * 1024 * 1024))
    if environ["QUERY_STRING"] == "sleep":
        time.sleep(30)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(served).encode()]
`,
  );
  try {
    await using server = await startSiteGroup(
      folder,
      "group=memory,user=nobody,processes=1,threads=1,memory-limit=96M,shutdown-timeout=0",
    );
    const get = async (query = "") => (await getText(`${server.origin}/?${query}`)).body;

    assert.equal(await get(), "1");
    assert.equal(await get("grow"), "2");
    await server.waitForLog(
      /group=memory pid=\d+ isolate=1\] isolate has \d+ MiB of wasm memory \(memory-limit 96 MiB\); starting a fresh one/,
    );
    await server.waitForLog(/isolate=1\] isolate stopped: replaced after 2 requests/);

    // The process stays, and its fresh interpreter counts from the start.
    assert.equal(await get(), "1");
    assert.doesNotMatch(server.log(), /daemon process exited/);

    // shutdown-timeout=0 gives running requests no time when the server stops.
    const stuck = getText(`${server.origin}/?sleep`);
    await delay(300);
    await server.stop();
    assert.equal((await stuck).status, 503);
    assert.match(server.log(), /responses still running after 0 ms; stopping them/);
    // The daemon's own log line reports that the request was stopped, not finished.
    assert.match(
      server.log(),
      /WARNING \[group=memory pid=\d+\] the front closed the channel: stopping 1 unfinished request/,
    );
    // Its FAIL frame for that request reaches the front before the process exits.
    assert.match(
      server.log(),
      /request failed with 503: daemon process \d+: the server is shutting down/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon memory max refuses growth past it", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=capped,user=nobody,processes=1,threads=1,memory-max=96M",
    );
    const allocate = async (mib: number) =>
      (await getText(`${server.origin}/do/allocate?mib=${mib}`)).body;
    assert.equal(await allocate(200), "MemoryError");
    assert.equal(await allocate(8), "allocated");
    assert.match(
      server.log(),
      /WARNING \[group=capped pid=\d+ isolate=1 request=\S+\] the application requested \d+ MiB of wasm memory, past the memory-max of 96 MiB/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon retirement loses no returned request", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    // Each process is replaced after its first request, while requests wait in it.
    await using server = await startSiteGroup(
      folder,
      "group=recycled,user=nobody,processes=1,threads=1,maximum-requests=1",
    );
    // 60 requests of 100 ms keep the process busy for longer than its
    // replacement takes to start, so it retires with requests still waiting.
    const responses = await Promise.all(
      Array.from({ length: 60 }, () => getText(`${server.origin}/do/slow?ms=100`)),
    );
    const statuses = responses.map((response) => response.status);
    // A drained process used to exit before its last frames (the requests it
    // gave back, the end of its last response) reached the front: 502.
    assert.deepEqual(statuses.filter((status) => status !== 200), [], server.log());
    assert.match(server.log(), /retiring the daemon process \(\d+ requests? sent to it\)/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

/** Starts the site fixture copied to `folder` in the daemon group `spec` and waits until it is ready. */
async function startSiteGroup(folder: string, spec: string): Promise<TestServer> {
  const server = await startServer(join(folder, "app.wsgi"), ["--daemon", spec], {
    waitForReady: false,
  });
  await server.waitForLog(/daemon process ready/, 120_000);
  return server;
}

Deno.test("daemon reload moves waiting requests", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=moves,user=nobody,processes=1,threads=1,graceful-timeout=2",
    );
    // One request of 10 s outlasts graceful-timeout, which starts once the
    // fresh process is ready, even when that process takes seconds to build
    // its snapshot. Then five of 1 s: the first of those waits in the isolate
    // behind the long one, the others in the process's queue. Only the long one may fail. An upload with a streamed
    // body waits in the process's queue too, because its body would start to
    // flow once an isolate has taken it.
    const requests: Promise<{ status: number; body: string }>[] = [];
    for (let i = 0; i < 6; i++) {
      requests.push(getText(server.origin + `/do/slow?ms=${i === 0 ? 10_000 : 1000}`));
      await delay(100);
      if (i === 0) {
        requests.push(
          fetch(server.origin + "/do/upload", { method: "POST", body: new Uint8Array(200_000) })
            .then(async (response) => ({ status: response.status, body: await response.text() })),
        );
        await delay(100);
      }
    }
    server.process.kill("SIGHUP");
    const responses = await Promise.all(requests);

    assert.deepEqual(
      responses.map((response) => response.status),
      [502, 200, 200, 200, 200, 200, 200],
      server.log(),
    );
    assert.equal(responses[1].body, "200000");
    assert.match(server.log(), /the front retires this process: finishing 1 running request,/);
    assert.match(server.log(), /killed after graceful-timeout/);
    // Each process keeps its snapshots in its cache, so the fresh one restores them.
    assert.doesNotMatch(server.log(), /cannot write the snapshot cache file/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon moves waiting requests to an idle process", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=spread,user=nobody,processes=2,threads=1",
    );
    await waitForCount(server, /daemon process ready/, 2, 0, 120_000);
    // One long request, then short ones: the front hands some of them to the
    // process that runs the long one, which gives them back once the other
    // process has nothing to do.
    const long = getText(server.origin + "/do/slow?ms=6000").then(() => performance.now());
    await delay(200);
    const short: Promise<number>[] = [];
    for (let i = 0; i < 6; i++) {
      short.push(getText(server.origin + "/do/slow?ms=400").then(() => performance.now()));
      await delay(50);
    }
    const shortDone = await Promise.all(short);
    const longDone = await long;

    for (const [i, done] of shortDone.entries()) {
      assert.ok(done < longDone, `short request ${i} waited for the long one`);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon stopped process killed after socket-timeout", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=frozen,user=nobody,processes=1,threads=1,socket-timeout=2",
    );
    // A request that runs longer than socket-timeout and sends nothing meanwhile
    // is not a hung process, because the process replies to the ping.
    assert.equal((await getText(server.origin + "/do/slow?ms=3000")).status, 200);

    const [pid] = daemonPids(server);
    Deno.kill(pid, "SIGSTOP");
    // The stopped process never read the request, so it goes to the fresh process.
    const response = await getText(server.origin + "/do/slow?ms=10");

    assert.equal(response.status, 200);
    assert.match(
      server.log(),
      new RegExp(
        `group=frozen process=${pid}\\] daemon process sent nothing for \\d+ s and did not answer ` +
          "a ping \\(socket-timeout 2 s\\) with 1 request outstanding; it is stopped or blocked",
      ),
    );
    assert.equal(countMatches(server.log(), /daemon process ready/), 2);

    // A process that hangs while the server drains is killed, and not restarted.
    const [fresh] = daemonPids(server).filter((other) => other !== pid);
    const running = getText(server.origin + "/do/slow?ms=8000");
    await delay(500);
    Deno.kill(fresh, "SIGSTOP");
    await server.stop();
    const stopLog = server.log().slice(server.log().indexOf("SIGTERM"));

    assert.equal((await running).status, 502);
    assert.match(stopLog, new RegExp(`process=${fresh}\\] daemon process sent nothing`));
    assert.match(stopLog, /not restarting the daemon process: the server is stopping/);
    assert.doesNotMatch(stopLog, /restarting a daemon process in/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("app snapshot whose restore hangs dropped", async () => {
  const folder = await Deno.realPath(await Deno.makeTempDir({ prefix: "wsgirun_daemon_test_" }));
  await Deno.chmod(folder, 0o755);
  // Each isolate reseeds random right after it restores a snapshot. This
  // application replaces random.seed while it imports, so its application
  // snapshot restores into an endless loop; the runtime snapshot does not.
  await Deno.writeTextFile(
    join(folder, "app.wsgi"),
    `import random

def _spin(*args, **kwargs):
    while True:
        pass

random.seed = _spin

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"restored without the snapshot"]
`,
  );
  try {
    await using server = await startSiteGroup(
      folder,
      "group=spins,user=nobody,processes=1,threads=1,startup-timeout=16",
    );
    const response = await getText(server.origin + "/");
    const log = server.log();

    assert.equal(response.status, 200);
    assert.equal(response.body, "restored without the snapshot");
    // The pool gives up on the isolate at 3/4 of startup-timeout, before the front kills the process.
    assert.match(log, /isolate did not start within 12000 ms; replacing it/);
    assert.match(
      log,
      /the application snapshot \S+app-app\.wsgi-\w+\.snapshot could not be restored; deleting it/,
    );
    assert.doesNotMatch(log, /startup timed out after/);
    assert.equal(countMatches(log, /daemon process ready/), 1);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon stop answers waiting requests", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=stops,user=nobody,processes=1,threads=1",
    );
    // The first request runs. Some of the others wait in the daemon process,
    // which hands them back when the server stops, and the rest in the front's queue.
    const requests: Promise<{ status: number }>[] = [];
    for (let i = 0; i < 5; i++) {
      requests.push(getText(server.origin + "/do/slow?ms=2000"));
      await delay(100);
    }
    await server.stop();
    const statuses = (await Promise.all(requests)).map((response) => response.status);

    // The process serves the waiting requests within shutdown-timeout, one
    // at a time; every other one gets 503 with a log line.
    assert.equal(statuses[0], 200);
    assert.ok(statuses.every((status) => status === 200 || status === 503), String(statuses));
    const unavailable = statuses.filter((status) => status === 503).length;
    assert.ok(unavailable >= 3, String(statuses));
    assert.equal(
      server.log().match(/request failed with 503: .*shutting down/g)?.length,
      unavailable,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon SIGTERM returns requests in order", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=order,user=nobody,processes=1,threads=1",
    );
    const finished: number[] = [];
    const requests: Promise<void>[] = [];
    for (let i = 0; i < 6; i++) {
      requests.push(
        getText(server.origin + "/do/slow?ms=700").then((response) => {
          assert.equal(response.status, 200);
          finished.push(i);
        }),
      );
      await delay(100);
    }
    Deno.kill(daemonPids(server)[0], "SIGTERM");
    await Promise.all(requests);

    // The daemon returns the requests it has not started, and they run in arrival order.
    assert.deepEqual(finished, [0, 1, 2, 3, 4, 5]);
    assert.match(server.log(), /SIGTERM: finishing 1 running request,/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon ignores signals for the front", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=deaf,user=nobody,processes=1,threads=1",
    );
    const [pid] = daemonPids(server);
    // Deno listens for SIGUSR1 only from 500 ms after the process started.
    await delay(600);
    // A service manager or a terminal may send these to every process of the server.
    const signals = ["SIGINT", "SIGHUP", "SIGUSR1", "SIGQUIT", "SIGTTIN", "SIGUSR2"] as const;
    for (const signal of signals) Deno.kill(pid, signal);
    Deno.kill(pid, "SIGCONT");
    await delay(500);
    const response = await getText(server.origin + "/do/describe");

    assert.equal(response.status, 200);
    assert.equal(servingPid(JSON.parse(response.body).request_id), pid);
    assert.doesNotMatch(server.log(), /daemon process (exited|was killed)/);
    // Deno opens its debugger on SIGUSR1, and the process closes it again.
    await server.waitForLog(
      new RegExp(`WARNING \\[group=deaf pid=${pid}\\] SIGUSR1: Deno opened its debugger`),
    );
    assert.equal(listensOn(pid, 9229), false);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon send timeout frees the isolate", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startServer(join(folder, "app.wsgi"), [
      "--send-timeout",
      "1",
      "--daemon",
      "group=sender,user=nobody,processes=1,threads=1",
    ], { waitForReady: false });
    await server.waitForLog(/daemon process ready/, 120_000);
    const stalled = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    try {
      // 1 GiB that this client never reads.
      const head = `GET /do/download?size=${1024 * MiB} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`;
      await stalled.write(new TextEncoder().encode(head));
      const stopped = await server.waitForLog(/.*response stopped after \d+ bytes.*/, 30_000);
      const next = await fetch(`${server.origin}/do/describe`, {
        signal: AbortSignal.timeout(10_000),
      });

      assert.equal(next.status, 200);
      await next.body?.cancel();
      assert.match(
        stopped,
        /the client's socket took no more response bytes for 1 s \(--send-timeout\)/,
      );
      // The daemon's isolate names the cause, not a client that left.
      await server.waitForLog(
        /group=sender .*the client's socket took no more response bytes within --send-timeout; the request was stopped/,
        5000,
      );
    } finally {
      stalled.close();
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon client leaving is no 502", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=leaving,user=nobody,processes=1,threads=1",
    );
    const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    const head = "GET /do/slow-error?ms=1000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    await connection.write(new TextEncoder().encode(head));
    await delay(300);
    connection.close();
    await server.waitForLog(
      /INFO .*client closed the connection before the response started/,
      10_000,
    );

    assert.doesNotMatch(server.log(), /request failed with 502/);
    assert.match(server.log(), /ERROR .*ValueError: raised after the sleep/);
    assert.equal((await getText(server.origin + "/do/describe")).status, 200);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon stalled body gets 408", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startServer(join(folder, "app.wsgi"), [
      "--body-timeout",
      "1",
      "--daemon",
      "group=stall,user=nobody,processes=1,threads=1",
    ], { waitForReady: false });
    await server.waitForLog(/daemon process ready/, 120_000);
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    const head = "POST /do/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n";
    await conn.write(new TextEncoder().encode(head + "a".repeat(100_000)));
    const reply = new Uint8Array(4096);
    const count = await conn.read(reply);
    conn.close();

    assert.match(new TextDecoder().decode(reply.subarray(0, count ?? 0)), /^HTTP\/1\.1 408 /);
    // The response can reach this client before the test has read the log line.
    await server.waitForLog(
      /WARNING .*request failed with 408: the client sent no request body/,
      5000,
    );
    // The isolate reading the body names the timeout, not a client that left.
    await server.waitForLog(
      /group=stall pid=\d+ isolate=1 .*\] the client sent no request body data within --body-timeout; the request was stopped/,
      5000,
    );
    // The process's only isolate serves the next request.
    assert.equal((await getText(server.origin + "/do/upload")).status, 200);
    assert.doesNotMatch(server.log(), /daemon process exited|isolate=2\]/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon keeps its release after a link switch", async () => {
  // current -> one, then switched to two: a running process keeps one, also
  // in an isolate it adds, and a reload starts processes on two.
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    for (const release of ["one", "two"]) {
      await Deno.mkdir(join(folder, release));
      await Deno.chmod(join(folder, release), 0o755);
      for (const name of ["app.wsgi", "data.txt"]) {
        await Deno.copyFile(join(folder, name), join(folder, release, name));
      }
      await Deno.writeTextFile(join(folder, release, "data.txt"), `release ${release}\n`);
      // The same time in both releases, so that only SIGHUP reloads.
      const time = new Date(2026, 0, 1);
      await Deno.utime(join(folder, release, "app.wsgi"), time, time);
    }
    await Deno.symlink("one", join(folder, "current"));
    await using server = await startServer(join(folder, "current", "app.wsgi"), [
      "--daemon",
      "group=link,user=nobody,processes=1,threads=2",
    ], { waitForReady: false });
    await server.waitForLog(/daemon process ready/, 120_000);
    assert.equal((await getText(server.origin + "/do/file")).body, "release one\n");

    await Deno.symlink("two", join(folder, "next"));
    await Deno.rename(join(folder, "next"), join(folder, "current"));
    const [slow, file] = await Promise.all([
      getText(server.origin + "/do/slow?ms=800"),
      (async () => {
        await delay(200);
        return await getText(server.origin + "/do/file");
      })(),
    ]);
    assert.equal(slow.status, 200);
    assert.equal(file.body, "release one\n");
    assert.match(server.log(), /isolate=2\] isolate ready/);

    server.process.kill("SIGHUP");
    await server.waitForLog(/retiring the daemon process/, 60_000);
    assert.equal((await getText(server.origin + "/do/file")).body, "release two\n");
    assert.doesNotMatch(server.log(), /exited with code 1|ERROR|escalate/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon queued upload ends with its 503", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=queued,user=nobody,processes=1,threads=1,queue-timeout=1",
    );
    const busy = getText(server.origin + "/do/slow?ms=4000");
    await delay(300);

    // The upload waits in the daemon process's queue with a body that is never read.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    const head = "POST /do/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
      "Content-Length: 200000\r\nConnection: close\r\n\r\n";
    await conn.write(new TextEncoder().encode(head + "a".repeat(200_000)));
    // Without the cancelled body, Deno kept such a connection for about 23 s.
    const closed = setTimeout(() => conn.close(), 10_000);
    const reply = await new Response(conn.readable).text().catch((error) => String(error));
    clearTimeout(closed);

    assert.match(reply, /^HTTP\/1\.1 503 /);
    assert.equal((await busy).status, 200);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon queue-timeout counts from the front", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=queued,user=nobody,processes=1,threads=1,queue-timeout=4",
    );
    const slow = (ms: number) =>
      fetch(`${server.origin}/do/slow?ms=${ms}`).then(async (response) => {
        await response.body?.cancel();
        return response.status;
      });
    // One request runs and 8 wait in the process, which takes 9 with threads=1.
    const started = performance.now();
    const filling = Array.from({ length: 9 }, () => slow(9000));
    await delay(1500);
    // This one waits in the front until the process's queue-timeout fails the
    // 8, at 4 to 5 s. Then it goes to the process, where its own timeout must
    // run out 4 s after it arrived, at 5.5 to 6.5 s, not 4 s after that.
    const late = await slow(1);
    const elapsed = performance.now() - started;

    assert.equal(late, 503);
    assert.ok(elapsed < 7200, `the late request got its 503 after ${Math.round(elapsed)} ms`);
    const statuses = await Promise.all(filling);
    assert.equal(statuses.filter((status) => status === 503).length, 8);
    // The front and the process word the same timeout alike.
    assert.match(
      server.log(),
      /queue timed out: the request waited \d+ ms in the queue \(queue-timeout 4 s\)/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon held request not passed around", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=held,user=nobody,processes=2,threads=2,queue-timeout=5",
    );
    // Eight clients in a closed loop on four isolates, which start one per
    // process: requests of 1 s wait about 1 s each. A request held behind a
    // running one used to move to the other isolate, behind the request
    // that isolate had just started, and back again until its 503.
    const statuses: number[] = [];
    const longest = { ms: 0 };
    await Promise.all(Array.from({ length: 8 }, async () => {
      for (let i = 0; i < 3; i++) {
        const sent = performance.now();
        const response = await fetch(server.origin + "/do/slow?ms=1000");
        await response.body?.cancel();
        statuses.push(response.status);
        longest.ms = Math.max(longest.ms, performance.now() - sent);
      }
    }));

    assert.deepEqual(statuses.filter((status) => status !== 200), []);
    assert.ok(longest.ms < 4500, `a request took ${Math.round(longest.ms)} ms`);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon SIGHUP imports the application again", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    // The application reads config.json at import; config.json is no module.
    const script = join(folder, "app.wsgi");
    await Deno.writeTextFile(join(folder, "config.json"), '{"greeting": "one"}');
    await Deno.chmod(join(folder, "config.json"), 0o644);
    const original = await Deno.readTextFile(script);
    await Deno.writeTextFile(
      script,
      "import json as _json\n" +
        "with open(__file__.rsplit('/', 1)[0] + '/config.json') as _config:\n" +
        "    IMPORTED_GREETING = _json.load(_config)['greeting']\n" + original,
    );
    await using server = await startSiteGroup(
      folder,
      "group=reimport,user=nobody,processes=2,threads=1",
    );
    await waitForCount(server, /daemon process ready/, 2, 0, 60_000);

    await Deno.writeTextFile(join(folder, "config.json"), '{"greeting": "two"}');
    server.process.kill("SIGHUP");
    await waitForCount(server, /daemon process ready/, 4, 0, 20_000);
    const greetings = new Set<string>();
    for (let i = 0; i < 4; i++) {
      const response = await getText(`${server.origin}/do/sandbox/imported-greeting`);
      greetings.add(response.body);
    }

    assert.deepEqual([...greetings], ["allowed: 'two'"]);
    // One process builds the snapshot, and the other uses it.
    assert.equal(
      countMatches(server.log(), /building the application snapshot \(the server received SIGHUP/),
      1,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("second SIGHUP waits for starting processes", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  try {
    await using server = await startSiteGroup(
      folder,
      "group=twice,user=nobody,processes=1,threads=1",
    );
    server.process.kill("SIGHUP");
    await server.waitForLog(/reloading: the server received SIGHUP/);
    // Past the window in which a second SIGHUP counts as the same one. The
    // fresh process of the first reload needs far longer than this to start.
    await delay(300);
    server.process.kill("SIGHUP");
    await server.waitForLog(
      /reload queued \(the server received SIGHUP\): the fresh processes of the last reload or start are still starting/,
    );
    // The first reload's process becomes ready, and then the queued reload runs.
    await waitForCount(server, /reloading: the server received SIGHUP/, 2, 0, 60_000);
    await waitForCount(server, /daemon process ready/, 3, 0, 60_000);

    assert.doesNotMatch(server.log(), /still starting stops/);
    assert.equal((await getText(server.origin + "/do/describe")).status, 200);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("daemon reload cut short by stop", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  const script = join(folder, "app.wsgi");
  try {
    await using server = await startServer(script, [
      "--daemon",
      "group=cut,user=nobody,processes=1,threads=1,graceful-timeout=30",
    ], { waitForReady: false });
    await server.waitForLog(/daemon process ready/, 120_000);
    const slow = getText(server.origin + "/do/slow?ms=1500");
    await delay(300);

    const now = new Date();
    await Deno.utime(script, now, new Date(now.getTime() + 2000));
    await server.waitForLog(/reloading: the script file changed/);
    const status = await server.stop();
    const response = await slow;

    assert.equal(response.status, 200);
    assert.equal(status.code, 0);
    const stopLog = server.log().slice(server.log().indexOf("SIGTERM: stopping gracefully"));
    assert.match(stopLog, /was stopped before it was ready because the server is stopping/);
    assert.doesNotMatch(stopLog, /daemon process ready/);
    assert.equal(countMatches(server.log(), /daemon process ready/), 1);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("failed daemon reload keeps the old processes", async () => {
  const folder = await copyFixture(SITE_FIXTURE);
  const script = join(folder, "app.wsgi");
  const working = await Deno.readTextFile(script);
  try {
    const server = await startServer(script, [
      "--preload",
      "--daemon",
      "group=held,user=nobody,processes=2,threads=1",
    ], { waitForReady: false });
    await using _server = server;
    await waitForCount(server, /daemon process ready/, 2, 0, 120_000);

    await Deno.writeTextFile(script, "raise RuntimeError('broken by the deploy')\n" + working);
    await server.waitForLog(/CRITICAL .*reload failed: /, 90_000);
    const during = await getText(server.origin + "/");
    // Processes of the reload that were still starting fail after the report, without a line.
    await delay(3000);
    const log = server.log();

    assert.equal(during.status, 200);
    assert.equal(countMatches(log, /reload failed: /), 1);
    assert.match(
      log,
      /reload failed: 3 daemon processes in a row failed to start; .*broken by the deploy.*; 2 processes started before the reload keep serving/,
    );
    assert.doesNotMatch(log, /group marked failed/);

    // The fixed script reloads.
    await Deno.writeTextFile(script, working + "\n# fixed\n");
    await waitForCount(server, /daemon process ready/, 4, 0, 90_000);
    assert.equal((await getText(server.origin + "/")).status, 200);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("group failing at start is marked failed", async () => {
  await using server = await startServer(BROKEN_SCRIPT, [
    "--preload",
    "--daemon",
    "group=broken,user=nobody,processes=2,threads=1",
  ], { waitForReady: false });
  await server.waitForLog(/group marked failed/, 90_000);
  const response = await getText(server.origin + "/");
  // A process started before the group was marked failed may fail after it:
  // wait until every process that logged a line has failed.
  const processes = () => new Set(server.log().match(/group=broken pid=\d+/g)).size;
  await waitForCount(server, /daemon process failed to start: /, processes(), 0, 30_000);
  const log = server.log();

  assert.equal(response.status, 503);
  const failedStarts = countMatches(
    log,
    /daemon process failed to start: the application failed to import \(RuntimeError: this application fails to import on purpose\) \(exit code 4\) after/,
  );
  assert.ok(failedStarts === 3 || failedStarts === 4, `${failedStarts} failed starts`);
  assert.equal(countMatches(log, /group marked failed/), 1);
  assert.match(log, /this application fails to import on purpose/);
  // Each failed start logs the traceback twice, from the snapshot build and from the
  // isolate that tried the import, and the CRITICAL line names only the exception.
  assert.equal(countMatches(log, /Traceback \(most recent call last\)/), 2 * failedStarts);
  assert.equal(
    countMatches(
      log,
      /CRITICAL .*the application failed to import at start \(.*; traceback above\); the process exits/,
    ),
    failedStarts,
  );
  assert.match(
    log,
    /CRITICAL \[app=app.wsgi group=broken\] group marked failed: 3 daemon processes in a row failed to start; the last one failed to start: the application failed to import \(RuntimeError: this application fails to import on purpose\)/,
  );
  assert.match(
    log,
    /WARNING \[app=app.wsgi group=broken request=\S+\] request rejected with 503: group 'broken' is unavailable/,
  );
  // The front's line states that it keeps running, since the failure reads as fatal.
  assert.match(
    log,
    /CRITICAL \[app=app\.wsgi pid=\d+\] the application cannot start: .*\. The server keeps running and returns 503 for its requests/,
  );
});

// ---------------------------------------------------------------------------
// One server with two groups and an embedded mount

Deno.test("daemon server", async (t) => {
  const siteDir = await copyFixture(SITE_FIXTURE);
  const siteScript = join(siteDir, "app.wsgi");
  const secret = `daemon-secret-${crypto.randomUUID()}`;
  Deno.env.set("WSGIRUN_DAEMON_TEST_SECRET", secret);
  let server: TestServer;
  try {
    server = await startServer(siteScript, [
      "--threads",
      "1",
      "--shutdown-timeout",
      "3",
      "--daemon",
      `group=site,processes=2,threads=2,user=nobody,env=GREETING=hi,home=${HOME_DIR},inactivity-timeout=2`,
      "--daemon",
      "group=other,processes=1,threads=1,user=nobody,python=3.12,request-timeout=2,maximum-requests=10",
      "--process-group",
      "site",
      "--mount",
      "/other",
      `${OTHER_SCRIPT}:process-group=other`,
      "--mount",
      "/embedded",
      OTHER_SCRIPT,
    ], { waitForReady: false });
  } finally {
    Deno.env.delete("WSGIRUN_DAEMON_TEST_SECRET");
  }
  // Two processes of "site", one of "other", and the embedded isolate.
  await waitForCount(server, /daemon process ready/, 3, 0, 120_000);
  await server.waitForLog(/\[app=app.wsgi pid=\d+ isolate=1\] isolate ready/, 60_000);
  const origin = server.origin;

  try {
    await t.step("processes run as nobody", () => {
      const pids = daemonPids(server);
      assert.equal(pids.length, 3);
      for (const pid of pids) {
        assert.equal(statusField(pid, "Uid"), `${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`);
        assert.equal(statusField(pid, "Gid"), `${NOBODY}\t${NOBODY}\t${NOBODY}\t${NOBODY}`);
        assert.equal(statusField(pid, "Groups"), "");
        assert.equal(statusField(pid, "CapEff"), "0000000000000000");
      }
    });

    await t.step("display name in the command line", () => {
      const lines = daemonPids(server).map((pid) =>
        Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0")
      );
      assert.equal(lines.filter((args) => args.includes("(wsgi:site)")).length, 2);
      assert.equal(lines.filter((args) => args.includes("(wsgi:other)")).length, 1);
    });

    await t.step("process permissions are narrow", () => {
      for (const pid of daemonPids(server)) {
        const args = Deno.readTextFileSync(`/proc/${pid}/cmdline`).split("\0");
        assert.ok(
          !args.some((arg) => /^--allow-(all|run|ffi)/.test(arg) || arg === "-A"),
          args.join(" "),
        );
        assert.ok(args.includes("--allow-env=WSGIRUN_CACHE_DIR"), args.join(" "));
        assert.ok(!args.some((arg) => arg.startsWith("--allow-net")), args.join(" "));
        const read = args.find((arg) => arg.startsWith("--allow-read="))!.split("=")[1].split(",");
        assert.ok(!read.includes("/"), read.join(","));
        assert.ok(!read.includes("/etc"), read.join(","));
      }
    });

    await t.step("glibc's mmap threshold fixed in each process", () => {
      for (const pid of daemonPids(server)) {
        const environ = Deno.readTextFileSync(`/proc/${pid}/environ`).split("\0");
        assert.ok(environ.includes("MALLOC_MMAP_THRESHOLD_=131072"), environ.join(" "));
      }
    });

    await t.step("environ and flags of the group", async () => {
      const facts = await (await fetch(origin + "/do/describe")).json();
      assert.equal(facts.multiprocess, true);
      assert.equal(facts.multithread, false);
      assert.equal(facts.python, "3.14");
      assert.equal(facts.cwd, HOME_DIR);
      assert.equal(facts.greeting, "hi");
      assert.equal(facts.script, siteScript);
      assert.match(facts.request_id, /^\w+-\d+@\d+$/);
      // The isolates report the account the process runs as, which their workers may not read.
      assert.equal(facts.uid, NOBODY);
      assert.equal(facts.gid, NOBODY);
      assert.ok(!facts.environ_names.includes("_"), facts.environ_names.join(" "));
      assert.ok(!facts.environ_names.includes("PYTHONINSPECT"), facts.environ_names.join(" "));
      assert.equal(facts.pwd, HOME_DIR);
      // Emscripten's own getpid() returns 42.
      assert.equal(facts.pid, servingPid(facts.request_id));
    });

    await t.step("mounts answer side by side", async () => {
      const [site, other, embedded] = await Promise.all([
        getText(origin + "/"),
        getText(origin + "/other/"),
        getText(origin + "/embedded/"),
      ]);
      assert.match(site.body, /^hello from \w+-\d+@\d+$/m);
      assert.match(other.body, /^other 3\.12 \w+-\d+@\d+$/);
      // Embedded requests carry the front's request ids, without a group.
      assert.match(embedded.body, /^other 3\.14 [a-z0-9]+-\d+$/);
    });

    await t.step("file_wrapper sent by the daemon", async () => {
      const response = await getText(origin + "/do/file");
      assert.equal(response.status, 200);
      assert.equal(response.body, "file_wrapper data from the daemon's folder\n");

      // A file that ends before the Content-Length cuts the response, with a log line.
      await assert.rejects(getText(origin + "/do/file?short"));
      await server.waitForLog(/ended 10 bytes short/);
      assert.match(
        server.log(),
        /ERROR \[group=site pid=\d+ request=[\w-]+@\d+\] wsgi\.file_wrapper file '.*\/data\.txt' ended 10 bytes short of the Content-Length/,
      );
    });

    await t.step("sandbox denies and logs", async () => {
      const cases = [
        "python-read?path=/etc/shadow",
        "deno-read?path=/etc/shadow",
        `python-read?path=${OTHER_SCRIPT}`,
        `deno-read?path=${OTHER_SCRIPT}`,
        "deno-env",
        "deno-command",
        "os-system",
        "os-exec",
        "os-spawn",
        `python-socket?host=127.0.0.1&port=${server.port}`,
        "deno-connect",
      ];
      for (const path of cases) {
        const response = await getText(`${origin}/do/sandbox/${path}`);
        const name = path.split("?")[0];
        assert.equal(response.status, 200, path);
        assert.match(response.body, /^denied: /, `${path}: ${response.body}`);
        assert.doesNotMatch(response.body, /other-group-secret/, path);
        await server.waitForLog(
          new RegExp(`\\[group=site pid=\\d+ isolate=\\d+ request=\\S+\\] sandbox denied ${name}:`),
        );
      }
      const environ = await getText(
        `${origin}/do/sandbox/python-environ?name=WSGIRUN_DAEMON_TEST_SECRET`,
      );
      assert.equal(environ.body, "allowed: None");
      assert.match(server.log(), /cannot run 'true' with os\.exec\*\(\): a wsgirun isolate/);
      assert.match(
        server.log(),
        /cannot run '\/bin\/true' with os\.spawn\*\(\): a wsgirun isolate/,
      );
      assert.doesNotMatch(server.log(), new RegExp(secret));
    });

    await t.step("request timeout answers 504", async () => {
      const from = server.log().length;
      const response = await getText(origin + "/other/?sleep=5");
      const log = server.log().slice(from);
      assert.equal(response.status, 504);
      const daemonLine = log.match(
        /\[group=other pid=(\d+) isolate=\d+ request=(\w+-\d+)@(\d+)\] request timed out after \d+ ms \(request-timeout 2 s\); replacing the isolate/,
      );
      assert.ok(daemonLine, log);
      const [, pid, frontId, idPid] = daemonLine;
      assert.equal(idPid, pid);
      // The front's line about the same request carries the same id.
      assert.ok(
        log.includes(
          `ERROR [app=app.wsgi group=other request=${frontId}] request failed with 504: daemon process ${pid}: request timed out`,
        ),
        log,
      );
    });

    await t.step("request timeout stops a Python loop", async () => {
      const from = server.log().length;
      const response = await getText(origin + "/other/?spin=1");
      assert.equal(response.status, 504);
      const pid = daemonPids(server).find((candidate) =>
        Deno.readTextFileSync(`/proc/${candidate}/cmdline`).includes("(wsgi:other)")
      )!;
      // Wait for the isolate that replaces the timed-out one.
      const replaced = () => {
        const log = server.log().slice(from);
        const timedOut = log.search(
          /group=other pid=\d+ isolate=\d+ request=\S+\] request timed out/,
        );
        return timedOut >= 0 &&
          /group=other pid=\d+ isolate=\d+\] isolate ready/.test(log.slice(timedOut));
      };
      for (let waited = 0; waited < 20_000 && !replaced(); waited += 100) await delay(100);
      assert.ok(replaced(), "no isolate replaced the timed-out one");

      // A worker left spinning would keep its thread, and one core, for good.
      const workerThreads = () =>
        Deno.readDirSync(`/proc/${pid}/task`).toArray().filter((task) => {
          try {
            return Deno.readTextFileSync(`/proc/${pid}/task/${task.name}/comm`).startsWith(
              "worker-",
            );
          } catch {
            return false; // The thread ended while it was being read.
          }
        }).length;
      let threads = workerThreads();
      // A loaded machine can take several seconds to end a terminated worker's thread.
      for (let waited = 0; waited < 20_000 && threads > 1; waited += 200) {
        await delay(200);
        threads = workerThreads();
      }
      assert.equal(threads, 1, "worker threads left in the group's process");
    });

    await t.step("kill -9 under load", async () => {
      const from = server.log().length;
      const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
      const load = runLoad(origin + "/do/slow?ms=150", 12, stop);
      await delay(1500);
      const victim = daemonPids(server).find((pid) =>
        Deno.readTextFileSync(`/proc/${pid}/cmdline`).includes("(wsgi:site)")
      )!;
      Deno.kill(victim, "SIGKILL");
      await waitForCount(server, /daemon process ready/, 1, from);
      await delay(1500);
      stopLoad();
      const result = await load;
      const log = server.log().slice(from);

      // Only the requests handed to the killed process's two isolates fail:
      // each has its running request and may have the next one.
      assert.ok(result.failures.length <= 4, `${JSON.stringify(result.failures)}\n${log}`);
      for (const failure of result.failures) assert.equal(failure.status, 502);
      assert.ok(result.ok > 20, `only ${result.ok} requests succeeded`);
      assert.match(
        log,
        new RegExp(
          `\\[app=app.wsgi group=site process=${victim}\\] daemon process was killed by signal SIGKILL`,
        ),
      );
      if (result.failures.length > 0) {
        assert.match(
          log,
          new RegExp(
            `request failed with 502: daemon process ${victim} was killed by signal SIGKILL`,
          ),
        );
        assert.match(log, /requests? handed to its isolates fails? \(502, or a response cut off/);
      }
      const late = result.servedBy.slice(-10).map(servingPid);
      assert.ok(!late.includes(victim), `requests still served by ${victim}`);
    });

    await t.step("idle isolates retire", async () => {
      // The load above grew each process to two isolates; inactivity-timeout=2 retires one.
      await waitForCount(
        server,
        /\[group=site pid=\d+ isolate=\d+\] isolate retired after \d+ s idle/,
        1,
        0,
        10_000,
      );
    });

    await t.step("daemon SIGTERM drains under load", async () => {
      const from = server.log().length;
      const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
      const load = runLoad(origin + "/do/slow?ms=150", 12, stop);
      await delay(1000);
      const victim = daemonPids(server).find((pid) =>
        Deno.readTextFileSync(`/proc/${pid}/cmdline`).includes("(wsgi:site)")
      )!;
      Deno.kill(victim, "SIGTERM");
      await waitForCount(
        server,
        new RegExp(`process=${victim}\\] daemon process stopped after SIGTERM`),
        1,
        from,
      );
      await waitForCount(server, /daemon process ready/, 1, from);
      await delay(1000);
      stopLoad();
      const result = await load;

      assert.deepEqual(result.failures, []);
      assert.match(
        server.log().slice(from),
        new RegExp(
          `process=${victim}\\] daemon process received SIGTERM \\(\\d+ requests? sent to it\\): ` +
            "it finishes those that have started, gives back the others and stops",
        ),
      );
    });

    await t.step("maximum-requests replaces the process", async () => {
      const from = server.log().length;
      const served: string[] = [];
      for (let i = 0; i < 15; i++) {
        const response = await getText(origin + "/other/");
        assert.equal(response.status, 200);
        served.push(response.body.split(" ")[2]);
      }
      await waitForCount(
        server,
        /replacing the daemon process: it served 10 requests \(maximum-requests 10\)/,
        1,
        from,
      );
      await waitForCount(
        server,
        /\[app=app.wsgi group=other process=\d+\] daemon process ready/,
        1,
        from,
      );
      await delay(500);
      const pids = new Set(
        [...served, (await getText(origin + "/other/")).body.split(" ")[2]].map(servingPid),
      );
      assert.ok(pids.size >= 2, `one process served every request: ${[...pids]}`);
    });

    await t.step("touch reload under load", async () => {
      const before = new Set(daemonPids(server));
      const from = server.log().length;
      const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
      const load = runLoad(origin + "/do/slow?ms=100", 8, stop);
      await delay(1000);
      const now = new Date();
      await Deno.utime(siteScript, now, new Date(now.getTime() + 1000));
      await server.waitForLog(/reloading: the script file changed/);
      await waitForCount(server, /retiring the daemon process/, 2, from);
      await waitForCount(server, /daemon process exited with code 0/, 2, from);
      await delay(1000);
      stopLoad();
      const result = await load;

      assert.deepEqual(result.failures, []);
      const late = new Set(result.servedBy.slice(-10).map(servingPid));
      for (const pid of late) assert.ok(!before.has(pid), `pid ${pid} served after the reload`);
      // The front cannot tell which requests a process has started, so it
      // gives no count of those that the process finishes.
      const retiring = server.log().slice(from).split("\n")
        .filter((line) => line.includes("retiring the daemon process"));
      for (const line of retiring) {
        assert.match(
          line,
          /retiring the daemon process( \(\d+ requests? sent to it\): it finishes those that have started within graceful-timeout \(\d+ s\) and gives back the others)?$/,
        );
      }
    });

    await t.step("SIGHUP reloads every group under load", async () => {
      const from = server.log().length;
      const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
      const siteLoad = runLoad(origin + "/do/slow?ms=100", 6, stop);
      const otherLoad = runLoad(origin + "/other/", 2, stop);
      await delay(1000);
      server.process.kill("SIGHUP");
      await server.waitForLog(/SIGHUP: reloading every application/);
      await waitForCount(server, /daemon process exited with code 0/, 3, from);
      await delay(1000);
      stopLoad();
      const [site, other] = await Promise.all([siteLoad, otherLoad]);

      assert.deepEqual(site.failures, []);
      assert.deepEqual(other.failures, []);
      assert.match(
        server.log().slice(from),
        /\[app=app.wsgi group=other\] reloading: the server received SIGHUP/,
      );
      // The embedded mount of this server reloads too.
      assert.match(
        server.log().slice(from),
        /reloading: starting fresh isolates \(the server received SIGHUP\)/,
      );
    });

    await t.step("streamed upload with bounded memory", async () => {
      await assertTransferBounded(server, async () => {
        assert.equal(
          await uploadGenerated(server.port, "/do/upload", TRANSFER_BYTES),
          String(TRANSFER_BYTES),
        );
      });
    });

    await t.step("chunked upload in small pieces", async () => {
      await assertTransferBounded(server, async () => {
        const { status, body, crc } = await uploadChunked(
          `${origin}/do/upload?crc=1`,
          CHUNKED_BYTES,
          CHUNKED_PIECE_BYTES,
          CHUNKED_BYTES_PER_SECOND,
        );
        const [received, receivedCrc] = body.split(" ");

        assert.equal(status, 200, body);
        assert.equal(received, String(CHUNKED_BYTES));
        assert.equal(receivedCrc, crc.toString(16).padStart(8, "0"));
      });
    });

    await t.step("streamed download with bounded memory", async () => {
      await assertTransferBounded(server, async () => {
        const response = await fetch(`${origin}/do/download?size=${TRANSFER_BYTES}`);
        let total = 0;
        for await (const chunk of response.body!) total += chunk.length;
        assert.equal(total, TRANSFER_BYTES);
      });
    });

    await t.step("chunk larger than the response window", async () => {
      const response = await fetch(`${origin}/do/download?sizes=10,1048576,10`, {
        signal: AbortSignal.timeout(20_000),
      });
      const body = new Uint8Array(await response.arrayBuffer());
      assert.equal(response.status, 200);
      assert.equal(body.length, 1_048_596);
    });

    await t.step("SIGTERM drains and stops", async () => {
      const pids = daemonPids(server);
      const slow = getText(origin + "/do/slow?ms=1500");
      const stuck = getText(origin + "/do/slow?ms=30000");
      await delay(300);
      const stopped = server.stop();
      await server.waitForLog(/SIGTERM: stopping gracefully/);
      // A touch while the server stops must not start fresh processes.
      const now = new Date();
      await Deno.utime(siteScript, now, new Date(now.getTime() + 2000));
      const status = await stopped;
      const response = await slow;
      const stuckResponse = await stuck;

      assert.equal(response.status, 200);
      assert.equal(stuckResponse.status, 503);
      assert.equal(status.code, 0);
      assert.match(server.log(), /responses still running after 3000 ms; stopping them/);
      const stopLog = server.log().slice(server.log().indexOf("SIGTERM: stopping gracefully"));
      assert.doesNotMatch(stopLog, /reloading: the script file changed/);
      // The process fails its running request itself, and its last frames
      // reach the front before it exits, unless the front had to kill it first.
      assert.match(
        server.log(),
        /request failed with 503: daemon process \d+(:| was stopped because) the server is shutting down/,
      );
      for (const pid of pids) {
        const alive = (() => {
          try {
            return Deno.statSync(`/proc/${pid}`).isDirectory;
          } catch {
            return false;
          }
        })();
        assert.equal(alive, false, `daemon process ${pid} still runs`);
      }
    });
  } finally {
    await server.stop();
    await Deno.remove(siteDir, { recursive: true });
  }
});
