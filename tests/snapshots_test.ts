/**
 * Memory snapshots: the runtime snapshot cache and application snapshots,
 * through the real server and a real cache folder.
 */

import assert from "node:assert/strict";
import { repoPath, startServer, TEST_CACHE_DIR, type TestServer } from "./helpers/server.ts";
import { loadPyodideFor } from "../wasm/pyodide_loader.ts";
import { PAGE_BYTES, unpackSnapshot } from "../wasm/snapshot_pages.ts";
import { countMatches, delay } from "./helpers/load.ts";
import { cpuTicks } from "./helpers/transfer.ts";
import { buildInWorker, snapshotCacheDir } from "../supervisor/snapshots.ts";
import { appReadPaths, type AppSpec } from "../supervisor/app_spec.ts";
import { pyodideFolder } from "../supervisor/isolate.ts";
import { Logger } from "../supervisor/log.ts";
import { crc32 } from "node:zlib";

const HELLO = `
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]
`;

async function makeApp(files: Record<string, string>): Promise<string> {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-snapshot-app-" });
  for (const [name, text] of Object.entries(files)) {
    await Deno.writeTextFile(`${folder}/${name}`, text);
  }
  return folder;
}

/** Snapshot file names in `folder` that start with `prefix`, most recently used first. */
async function snapshotFiles(folder: string, prefix: string): Promise<string[]> {
  const files: { name: string; used: number }[] = [];
  for await (const entry of Deno.readDir(folder)) {
    if (!entry.name.startsWith(prefix) || !entry.name.endsWith(".snapshot")) continue;
    const info = await Deno.stat(`${folder}/${entry.name}`);
    files.push({ name: entry.name, used: info.mtime?.getTime() ?? 0 });
  }
  return files.sort((a, b) => b.used - a.used).map((file) => file.name);
}

async function body(origin: string, path = "/"): Promise<string> {
  const response = await fetch(origin + path);
  return await response.text();
}

/** Makes sure the shared test cache has the Python 3.14 runtime snapshot. */
async function warmRuntimeSnapshot(): Promise<void> {
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "1",
    "--snapshot",
    "runtime",
  ]);
  assert.equal(await body(server.origin), "hello");
}

Deno.test("runtime snapshot reused from cache", async () => {
  await warmRuntimeSnapshot();
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "1",
    "--snapshot",
    "runtime",
  ]);

  assert.equal(await body(server.origin), "hello");
  assert.doesNotMatch(server.log(), /building the Python 3\.14 runtime snapshot/);
});

interface SnapshotFile {
  /** First line, which names the file format. */
  magic: string;
  /** Second line: the SHA-256 of everything after it. */
  sha256: string;
  /** Third line, the JSON header. */
  header: {
    key: string;
    bytes: number;
    snapshotBytes: number;
    files?: [string, number, number, string][];
  };
  /** The packed snapshot after the header. */
  packed: Uint8Array;
  /** The bytes that the SHA-256 covers: the header line and the packed snapshot. */
  hashed: Uint8Array;
}

/** Returns the parts of a cache file. */
async function snapshotFile(path: string): Promise<SnapshotFile> {
  const data = await Deno.readFile(path);
  const hashStart = data.indexOf(10) + 1;
  const headerStart = data.indexOf(10, hashStart) + 1;
  const headerEnd = data.indexOf(10, headerStart);
  const decoder = new TextDecoder();
  return {
    magic: decoder.decode(data.subarray(0, hashStart - 1)),
    sha256: decoder.decode(data.subarray(hashStart, headerStart - 1)),
    header: JSON.parse(decoder.decode(data.subarray(headerStart, headerEnd))),
    // A copy, because the snapshot is read through 4-byte-aligned views.
    packed: data.slice(headerEnd + 1),
    hashed: data.subarray(headerStart),
  };
}

/** Returns the bytes of a cache file made of `lines` (each without its newline) and `packed`. */
function joinSnapshotFile(lines: string[], packed: Uint8Array): Uint8Array<ArrayBuffer> {
  const head = new TextEncoder().encode(lines.map((line) => line + "\n").join(""));
  const file = new Uint8Array(head.length + packed.length);
  file.set(head);
  file.set(packed, head.length);
  return file;
}

async function sha256Hex(data: Uint8Array): Promise<string> {
  const digest = new Uint8Array(
    await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>),
  );
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** Returns the memory snapshot in a cache file. */
async function snapshotPayload(path: string): Promise<Uint8Array> {
  const { header, packed } = await snapshotFile(path);
  return new Uint8Array(unpackSnapshot(packed, header.snapshotBytes));
}

Deno.test("runtime snapshot includes the adapter", async () => {
  await warmRuntimeSnapshot();
  const [name] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const pyodide = await loadPyodideFor({
    python: "3.14",
    snapshot: await snapshotPayload(`${TEST_CACHE_DIR}/${name}`),
  }) as { runPython(code: string): unknown };

  // Isolates restored from it skip compiling the adapter.
  assert.equal(pyodide.runPython("import sys; '_wsgirun_adapter' in sys.modules"), true);
  assert.equal(pyodide.runPython("sys.modules['_wsgirun_adapter'].host"), undefined);
});

Deno.test("runtime snapshot file holds only data pages", async () => {
  await warmRuntimeSnapshot();
  const [name] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const { header, packed } = await snapshotFile(`${TEST_CACHE_DIR}/${name}`);

  assert.equal(packed.length, header.bytes);
  // About half of a heap image is zero pages, which the file leaves out.
  assert.ok(
    header.bytes < 0.75 * header.snapshotBytes,
    `the file holds ${header.bytes} bytes of a ${header.snapshotBytes}-byte snapshot`,
  );
});

/** Starts a server on `cache` with only the runtime snapshot and returns its log after one request. */
async function runtimeSnapshotStart(cache: string): Promise<string> {
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--snapshot", "runtime"],
    { env: { WSGIRUN_CACHE_DIR: cache } },
  );
  assert.equal(await body(server.origin), "hello");
  return server.log();
}

Deno.test("runtime snapshot corrupt file rebuilt", async () => {
  await warmRuntimeSnapshot();
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const [name] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const data = await Deno.readFile(`${TEST_CACHE_DIR}/${name}`);
  data[data.length - 1000] ^= 0xff;
  await Deno.writeFile(`${cache}/${name}`, data);

  const log = await runtimeSnapshotStart(cache);
  assert.match(log, /is corrupt \(SHA-256 mismatch\)/);
  assert.match(log, /runtime snapshot built/);
  // Two builds of a snapshot need not be byte for byte equal, so the new
  // file is checked against its own hash.
  const rebuilt = await snapshotFile(`${cache}/${name}`);
  assert.equal(await sha256Hex(rebuilt.hashed), rebuilt.sha256);
});

Deno.test("snapshot path of the wrong kind rebuilt", async () => {
  await warmRuntimeSnapshot();
  const [name] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");

  // A FIFO would block the read for ever.
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const mkfifo = await new Deno.Command("mkfifo", { args: [`${cache}/${name}`] }).output();
  assert.equal(mkfifo.code, 0);
  const log = await runtimeSnapshotStart(cache);
  assert.match(log, /runtime-python3\.14-\w+\.snapshot is not a regular file/);
  assert.match(log, /runtime snapshot built/);
  assert.ok((await Deno.stat(`${cache}/${name}`)).isFile);
});

Deno.test("snapshot header of the wrong shape rebuilt", async () => {
  await warmRuntimeSnapshot();
  const [name] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const { magic, sha256, packed } = await snapshotFile(`${TEST_CACHE_DIR}/${name}`);

  for (const header of ["null", '{"key":"x","files":5}', "[]"]) {
    const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
    await Deno.writeFile(`${cache}/${name}`, joinSnapshotFile([magic, sha256, header], packed));

    const log = await runtimeSnapshotStart(cache);
    assert.match(log, /runtime-python3\.14-\w+\.snapshot has a corrupt header/, header);
    assert.match(log, /runtime snapshot built/, header);
  }
});

/** Returns a new cache folder that contains the current Python 3.14 runtime snapshot. */
async function cacheWithRuntimeSnapshot(): Promise<string> {
  await warmRuntimeSnapshot();
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const [runtime] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  await Deno.copyFile(`${TEST_CACHE_DIR}/${runtime}`, `${cache}/${runtime}`);
  return cache;
}

/** Returns a snapshot length other than `snapshotBytes` that `packed` still unpacks to, if there is one. */
function otherUnpackableLength(packed: Uint8Array, snapshotBytes: number): number | undefined {
  // Lengths within the last page keep the page count, which a zero last page allows.
  for (const delta of [-1, 1, -8, 8, 1 - PAGE_BYTES, PAGE_BYTES - 1]) {
    try {
      unpackSnapshot(packed, snapshotBytes + delta);
      return snapshotBytes + delta;
    } catch {
      // This length does not fit the page map, so the next one is tried.
    }
  }
  return undefined;
}

/**
 * Builds the application snapshot of a hello application in a new cache
 * folder. Returns a function that starts the application on that cache, and
 * the snapshot's path.
 */
async function helloWithAppSnapshot(): Promise<{ start: () => Promise<TestServer>; path: string }> {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({ "app.wsgi": HELLO });
  const start = () =>
    startServer(`${folder}/app.wsgi`, ["--threads", "1"], { env: { WSGIRUN_CACHE_DIR: cache } });
  {
    await using server = await start();
    assert.match(server.log(), /application snapshot built/);
  }
  const [name] = await snapshotFiles(cache, "app-");
  return { start, path: `${cache}/${name}` };
}

Deno.test("app snapshot header edits rebuilt", async () => {
  const { start, path } = await helloWithAppSnapshot();
  const name = path.slice(path.lastIndexOf("/") + 1);

  const edits: {
    change: string;
    edit: (file: SnapshotFile) => Uint8Array | Promise<Uint8Array>;
    reason: RegExp;
  }[] = [
    {
      change: "a snapshotBytes that still unpacks",
      edit: (file) => {
        const length = otherUnpackableLength(file.packed, file.header.snapshotBytes);
        assert.ok(
          length !== undefined,
          `no length near ${file.header.snapshotBytes} unpacks ${name}`,
        );
        const header = JSON.stringify({ ...file.header, snapshotBytes: length });
        return joinSnapshotFile([file.magic, file.sha256, header], file.packed);
      },
      reason: /is corrupt \(SHA-256 mismatch\)/,
    },
    {
      change: "an empty list of imported files",
      edit: (file) => {
        const header = JSON.stringify({ ...file.header, files: [] });
        return joinSnapshotFile([file.magic, file.sha256, header], file.packed);
      },
      reason: /is corrupt \(SHA-256 mismatch\)/,
    },
    {
      change: "format version 2, whose SHA-256 in the header covers only the snapshot",
      edit: async (file) => {
        const header = JSON.stringify({ ...file.header, sha256: await sha256Hex(file.packed) });
        return joinSnapshotFile(["WSGIRUN-SNAPSHOT 2", header], file.packed);
      },
      reason: /has another version of the snapshot file format/,
    },
  ];
  for (const { change, edit, reason } of edits) {
    await Deno.writeFile(path, await edit(await snapshotFile(path)));

    await using server = await start();
    assert.equal(await body(server.origin), "hello", change);
    assert.match(server.log(), reason, change);
    assert.match(server.log(), /application snapshot built/, change);
  }
});

Deno.test("unrestorable app snapshot dropped", async () => {
  const { start, path } = await helloWithAppSnapshot();

  // Damage the interpreter's memory in the snapshot but give the file a
  // matching SHA-256, as a faulty build would have written it.
  const file = await snapshotFile(path);
  const quarter = Math.floor(file.packed.length / 4);
  file.packed.fill(0xa5, quarter, 3 * quarter);
  const header = JSON.stringify(file.header);
  const sha256 = await sha256Hex(joinSnapshotFile([header], file.packed));
  await Deno.writeFile(path, joinSnapshotFile([file.magic, sha256, header], file.packed));
  {
    await using server = await start();
    assert.equal(await body(server.origin), "hello");
    assert.match(
      server.log(),
      /the application snapshot .*app-app\.wsgi-\w+\.snapshot could not be restored; deleting it/,
    );
    assert.match(server.log(), /isolates start from the runtime snapshot/);
    assert.doesNotMatch(server.log(), /application marked failed/);
  }
  await using server = await start();
  assert.equal(await body(server.origin), "hello");
  assert.match(server.log(), /building the application snapshot \(no cached snapshot\)/);
});

Deno.test("servers started together build each snapshot once", async () => {
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const folder = await makeApp({ "app.wsgi": HELLO });
  const start = () =>
    startServer(`${folder}/app.wsgi`, ["--threads", "1"], { env: { WSGIRUN_CACHE_DIR: cache } });
  const servers = await Promise.all([start(), start()]);
  await using first = servers[0];
  await using second = servers[1];
  assert.equal(await body(first.origin), "hello");
  assert.equal(await body(second.origin), "hello");

  const logs = first.log() + second.log();
  assert.equal(countMatches(logs, /building the Python 3\.14 runtime snapshot/), 1, logs);
  assert.equal(countMatches(logs, /building the application snapshot/), 1, logs);
  assert.match(logs, /using the runtime snapshot that another build made meanwhile/);
  assert.match(logs, /using the application snapshot that another build made meanwhile/);
});

Deno.test("builds of different snapshots do not wait", async () => {
  await warmRuntimeSnapshot();
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const [runtime] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  await Deno.copyFile(`${TEST_CACHE_DIR}/${runtime}`, `${cache}/${runtime}`);
  // Two applications whose imports each take 1.5 s, so their builds overlap.
  const slowApp = (name: string) =>
    makeApp({
      [`${name}.wsgi`]:
        `import time\nstarted = time.time()\nwhile time.time() - started < 1.5:\n    pass\n${HELLO}`,
    });
  const [first, second] = await Promise.all([slowApp("first"), slowApp("second")]);
  const start = (script: string) =>
    startServer(script, ["--threads", "1"], { env: { WSGIRUN_CACHE_DIR: cache } });

  const servers = await Promise.all([start(`${first}/first.wsgi`), start(`${second}/second.wsgi`)]);
  await using one = servers[0];
  await using two = servers[1];
  assert.equal(await body(one.origin), "hello");
  assert.equal(await body(two.origin), "hello");
  const logs = one.log() + two.log();
  assert.equal(countMatches(logs, /application snapshot built/), 2, logs);
  assert.doesNotMatch(logs, /waiting for another/);
});

/** Returns the names of the lock files in `folder`. */
function lockFiles(folder: string): string[] {
  return Array.from(Deno.readDirSync(folder), (entry) => entry.name).filter((name) =>
    name.endsWith(".lock")
  );
}

Deno.test("lock removed after skipped app snapshot", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({ "app.wsgi": `import js\nHOLDER = js.Object.new()\n${HELLO}` });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--log-level", "debug"],
    { env: { WSGIRUN_CACHE_DIR: cache } },
  );

  assert.equal(await body(server.origin), "hello");
  assert.match(server.log(), /no application snapshot/);
  // The build itself removes the file before it releases the lock, ahead of the cleanup of unused lock files.
  assert.match(
    server.log(),
    /removed the lock file \S*\/app-app\.wsgi-\w+\.snapshot\.lock: no snapshot was kept after its build/,
  );
  assert.deepEqual(lockFiles(cache), []);
});

Deno.test("lock path of the wrong kind reported", async () => {
  await warmRuntimeSnapshot();
  const [runtime] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  // Opening a FIFO for writing would wait for a reader forever.
  const mkfifo = await new Deno.Command("mkfifo", { args: [`${cache}/${runtime}.lock`] }).output();
  assert.equal(mkfifo.code, 0);
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--snapshot", "runtime"],
    { env: { WSGIRUN_CACHE_DIR: cache }, timeoutMs: 120_000 },
  );

  assert.equal(await body(server.origin), "hello");
  assert.match(
    server.log(),
    /WARNING .*snapshot builds are not coordinated: cannot open \S+\.snapshot\.lock: it is not a regular file; remove it/,
  );
  assert.match(server.log(), /runtime snapshot built/);
});

Deno.test("unused lock files removed", async () => {
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const orphanLock = "app-crashed.wsgi-00000000000000aa.snapshot.lock";
  const keptSnapshot = "app-kept.wsgi-00000000000000bb.snapshot";
  const heldLock = "app-building.wsgi-00000000000000cc.snapshot.lock";
  await Deno.writeTextFile(`${cache}/${orphanLock}`, "");
  await Deno.writeTextFile(`${cache}/${keptSnapshot}`, "a snapshot");
  await Deno.writeTextFile(`${cache}/${keptSnapshot}.lock`, "");
  // The test process holds this lock, as a server that builds its snapshot would.
  using holder = await Deno.open(`${cache}/${heldLock}`, { create: true, write: true });
  await holder.lock(true);

  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--snapshot", "off", "--log-level", "debug"],
    { env: { WSGIRUN_CACHE_DIR: cache } },
  );
  assert.equal(await body(server.origin), "hello");
  await server.waitForLog(
    /removed the lock file \S*00000000000000aa\.snapshot\.lock: its snapshot does not exist and no build holds its lock/,
    10_000,
  );
  await server.waitForLog(
    /kept the lock file \S*00000000000000cc\.snapshot\.lock because a build holds its lock/,
    10_000,
  );

  const left = lockFiles(cache);
  assert.ok(!left.includes(orphanLock), "a lock file without its snapshot is removed");
  assert.ok(left.includes(`${keptSnapshot}.lock`), "a lock file next to its snapshot is kept");
  assert.ok(left.includes(heldLock), "a held lock file is kept");
});

Deno.test("build relocks a replaced lock file", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({ "app.wsgi": HELLO });
  const script = `${folder}/app.wsgi`;
  const args = ["--threads", "1", "--log-level", "debug"];
  const env = { WSGIRUN_CACHE_DIR: cache };
  {
    await using server = await startServer(script, args, { env });
    assert.match(server.log(), /application snapshot built/);
  }
  // Without its snapshot the next start builds again, after this test releases the lock.
  const [name] = await snapshotFiles(cache, "app-");
  await Deno.remove(`${cache}/${name}`);
  const lockPath = `${cache}/${name}.lock`;
  using first = await Deno.open(lockPath, { create: true, write: true });
  await first.lock(true);
  await using server = await startServer(script, args, { env, waitForReady: false });
  await server.waitForLog(/waiting for another build of the same snapshot/, 30_000);

  // A holder that removes the file before it releases the lock, and a newer
  // build that has locked a new file at the same path meanwhile.
  await Deno.remove(lockPath);
  using second = await Deno.open(lockPath, { create: true, write: true });
  await second.lock(true);
  await first.unlock();
  await server.waitForLog(/was removed while this build waited for its lock/, 10_000);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  assert.doesNotMatch(
    server.log(),
    /building the application snapshot/,
    "the server built while the new file was locked",
  );

  await second.unlock();
  await server.waitForLog(/application snapshot built/, 60_000);
  assert.equal(await body(server.origin), "hello");
});

Deno.test("app snapshot cached despite future file times", async () => {
  const folder = await makeApp({ "app.wsgi": HELLO });
  // A file system whose clock runs ahead, as network file systems can.
  const future = new Date(Date.now() + 3600_000);
  await Deno.utime(`${folder}/app.wsgi`, future, future);
  const script = `${folder}/app.wsgi`;
  {
    await using server = await startServer(script, ["--threads", "1"]);
    assert.equal(await body(server.origin), "hello");
    assert.match(server.log(), /application snapshot built/);
    assert.doesNotMatch(server.log(), /not cached/);
  }
  await using server = await startServer(script, ["--threads", "1"]);
  assert.equal(await body(server.origin), "hello");
  assert.doesNotMatch(server.log(), /building the application snapshot/);
});

Deno.test("snapshot used when the cache is unwritable", async () => {
  const blocker = await Deno.makeTempFile({ prefix: "wsgirun-not-a-folder-" });
  // A folder inside a regular file cannot be made, not even by root.
  const log = await runtimeSnapshotStart(`${blocker}/cache`);
  assert.match(log, /cannot write the snapshot cache file .*; this run uses the snapshot/);
  assert.match(log, /runtime snapshot built in \d+ ms, for this run only/);
  assert.match(log, /isolates start from the runtime snapshot/);
});

Deno.test("app snapshot used when the cache is unwritable", async () => {
  const blocker = await Deno.makeTempFile({ prefix: "wsgirun-not-a-folder-" });
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"], {
    env: { WSGIRUN_CACHE_DIR: `${blocker}/cache` },
  });
  assert.equal(await body(server.origin), "hello");
  assert.match(server.log(), /application snapshot built in \d+ ms \(.*\), for this run only/);
  assert.match(server.log(), /isolates start from the application snapshot/);
});

Deno.test("runtime snapshot keyed by adapter source", async () => {
  await warmRuntimeSnapshot();
  // A copy of the program whose adapter differs by one comment line.
  const copy = await Deno.makeTempDir({ prefix: "wsgirun-copy-" });
  for (const entry of ["main.ts", "deno.json", "deno.lock", "runtime", "supervisor", "wasm"]) {
    await new Deno.Command("cp", { args: ["-r", repoPath(entry), copy] }).output();
  }
  await Deno.symlink(repoPath("node_modules"), `${copy}/node_modules`);
  const adapter = `${copy}/wasm/adapter.py`;
  await Deno.writeTextFile(adapter, (await Deno.readTextFile(adapter)) + "\n# changed\n");
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const [original] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  await Deno.copyFile(`${TEST_CACHE_DIR}/${original}`, `${cache}/${original}`);

  const folder = await makeApp({ "app.wsgi": HELLO });
  const command = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-all",
      "--config",
      `${copy}/deno.json`,
      `${copy}/main.ts`,
      `${folder}/app.wsgi`,
      "--port",
      "0",
      "--threads",
      "1",
      "--snapshot",
      "runtime",
    ],
    env: { WSGIRUN_CACHE_DIR: cache },
    stdout: "null",
    stderr: "piped",
  });
  const child = command.spawn();
  let log = "";
  const decoder = new TextDecoder();
  for await (const chunk of child.stderr) {
    log += decoder.decode(chunk, { stream: true });
    if (/isolate ready|cannot|failed/.test(log)) break;
  }
  child.kill("SIGTERM");
  await child.status;

  assert.match(
    log,
    /building the Python 3\.14 runtime snapshot \(the cached one is of another wsgirun or Pyodide build\)/,
  );
  const files = await snapshotFiles(cache, "runtime-python3.14-");
  assert.equal(files.length, 2);
  assert.ok(files.includes(original));
});

Deno.test("runtime snapshots of old builds removed", async () => {
  await warmRuntimeSnapshot();
  const cache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const [current] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  await Deno.copyFile(`${TEST_CACHE_DIR}/${current}`, `${cache}/${current}`);
  const day = 24 * 3600 * 1000;
  const stale = {
    "runtime-python3.14-00000000000000aa.snapshot": 8 * day,
    "runtime-python3.12-00000000000000bb.snapshot": 30 * day,
    "runtime-python3.14-00000000000000cc.snapshot": 1 * day,
    "app-other.wsgi-00000000000000dd.snapshot": 30 * day,
    "app-other.wsgi-00000000000000ee.snapshot.4242.1a2b3c4d.tmp": 2 * day,
    "app-other.wsgi-00000000000000ff.snapshot.4243.1a2b3c4d.tmp": 0.1 * day,
  };
  await Deno.mkdir(`${cache}/runtime-python3.14-00000000000000ab.snapshot`);
  const folderTime = new Date(Date.now() - 30 * day);
  await Deno.utime(`${cache}/runtime-python3.14-00000000000000ab.snapshot`, folderTime, folderTime);
  for (const [name, age] of Object.entries(stale)) {
    await Deno.writeTextFile(`${cache}/${name}`, "an old build");
    const used = new Date(Date.now() - age);
    await Deno.utime(`${cache}/${name}`, used, used);
  }
  const old = new Date(Date.now() - 60 * day);
  await Deno.utime(`${cache}/${current}`, old, old);

  // Without snapshots the server neither reads nor touches the current one.
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--snapshot", "off"],
    { env: { WSGIRUN_CACHE_DIR: cache } },
  );
  assert.equal(await body(server.origin), "hello");
  await server.waitForLog(/removed .*runtime-python3\.12-00000000000000bb\.snapshot/, 10_000);
  await server.waitForLog(
    /removed .*runtime-python3\.14-00000000000000aa\.snapshot: .* unused for 8 days/,
    10_000,
  );

  const left = await snapshotFiles(cache, "");
  assert.ok(left.includes(current), "the current runtime snapshot is kept, however old");
  assert.ok(
    left.includes("runtime-python3.14-00000000000000cc.snapshot"),
    "a recently used one is kept",
  );
  assert.ok(
    left.includes("app-other.wsgi-00000000000000dd.snapshot"),
    "application snapshots are left alone",
  );
  assert.ok(!left.includes("runtime-python3.14-00000000000000aa.snapshot"));
  assert.ok(!left.includes("runtime-python3.12-00000000000000bb.snapshot"));
  await server.waitForLog(
    /removed .*00000000000000ee\.snapshot\.4242\.1a2b3c4d\.tmp: a temporary file/,
    10_000,
  );
  const entries = Array.from(Deno.readDirSync(cache), (entry) => entry.name);
  assert.ok(
    entries.includes("app-other.wsgi-00000000000000ff.snapshot.4243.1a2b3c4d.tmp"),
    "a recent temporary file may belong to a running build",
  );
  assert.ok(
    entries.includes("runtime-python3.14-00000000000000ab.snapshot"),
    "a folder is never removed",
  );
});

Deno.test("runtime snapshot keyed by Pyodide version", async () => {
  const names314 = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "1",
    "--python",
    "3.12",
    "--snapshot",
    "runtime",
  ]);

  assert.equal(await body(server.origin), "hello");
  const names312 = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.12-");
  assert.ok(names312.length >= 1);
  assert.ok(!names314.includes(names312[0]));
});

Deno.test("app snapshot reused then rebuilt on edit", async () => {
  const folder = await makeApp({
    "app.wsgi": `
import settings_module
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [settings_module.VALUE.encode()]
`,
    "settings_module.py": 'VALUE = "first"\n',
  });
  const script = `${folder}/app.wsgi`;

  {
    await using server = await startServer(script, ["--threads", "1"]);
    assert.equal(await body(server.origin), "first");
    assert.match(server.log(), /application snapshot built/);
  }
  // A start from the application snapshot counts as a use of its runtime snapshot.
  const [runtime] = await snapshotFiles(TEST_CACHE_DIR, "runtime-python3.14-");
  const longAgo = new Date(Date.now() - 30 * 24 * 3600 * 1000);
  await Deno.utime(`${TEST_CACHE_DIR}/${runtime}`, longAgo, longAgo);
  {
    await using server = await startServer(script, ["--threads", "1"]);
    assert.equal(await body(server.origin), "first");
    assert.doesNotMatch(server.log(), /building the application snapshot/);
  }
  const used = (await Deno.stat(`${TEST_CACHE_DIR}/${runtime}`)).mtime!.getTime();
  assert.ok(
    Date.now() - used < 60_000,
    `the runtime snapshot was last used at ${new Date(used).toISOString()}`,
  );

  await Deno.writeTextFile(`${folder}/settings_module.py`, 'VALUE = "second, edited"\n');
  {
    await using server = await startServer(script, ["--threads", "1"]);
    assert.equal(await body(server.origin), "second, edited");
    assert.match(
      server.log(),
      /building the application snapshot \(.*settings_module\.py changed\)/,
    );
  }
});

/** Returns the text of a module that takes 2 s to import and sets VERSION. */
function slowModule(version: string): string {
  return `import time\nstarted = time.time()\nwhile time.time() - started < 2:\n    pass\nVERSION = "${version}"\n`;
}

/** Makes an application that returns the VERSION of its slow module, "first" to begin with. */
function makeSlowApp(): Promise<string> {
  return makeApp({
    "app.wsgi": `
import slow_module
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [slow_module.VERSION.encode()]
`,
    "slow_module.py": slowModule("first"),
  });
}

/**
 * Ways to change the slow module while its import runs: an edit, and a file
 * moved into place with an older modification time, as `mv`, `tar x` and
 * `rsync -a` leave it.
 */
const CHANGES_DURING_BUILD: {
  name: string;
  prepare(folder: string): Promise<void>;
  change(folder: string): Promise<void>;
}[] = [
  {
    name: "edit",
    prepare: async () => {},
    change: (folder) => Deno.writeTextFile(`${folder}/slow_module.py`, slowModule("second")),
  },
  {
    name: "file moved in",
    prepare: async (folder) => {
      await Deno.writeTextFile(`${folder}/prepared.txt`, slowModule("second"));
      const longAgo = new Date(Date.now() - 300 * 24 * 3600 * 1000);
      await Deno.utime(`${folder}/prepared.txt`, longAgo, longAgo);
    },
    change: (folder) => Deno.rename(`${folder}/prepared.txt`, `${folder}/slow_module.py`),
  },
];

for (const { name, prepare, change } of CHANGES_DURING_BUILD) {
  Deno.test(`app snapshot not cached after ${name} during build`, async () => {
    const folder = await makeSlowApp();
    const script = `${folder}/app.wsgi`;
    await prepare(folder);

    {
      await using server = await startServer(script, ["--threads", "1"], {
        waitForReady: false,
      });
      await server.waitForLog(/building the application snapshot/, 30_000);
      await new Promise((resolve) => setTimeout(resolve, 1000));
      await change(folder);
      await server.waitForLog(
        /application snapshot not cached: .*slow_module\.py changed while/,
        30_000,
      );
      // This run keeps what it imported, as if the change came after its start.
      assert.equal(await body(server.origin), "first");
    }
    await using server = await startServer(script, ["--threads", "1"]);
    assert.equal(await body(server.origin), "second");
    assert.match(server.log(), /application snapshot built/);
  });
}

/**
 * Returns a script that runs `imports`, then tries to import optional_module,
 * and returns the WHERE of `module` and of optional_module ("none" without it).
 */
function optionalImportApp(imports: string, module: string): string {
  return `
${imports}
try:
    import optional_module
except ImportError:
    optional_module = None
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    found = getattr(optional_module, "WHERE", "none")
    return [("%s %s" % (${module}.WHERE, found)).encode()]
`;
}

/** Starts one isolate of `script` with `library` on its python-path and `cache` as its cache. */
function startWithLibrary(script: string, library: string, cache: string) {
  return startServer(script, ["--threads", "1", "--python-path", library], {
    env: { WSGIRUN_CACHE_DIR: cache },
  });
}

Deno.test("app snapshot rebuilt when a module appears on the import path", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": optionalImportApp("import helper", "helper"),
  });
  const library = await Deno.makeTempDir({ prefix: "wsgirun-snapshot-lib-" });
  await Deno.writeTextFile(`${library}/helper.py`, 'WHERE = "library"\n');
  const run = async () => {
    await using server = await startWithLibrary(`${folder}/app.wsgi`, library, cache);
    return { text: await body(server.origin), log: server.log() };
  };

  let result = await run();
  assert.equal(result.text, "library none");
  assert.match(result.log, /application snapshot built/);

  // Files that no import can find leave the snapshot in use.
  await Deno.writeTextFile(`${library}/notes.txt`, "not a module");
  await Deno.mkdir(`${library}/__pycache__`);
  result = await run();
  assert.equal(result.text, "library none");
  assert.doesNotMatch(result.log, /building the application snapshot/);

  // An optional import that failed at build time now succeeds.
  await Deno.writeTextFile(`${library}/optional_module.py`, 'WHERE = "optional"\n');
  result = await run();
  assert.equal(result.text, "library optional");
  assert.match(
    result.log,
    new RegExp(
      `building the application snapshot \\(the modules, packages or \\.pth files in ${library} changed\\)`,
    ),
  );

  // The script's folder comes before the python-path: its new module takes the import over.
  await Deno.writeTextFile(`${folder}/helper.py`, 'WHERE = "script folder"\n');
  result = await run();
  assert.equal(result.text, "script folder optional");
  assert.match(result.log, /the modules, packages or \.pth files in .* changed/);
});

Deno.test("python-path .pth files add folders", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": `
import sys
import from_pth
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("\\n".join([from_pth.WHERE] + sys.path)).encode()]
`,
  });
  const library = await Deno.makeTempDir({ prefix: "wsgirun-pth-lib-" });
  // Isolates read only the application's folders, so a .pth file names one inside them.
  const extra = `${library}/vendor`;
  await Deno.mkdir(extra);
  await Deno.writeTextFile(`${extra}/from_pth.py`, 'WHERE = "named by a .pth file"\n');
  // A folder outside them is skipped, with a warning that names the option that adds it.
  const outside = await Deno.makeTempDir({ prefix: "wsgirun-pth-outside-" });
  await Deno.writeTextFile(`${library}/extra.pth`, `# a comment line\n${extra}\n${outside}\n`);
  for (let run = 0; run < 2; run++) {
    await using server = await startWithLibrary(`${folder}/app.wsgi`, library, cache);
    const [where, ...path] = (await body(server.origin)).split("\n");
    assert.equal(where, "named by a .pth file");
    assert.ok(!path.includes(outside), path.join(" "));
    assert.match(
      server.log(),
      new RegExp(
        `WARNING .*${library}/extra\\.pth lists ${outside}, which lies outside the application's folders.*; add it with --python-path`,
      ),
    );
    assert.equal(server.log().match(/lies outside the application's folders/g)?.length, 1);
    // The folders a .pth file names come after the python-path, before the standard library.
    const standardLibrary = path.findIndex((entry) => /^\/lib\/python3/.test(entry));
    assert.ok(path.indexOf(library) >= 0, path.join(" "));
    assert.ok(path.indexOf(library) < path.indexOf(extra), path.join(" "));
    assert.ok(path.indexOf(extra) < standardLibrary, path.join(" "));
    if (run === 1) assert.match(server.log(), /isolates start from the application snapshot/);
  }

  // A .pth file that names another folder rebuilds the snapshot.
  const other = `${library}/vendor2`;
  await Deno.mkdir(other);
  await Deno.writeTextFile(`${other}/from_pth.py`, 'WHERE = "named by the edited .pth file"\n');
  await Deno.writeTextFile(`${library}/extra.pth`, `${other}\n`);
  await using server = await startWithLibrary(`${folder}/app.wsgi`, library, cache);
  assert.equal((await body(server.origin)).split("\n")[0], "named by the edited .pth file");
  assert.match(server.log(), /the modules, packages or \.pth files in .* changed/);
});

/** Returns a zip archive that stores `files` uncompressed. */
function storedZip(files: Record<string, string>): Uint8Array {
  const encoder = new TextEncoder();
  const locals: Uint8Array[] = [];
  const centrals: Uint8Array[] = [];
  let offset = 0;
  for (const [name, text] of Object.entries(files)) {
    const nameBytes = encoder.encode(name);
    const data = encoder.encode(text);
    const crc = crc32(data);

    const local = new Uint8Array(30 + nameBytes.length + data.length);
    const view = new DataView(local.buffer);
    view.setUint32(0, 0x04034b50, true);
    view.setUint16(4, 20, true);
    view.setUint16(12, 33, true); // 1 January 1980
    view.setUint32(14, crc, true);
    view.setUint32(18, data.length, true);
    view.setUint32(22, data.length, true);
    view.setUint16(26, nameBytes.length, true);
    local.set(nameBytes, 30);
    local.set(data, 30 + nameBytes.length);

    const central = new Uint8Array(46 + nameBytes.length);
    const centralView = new DataView(central.buffer);
    centralView.setUint32(0, 0x02014b50, true);
    centralView.setUint16(4, 20, true);
    centralView.setUint16(6, 20, true);
    centralView.setUint16(14, 33, true);
    centralView.setUint32(16, crc, true);
    centralView.setUint32(20, data.length, true);
    centralView.setUint32(24, data.length, true);
    centralView.setUint16(28, nameBytes.length, true);
    centralView.setUint32(42, offset, true);
    central.set(nameBytes, 46);

    locals.push(local);
    centrals.push(central);
    offset += local.length;
  }

  const centralSize = centrals.reduce((sum, part) => sum + part.length, 0);
  const end = new Uint8Array(22);
  const endView = new DataView(end.buffer);
  endView.setUint32(0, 0x06054b50, true);
  endView.setUint16(8, centrals.length, true);
  endView.setUint16(10, centrals.length, true);
  endView.setUint32(12, centralSize, true);
  endView.setUint32(16, offset, true);
  const out = new Uint8Array(offset + centralSize + end.length);
  let at = 0;
  for (const part of [...locals, ...centrals, end]) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

Deno.test("app snapshot of a module from a zip archive", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": optionalImportApp(
      `import os, sys
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "modules.zip"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "optional.zip"))
import zipped_module`,
      "zipped_module",
    ),
  });
  const run = async () => {
    await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"], {
      env: { WSGIRUN_CACHE_DIR: cache },
    });
    return { text: await body(server.origin), log: server.log() };
  };

  await Deno.writeFile(`${folder}/modules.zip`, storedZip({ "zipped_module.py": 'WHERE = "zip"' }));
  await Deno.writeFile(`${folder}/optional.zip`, storedZip({ "other.py": "" }));
  let result = await run();
  assert.equal(result.text, "zip none");
  assert.match(result.log, /application snapshot built/);
  assert.doesNotMatch(result.log, /no application snapshot/);

  await Deno.writeFile(
    `${folder}/modules.zip`,
    storedZip({ "zipped_module.py": 'WHERE = "zip, edited"' }),
  );
  result = await run();
  assert.equal(result.text, "zip, edited none");
  assert.match(result.log, /building the application snapshot \(.*modules\.zip changed\)/);

  // A module added to an archive that nothing was imported from.
  await Deno.writeFile(
    `${folder}/optional.zip`,
    storedZip({ "other.py": "", "optional_module.py": 'WHERE = "added"' }),
  );
  result = await run();
  assert.equal(result.text, "zip, edited added");
  assert.match(result.log, /the modules, packages or \.pth files in .*optional\.zip changed/);
});

Deno.test("app snapshot of an application that writes while it imports", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const data = await Deno.makeTempDir({ prefix: "wsgirun-import-writes-" });
  const folder = await makeApp({
    "app.wsgi": `
import os
with open(os.path.join(${JSON.stringify(data)}, "started.txt"), "w") as file:
    file.write("imported")
${HELLO}`,
  });
  await using server = await startServer(
    `${folder}/app.wsgi`,
    ["--threads", "1", "--write", data],
    {
      env: { WSGIRUN_CACHE_DIR: cache },
    },
  );

  // The snapshot build may write where the isolates may.
  assert.equal(await body(server.origin), "hello");
  assert.match(server.log(), /application snapshot built/);
  assert.doesNotMatch(server.log(), /fatal error|no application snapshot/);
  assert.equal(await Deno.readTextFile(`${data}/started.txt`), "imported");
});

Deno.test("cache file that others may write rebuilt", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({ "app.wsgi": HELLO });
  const run = async () => {
    await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"], {
      env: { WSGIRUN_CACHE_DIR: cache },
    });
    assert.equal(await body(server.origin), "hello");
    return server.log();
  };
  const first = await run();
  assert.doesNotMatch(first, /snapshot cache folder/);
  const [snapshot] = await snapshotFiles(cache, "app-app.wsgi-");
  await Deno.chmod(`${cache}/${snapshot}`, 0o666);
  // A folder that every user may write gets a warning; with the sticky bit it is safe.
  await Deno.chmod(cache, 0o777);

  const log = await run();
  assert.match(
    log,
    /building the application snapshot \(.*app-app\.wsgi-\w+\.snapshot may be written by other users \(mode 666\)\)/,
  );
  assert.equal((await Deno.stat(`${cache}/${snapshot}`)).mode! & 0o777, 0o600);
  assert.match(
    log,
    /WARNING .*the snapshot cache folder \S+ may be written by every user \(mode 777\).*run `chmod 700 /,
  );

  await Deno.chmod(cache, 0o1777);
  assert.doesNotMatch(await run(), /snapshot cache folder/);
});

Deno.test("relative cache folder resolved against the working folder", () => {
  const saved = Deno.env.get("WSGIRUN_CACHE_DIR");
  Deno.env.set("WSGIRUN_CACHE_DIR", "relative/cache");
  try {
    // Daemon processes get this path and run in the application's folder.
    assert.equal(snapshotCacheDir(), `${Deno.cwd()}/relative/cache`);
  } finally {
    if (saved === undefined) Deno.env.delete("WSGIRUN_CACHE_DIR");
    else Deno.env.set("WSGIRUN_CACHE_DIR", saved);
  }
});

Deno.test("app snapshot skipped for open file", async () => {
  const folder = await makeApp({
    "data.txt": "kept open",
    "app.wsgi": `
import os
DATA = open(os.path.join(os.path.dirname(__file__), "data.txt"), "rb")
def application(environ, start_response):
    DATA.seek(0)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [DATA.read()]
`,
  });
  await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"]);

  assert.equal(await body(server.origin), "kept open");
  assert.match(server.log(), /no application snapshot.*keeps 1 file\(s\) open/);
});

Deno.test("app snapshot skipped for JavaScript object", async () => {
  const folder = await makeApp({
    "app.wsgi": `
import js
HOLDER = js.Object.new()
HOLDER.greeting = "from a JavaScript object"
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(HOLDER.greeting).encode()]
`,
  });
  await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"]);

  assert.equal(await body(server.origin), "from a JavaScript object");
  assert.match(
    server.log(),
    /no application snapshot.*keeps a reference to a JavaScript object after its import/,
  );
});

Deno.test("snapshot build logs foreign extension at info", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  // An x86 build of a C extension next to a package that falls back without it.
  const folder = await makeApp({
    "app.wsgi": `try:
    import fake_speedups
except ImportError:
    pass
${HELLO}`,
  });
  await Deno.writeFile(
    `${folder}/fake_speedups.cpython-312-x86_64-linux-gnu.so`,
    new Uint8Array([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]),
  );
  await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"], {
    env: { WSGIRUN_CACHE_DIR: cache },
  });

  assert.equal(await body(server.origin), "hello");
  assert.match(server.log(), /application snapshot built/);
  assert.match(
    server.log(),
    /INFO .*cannot import fake_speedups: .* is a C extension built for another platform/,
  );
  assert.doesNotMatch(server.log(), /WARNING .*fake_speedups/);
});

Deno.test("snapshot files readable by owner only", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": `import os
TOKEN = os.environ["TOKEN"]
${HELLO}`,
  });
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "1",
    "--env",
    "TOKEN=not-for-others",
  ], {
    env: { WSGIRUN_CACHE_DIR: `${cache}/shared/sub` },
  });
  assert.equal(await body(server.origin), "hello");

  // The application snapshot contains the variable's value, as the application's memory does.
  const [snapshot] = await snapshotFiles(`${cache}/shared/sub`, "app-app.wsgi-");
  assert.equal((await Deno.stat(`${cache}/shared/sub/${snapshot}`)).mode! & 0o777, 0o600);
  assert.equal((await Deno.stat(`${cache}/shared/sub`)).mode! & 0o777, 0o700);
  // A folder above the cache that the server created keeps the usual mode.
  assert.equal((await Deno.stat(`${cache}/shared`)).mode! & 0o777, 0o777 & ~Deno.umask());
});

Deno.test("restored isolates get fresh random state", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": `
import random
import tempfile

# Drawn once here, so the generator's state is in the application snapshot.
random.random()
next(tempfile._get_candidate_names())

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [("%r %s" % (random.random(), next(tempfile._get_candidate_names()))).encode()]
`,
  });
  const firstValues: string[] = [];
  for (let run = 0; run < 2; run++) {
    await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"], {
      env: { WSGIRUN_CACHE_DIR: cache },
    });
    firstValues.push(await body(server.origin));
    if (run === 1) assert.match(server.log(), /isolates start from the application snapshot/);
  }

  const [numberA, nameA] = firstValues[0].split(" ");
  const [numberB, nameB] = firstValues[1].split(" ");
  assert.notEqual(numberA, numberB);
  assert.notEqual(nameA, nameB);
});

Deno.test("values drawn at import differ between application snapshots", async () => {
  const cache = await cacheWithRuntimeSnapshot();
  const folder = await makeApp({
    "app.wsgi": `
import random
DRAWN = random.random()
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [repr(DRAWN).encode()]
`,
  });
  const values: string[] = [];
  // Two settings give two application snapshots built on the same runtime snapshot.
  for (const setting of ["NAME=first", "NAME=second"]) {
    await using server = await startServer(`${folder}/app.wsgi`, [
      "--threads",
      "1",
      "--env",
      setting,
    ], { env: { WSGIRUN_CACHE_DIR: cache } });
    values.push(await body(server.origin));
    assert.match(server.log(), /application snapshot built/);
  }
  assert.notEqual(values[0], values[1]);
});

Deno.test("snapshot off starts from scratch", async () => {
  const folder = await makeApp({ "app.wsgi": HELLO });
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "1",
    "--snapshot",
    "off",
  ]);

  assert.equal(await body(server.origin), "hello");
  assert.doesNotMatch(server.log(), /snapshot/);
});

Deno.test("bundle uses shipped runtime snapshot", async () => {
  const out = await Deno.makeTempDir({ prefix: "wsgirun-bundle-" });
  for (const script of ["build/bundle.ts", "build/snapshots.ts"]) {
    const target = script === "build/bundle.ts" ? out : `${out}/snapshots`;
    const built = await new Deno.Command(Deno.execPath(), {
      args: ["run", "--allow-all", "--config", repoPath("deno.json"), repoPath(script), target],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert.equal(built.code, 0, new TextDecoder().decode(built.stderr));
  }
  // Daemon processes of other users read these files, and a package
  // installs them with an owner of its own: they are trusted as the code is.
  assert.equal((await Deno.stat(`${out}/snapshots`)).mode! & 0o777, 0o755);
  for await (const file of Deno.readDir(`${out}/snapshots`)) {
    const path = `${out}/snapshots/${file.name}`;
    assert.equal((await Deno.stat(path)).mode! & 0o777, 0o644, path);
    if (Deno.uid() === 0) await Deno.chown(path, 65534, 65534);
  }
  const folder = await makeApp({ "app.wsgi": HELLO });
  const emptyCache = await Deno.makeTempDir({ prefix: "wsgirun-cache-" });
  const log = await logUntilReady(
    [
      "run",
      "--allow-all",
      "--no-config",
      "--unstable-worker-options",
      "--unstable-no-legacy-abort",
      `${out}/wsgirun.js`,
      `${folder}/app.wsgi`,
      "--port",
      "0",
      "--threads",
      "1",
      "--snapshot",
      "runtime",
      "--log-level",
      "debug",
    ],
    out,
    emptyCache,
  );

  assert.match(log, /runtime snapshot from the program's own files/);
  assert.doesNotMatch(log, /building the Python/);
  assert.match(log, /isolate ready/);
});

/**
 * Runs Deno with `args` in `cwd` until an isolate is ready or the start
 * fails, stops it with SIGTERM and returns its log.
 */
async function logUntilReady(args: string[], cwd: string, cacheDir: string): Promise<string> {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd,
    env: { WSGIRUN_CACHE_DIR: cacheDir },
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let log = "";
  const decoder = new TextDecoder();
  for await (const chunk of child.stderr) {
    log += decoder.decode(chunk, { stream: true });
    if (/isolate ready|failed|Error/.test(log)) break;
  }
  child.kill("SIGTERM");
  await child.status;
  return log;
}

Deno.test("snapshot build that hangs stops its thread", async () => {
  const folder = await makeApp({ "app.wsgi": "while True:\n    pass\n" });
  const app: AppSpec = {
    name: "app.wsgi",
    scriptPath: `${folder}/app.wsgi`,
    callable: "application",
    python: "3.14",
    pythonPath: [folder],
    preload: false,
  };
  const build = buildInWorker(
    { type: "build-snapshot", python: "3.14", modules: [], base: null, wasmModule: null, app },
    [pyodideFolder("3.14"), ...appReadPaths(app)],
    new Logger("critical"),
    8000,
  );
  await assert.rejects(build, /timed out after 8000 ms/);

  // A worker thread that still ran the import's loop would use a core.
  const before = cpuTicks(Deno.pid);
  await delay(1500);
  const used = (cpuTicks(Deno.pid) - before) / 100;
  assert.ok(used < 0.75, `the process used ${used} s of CPU in 1.5 s after the build stopped`);
});

Deno.test("fresh checkout compiles the wasm module once", async () => {
  // A checkout without node_modules, where Deno installs Pyodide only when
  // a module first imports it.
  const checkout = await Deno.makeTempDir({ prefix: "wsgirun-checkout-" });
  const parts = ["main.ts", "deno.json", "deno.lock", "runtime", "supervisor", "wasm", "examples"];
  const copy = await new Deno.Command("cp", {
    args: ["-r", ...parts.map((part) => repoPath(part)), checkout],
  }).output();
  assert.equal(copy.code, 0, new TextDecoder().decode(copy.stderr));
  const log = await logUntilReady(
    ["run", "--allow-all", "main.ts", "examples/hello/app.wsgi", "--port", "0"],
    checkout,
    TEST_CACHE_DIR,
  );

  assert.match(log, /isolate ready/);
  assert.doesNotMatch(log, /cannot compile Pyodide's wasm module/);
  assert.ok((await Deno.stat(`${checkout}/node_modules`)).isDirectory);
});

Deno.test("text printed at import is logged without a request", async () => {
  const folder = await makeApp({
    "app.wsgi": `import sys
print("import line")
print("import text without newline", end="")
sys.stderr.write("import error text without newline")
${HELLO}`,
  });
  const cases = [["--threads", "2"], ["--threads", "2", "--snapshot", "runtime", "--preload"]];
  for (const args of cases) {
    await using server = await startServer(`${folder}/app.wsgi`, args);
    assert.equal(await body(server.origin), "hello");
    assert.equal(await body(server.origin), "hello");
    const log = server.log();

    for (const text of ["import line", "import text without newline"]) {
      assert.match(log, new RegExp(`INFO \\[[^\\]]*\\] ${text}$`, "m"), args.join(" "));
    }
    assert.match(log, /WARNING \[[^\]]*\] import error text without newline$/m);
    assert.doesNotMatch(log, /request=\S+\] import/, args.join(" "));
  }
});
