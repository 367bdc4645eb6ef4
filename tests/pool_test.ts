/**
 * Scheduling across isolates: a request posted behind a running one moves to
 * an isolate that becomes free first, the order in which a pool starts its
 * isolates, and how stop signals drain the running requests.
 */

import assert from "node:assert/strict";
import { listensOn, repoPath, startServer, type TestServer } from "./helpers/server.ts";
import { countMatches, delay, runLoad, runLoadFor, waitForCount } from "./helpers/load.ts";
import { cpuTicks } from "./helpers/transfer.ts";

/** A request of sendInOrder: its name, how long it sleeps, and the pause before it is sent. */
type PlannedRequest = [name: string, seconds: number, pauseMs: number];

/**
 * Starts the pool test app with 2 isolates, sends the planned requests one
 * after another, and returns their names in the order their responses ended.
 */
async function sendInOrder(plan: PlannedRequest[]): Promise<string[]> {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "2",
  ]);
  await server.waitForLog(/isolate=2\] isolate ready/);
  const finished: string[] = [];
  const requests: Promise<void>[] = [];
  for (const [name, seconds, pauseMs] of plan) {
    await delay(pauseMs);
    requests.push((async () => {
      const response = await fetch(`${server.origin}/?seconds=${seconds}`);
      assert.equal(response.status, 200);
      await response.text();
      finished.push(name);
    })());
  }
  await Promise.all(requests);
  return finished;
}

Deno.test("waiting request moves to free isolate", async () => {
  // Both isolates busy: the long request on one, the short one on the other.
  // "waiting" is posted behind a running request; whichever isolate frees
  // first must run it, so it never waits for the long request.
  const finished = await sendInOrder([["long", 4, 0], ["short", 0.5, 300], ["waiting", 0, 200]]);

  // "waiting" may run right behind "short", so this client can see the two
  // replies in either order. Either way it must not wait for "long".
  assert.equal(finished.at(-1), "long");
  assert.ok(finished.indexOf("waiting") < finished.indexOf("long"));
});

Deno.test("waiting request runs before later ones", async () => {
  // "waiting" is posted behind one of the running requests, then requests
  // that arrive later fill the queue and keep the isolate that frees first busy.
  const later = Array.from({ length: 6 }, (_, i): PlannedRequest => [`later${i}`, 0.5, 100]);
  const finished = await sendInOrder([
    ["long", 4, 0],
    ["short", 1, 300],
    ["waiting", 0, 200],
    ...later,
  ]);

  assert.ok(finished.indexOf("waiting") < finished.indexOf("long"), finished.join(" "));
  assert.ok(finished.indexOf("waiting") < finished.indexOf("later0"), finished.join(" "));
});

Deno.test("held request not overtaken by a later slow one", async () => {
  // "waiting" is held behind "medium"; the later request must not take its place in line.
  const finished = await sendInOrder([
    ["medium", 1, 0],
    ["long", 4, 200],
    ["waiting", 0, 200],
    ["later", 2, 300],
  ]);

  assert.ok(finished.indexOf("waiting") < finished.indexOf("later"), finished.join(" "));
});

Deno.test("long request with fast ones around it", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "2",
  ]);
  await server.waitForLog(/isolate=2\] isolate ready/);
  // While one isolate computes, fast requests are posted behind it and
  // moved to the other one, again and again. Each move leaves an entry in
  // the busy isolate's inbox that it skips only once its request is over.
  for (let round = 0; round < 3; round++) {
    const long = fetch(`${server.origin}/?cpu=1.5`);
    await delay(200);
    let fast = 0;
    let slowest = 0;
    const deadline = performance.now() + 2000;
    // Three clients keep the free isolate busy, so a request posted behind
    // the long one would wait for it unless the pool moves it.
    const client = async () => {
      while (performance.now() < deadline) {
        const started = performance.now();
        const response = await fetch(`${server.origin}/?seconds=0`);
        assert.equal(response.status, 200);
        await response.text();
        slowest = Math.max(slowest, performance.now() - started);
        fast += 1;
      }
    };
    await Promise.all([client(), client(), client()]);
    const response = await long;
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "computed");
    assert.ok(fast > 50, `only ${fast} fast requests were served`);
    assert.ok(slowest < 1000, `a fast request took ${Math.round(slowest)} ms`);
  }
  assert.doesNotMatch(server.log(), /ERROR|CRITICAL/);
});

Deno.test("embedded pool grows and shrinks", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "3", "--min-threads", "1", "--inactivity-timeout", "1"],
  );
  assert.match(server.log(), /\(Python 3\.14, 1 to 3 isolates\)/);
  // An idle pool at its minimum starts no other isolate.
  assert.doesNotMatch(server.log(), /isolate=2\]/);

  // Three requests at once: the pool adds isolates, one at a time, while they wait.
  const statuses = await Promise.all(
    [1, 2, 3].map(async () => {
      const response = await fetch(`${server.origin}/?seconds=1.5`);
      await response.text();
      return response.status;
    }),
  );
  assert.deepEqual(statuses, [200, 200, 200]);
  assert.match(server.log(), /isolate=2\] isolate ready/);
  assert.match(server.log(), /isolate=3\] isolate ready/);
  assert.doesNotMatch(server.log(), /isolate=4\]/);

  // Once idle for --inactivity-timeout, the isolates above --min-threads retire.
  await waitForCount(server, /isolate retired after \d+ s idle/, 2, 0, 20_000);
  assert.equal((await fetch(`${server.origin}/`)).status, 200);
});

Deno.test({
  name: "pool grows past cores for blocked requests",
  // With 5 cores or more the pool may grow to 5 isolates at once, which this test rules out.
  ignore: navigator.hardwareConcurrency >= 5,
  fn: async () => {
    await using server = await startServer(
      repoPath("tests/fixtures/pool_app.wsgi"),
      ["--threads", "6", "--min-threads", "1"],
    );
    // Requests that take a millisecond keep every isolate busy at 32
    // connections. Isolates beyond the cores would only share them, so the
    // pool grows past the cores only for a request that runs long.
    const result = await runLoadFor(`${server.origin}/?seconds=0`, 32, 4000);
    assert.deepEqual(result.failures, []);
    assert.ok(result.ok > 100, `only ${result.ok} requests were served`);
    assert.doesNotMatch(server.log(), /isolate=5\]/);

    // Requests that sleep leave the cores free, so they do make it grow past
    // them, even when each one is short.
    for (let round = 0; round < 3; round++) {
      const statuses = await Promise.all(
        [1, 2, 3, 4, 5, 6].map(async () => {
          const response = await fetch(`${server.origin}/?seconds=0.5`);
          await response.text();
          return response.status;
        }),
      );
      assert.deepEqual(statuses, [200, 200, 200, 200, 200, 200]);
    }
    assert.match(server.log(), /isolate=5\] isolate ready/);
  },
});

Deno.test({
  name: "long requests grow pool past cores",
  ignore: navigator.hardwareConcurrency >= 3,
  fn: async () => {
    await using server = await startServer(
      repoPath("tests/fixtures/pool_app.wsgi"),
      ["--threads", "3", "--min-threads", "1", "--request-timeout", "8"],
    );
    // Three requests that compute without end: once one has run for 0.25 s, the
    // one still waiting gets an isolate of its own.
    const spins = [1, 2, 3].map(async () => {
      const response = await fetch(`${server.origin}/?spin=1`);
      await response.text();
      return response.status;
    });
    await server.waitForLog(/isolate=3\] isolate ready/, 6000);
    assert.deepEqual(await Promise.all(spins), [504, 504, 504]);
  },
});

Deno.test({
  name: "slow requests keep a spare isolate",
  ignore: navigator.hardwareConcurrency >= 3,
  fn: async () => {
    await using server = await startServer(
      repoPath("tests/fixtures/pool_app.wsgi"),
      ["--threads", "4", "--min-threads", "1"],
    );
    // Two requests that compute for a while keep both isolates busy. No
    // request waits, but the next short one would, so a third isolate starts.
    const longs = [1, 2].map(async () => {
      const response = await fetch(`${server.origin}/?cpu=3`);
      return await response.text();
    });
    await server.waitForLog(/isolate=3\] isolate ready/, 2500);
    const response = await fetch(`${server.origin}/?seconds=0`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "slept 0.0");
    assert.deepEqual(await Promise.all(longs), ["computed", "computed"]);
  },
});

Deno.test({
  name: "spare isolate stays while requests block",
  ignore: navigator.hardwareConcurrency >= 3,
  fn: async () => {
    await using server = await startServer(
      repoPath("tests/fixtures/pool_app.wsgi"),
      ["--threads", "4", "--min-threads", "1", "--inactivity-timeout", "1"],
    );
    // Two sleeping requests keep a spare isolate ready past the cores. It
    // stays idle for longer than --inactivity-timeout, but retiring it would
    // only make the pool restore another one.
    const sentAt = performance.now();
    const sleeping = [1, 2].map(async () => (await fetch(`${server.origin}/?seconds=5`)).text());
    await server.waitForLog(/isolate=3\] isolate ready/, 4000);
    // Look before the requests end: after them, retiring the spare is right.
    await delay(4500 - (performance.now() - sentAt));
    const log = server.log();
    assert.deepEqual(await Promise.all(sleeping), ["slept 5.0", "slept 5.0"]);
    assert.doesNotMatch(log, /isolate=3\] isolate retired/);
    assert.doesNotMatch(log, /isolate=4\]/);
  },
});

Deno.test("file lock wait counts as blocked", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-pool-" });
  const lockPath = `${folder}/lock`;
  await Deno.writeTextFile(lockPath, "");
  await Deno.writeTextFile(
    `${folder}/app.wsgi`,
    `
import fcntl

def application(environ, start_response):
    with open(${JSON.stringify(lockPath)}) as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        fcntl.flock(file, fcntl.LOCK_UN)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"locked"]
`,
  );
  await using server = await startServer(`${folder}/app.wsgi`, [
    "--threads",
    "3",
    "--min-threads",
    "2",
  ]);
  await server.waitForLog(/isolate=2\] isolate ready/);

  // Both isolates wait for a lock that this test holds. The wait is shorter
  // than a long request, so only its being blocked lets the pool grow.
  const holder = await Deno.open(lockPath);
  await holder.lock(true);
  const waiting = [1, 2].map(async () => (await fetch(server.origin + "/")).text());
  await delay(200);
  holder.close();
  assert.deepEqual(await Promise.all(waiting), ["locked", "locked"]);
  await server.waitForLog(/isolate=3\] isolate ready/, 5000);
  await Deno.remove(folder, { recursive: true });
});

Deno.test({
  name: "daemon pool stays small under fast load",
  // Each process of a group grows at once up to its share of the cores, at least 2.
  ignore: Math.ceil(navigator.hardwareConcurrency / 2) > 2,
  fn: async () => {
    await using server = await startServer(
      repoPath("tests/fixtures/pool_app.wsgi"),
      ["--daemon", "group=cores,processes=2,threads=4,user=nobody"],
    );
    const result = await runLoadFor(`${server.origin}/?seconds=0`, 16, 4000);
    assert.deepEqual(result.failures, []);
    assert.equal(countMatches(server.log(), /isolate=1\] isolate ready/), 2);
    // Growing whenever every isolate is busy would reach all 4 isolates of a
    // process. A 3rd one can start when the loaded machine delays a request
    // for 0.25 s, which then counts as a long one.
    assert.doesNotMatch(server.log(), /isolate=4\]/);
  },
});

/**
 * Writes an application that returns how many requests its interpreter has
 * served. `?grow` keeps 80 MiB more, and `importMiB` are allocated at import.
 */
async function writeCountingScript(importMiB = 0): Promise<string> {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-pool-" });
  await Deno.writeTextFile(
    `${folder}/app.wsgi`,
    `
import time

served = 0
allocations = [bytearray(${importMiB} * 1024 * 1024)]

def application(environ, start_response):
    global served
    served += 1
    if environ.get("QUERY_STRING") == "grow":
        allocations.append(bytearray(80 * 1024 * 1024))
    time.sleep(0.005)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(served).encode()]
`,
  );
  return `${folder}/app.wsgi`;
}

Deno.test("maximum requests replaces isolate", async () => {
  const script = await writeCountingScript();
  await using server = await startServer(script, ["--threads", "1", "--maximum-requests", "3"]);
  const get = async () => await (await fetch(server.origin + "/")).text();

  assert.deepEqual([await get(), await get(), await get()], ["1", "2", "3"]);
  await server.waitForLog(
    /isolate=1\] isolate served 3 requests \(maximum-requests 3\); starting a fresh one/,
  );
  await server.waitForLog(/isolate=2\] isolate ready/);
  await server.waitForLog(/isolate=1\] isolate stopped: replaced after 3 requests/);

  // The fresh interpreter counts from the start.
  assert.equal(await get(), "1");
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("maximum requests under load loses nothing", async () => {
  const script = await writeCountingScript();
  await using server = await startServer(script, ["--threads", "2", "--maximum-requests", "25"]);
  const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
  const load = runLoad(server.origin + "/", 6, stop);
  await waitForCount(server, /isolate stopped: replaced after \d+ requests/, 4, 0, 60_000);
  stopLoad();
  const result = await load;

  assert.deepEqual(result.failures, []);
  // Each interpreter's first request gets "1": the 2 first ones and at least 3 of the 4
  // replacements (the last may not have served yet).
  const firsts = result.servedBy.filter((body) => body === "1").length;
  assert.ok(firsts >= 5, `only ${firsts} interpreters served a first request`);
  assert.equal(countMatches(server.log(), /isolate stopped: (?!replaced)/), 0);
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("failed replacement keeps isolate serving", async () => {
  const script = await writeCountingScript();
  const folder = script.slice(0, -"/app.wsgi".length);
  await using server = await startServer(script, ["--threads", "1", "--maximum-requests", "1"]);
  assert.equal(await (await fetch(server.origin + "/")).text(), "1");

  // A deploy moves the folder away: fresh isolates cannot start, the running one still serves.
  await Deno.rename(folder, `${folder}.moved`);
  try {
    for (let request = 0; request < 6; request++) {
      const response = await fetch(server.origin + "/");
      assert.equal(response.status, 200);
      await response.text();
      await new Promise((resolve) => setTimeout(resolve, 300));
    }
    await server.waitForLog(
      /isolate starts? in a row failed; 1 running isolate keeps serving, and the next start waits \d+ ms/,
    );
    assert.doesNotMatch(server.log(), /application marked failed/);
    assert.doesNotMatch(server.log(), /\[object Object\]/);
    // The start failed because the folder was gone, and the log names it.
    assert.ok(
      server.log().includes(
        `cannot mount ${folder} in the interpreter: ENOENT, no such file or directory`,
      ),
      server.log(),
    );
  } finally {
    await Deno.rename(`${folder}.moved`, folder);
  }

  // With the folder back, a later try replaces the isolate.
  await server.waitForLog(/isolate stopped: replaced after \d+ requests?/, 30_000);
  await Deno.remove(folder, { recursive: true });
});

Deno.test("preload failure in new isolate rejected", async () => {
  const script = await writeCountingScript();
  await using server = await startServer(
    script,
    ["--threads", "1", "--maximum-requests", "2", "--preload", "--snapshot", "runtime"],
  );
  assert.equal(await (await fetch(server.origin + "/")).text(), "1");

  await Deno.writeTextFile(script, "\nx = (\n", { append: true });
  await server.waitForLog(/reload failed, the running isolates keep serving/, 30_000);
  // The second request wears the isolate out; its replacement imports the broken script.
  for (let request = 0; request < 5; request++) {
    const response = await fetch(server.origin + "/");
    assert.equal(response.status, 200);
    await response.text();
    await new Promise((resolve) => setTimeout(resolve, 300));
  }

  const stopped = await server.waitForLog(
    /isolate=(\d+)\] isolate stopped: the application failed to import \(SyntaxError: .*\); the running isolates keep serving/,
  );
  assert.doesNotMatch(server.log(), /isolate stopped: replaced after/);
  // An isolate whose import failed was never ready for requests, and the log does not say it was.
  const rejected = /isolate=(\d+)\]/.exec(stopped)![1];
  assert.doesNotMatch(server.log(), new RegExp(`isolate=${rejected}\\] isolate ready`));
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("broken script never serves after a timeout", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-pool-" });
  const script = `${folder}/app.wsgi`;
  await Deno.copyFile(repoPath("tests/fixtures/pool_app.wsgi"), script);
  await using server = await startServer(
    script,
    [
      "--threads",
      "1",
      "--request-timeout",
      "1",
      "--queue-timeout",
      "30",
      "--preload",
      "--snapshot",
      "runtime",
    ],
  );
  assert.equal((await fetch(server.origin + "/")).status, 200);

  await Deno.writeTextFile(script, "\nraise RuntimeError('broken at import')\n", { append: true });
  await server.waitForLog(/reload failed, the running isolates keep serving/, 30_000);
  // The only isolate that imported the working script times out and is replaced.
  const timedOut = await fetch(server.origin + "/?seconds=30");
  await timedOut.text();
  assert.equal(timedOut.status, 504);

  // Its replacements import the broken script; none of them may serve it.
  const statuses: number[] = [];
  for (let request = 0; request < 3; request++) {
    const response = await fetch(server.origin + "/");
    await response.text();
    statuses.push(response.status);
  }
  assert.ok(!statuses.includes(500), `statuses ${statuses}`);
  assert.match(
    server.log(),
    /it imported in this pool before, so no isolate serves the broken script; fix it and touch it/,
  );
  await Deno.remove(folder, { recursive: true });
});

/**
 * Imports of 12 MiB, above a limit of 32 MiB, without an application
 * snapshot. Without --preload each isolate imports during its first request,
 * so the pool can tell only after that request; with it, when the isolate is
 * ready. Either way, replacing isolates would not help.
 */
const IMPORT_ABOVE_LIMIT = [
  { name: "import", args: [], when: "after its first request", replacements: 1 },
  { name: "preloaded import", args: ["--preload"], when: "when it starts", replacements: 0 },
];

for (const { name, args, when, replacements } of IMPORT_ABOVE_LIMIT) {
  Deno.test(`memory limit needed by the ${name} ignored`, async () => {
    const script = await writeCountingScript(12);
    await using server = await startServer(script, [
      "--threads",
      "1",
      "--memory-limit",
      "32M",
      "--snapshot",
      "runtime",
      ...args,
    ]);
    for (let request = 0; request < 6; request++) {
      await (await fetch(server.origin + "/")).text();
      await new Promise((resolve) => setTimeout(resolve, 200));
    }

    await server.waitForLog(
      new RegExp(
        `memory-limit 32 MiB is below the \\d+ MiB of wasm memory that a fresh isolate has ${when}`,
      ),
    );
    const replaced = countMatches(server.log(), /isolate stopped: replaced after/);
    assert.ok(replaced <= replacements, server.log());
    await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
  });
}

Deno.test("memory limit after large first requests", async () => {
  const script = await writeCountingScript();
  // The application snapshot contains the import, so a fresh isolate that passes
  // the limit in its first request got there by that request alone.
  await using server = await startServer(script, ["--threads", "1", "--memory-limit", "96M"]);
  for (let isolate = 1; isolate <= 3; isolate++) {
    assert.equal(await (await fetch(`${server.origin}/?grow`)).text(), "1");
    await server.waitForLog(
      new RegExp(`isolate=${isolate}\\] isolate stopped: replaced after 1 request`),
    );
  }
  assert.doesNotMatch(server.log(), /is below the/);
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("memory limit replaces isolate", async () => {
  const script = await writeCountingScript();
  await using server = await startServer(script, ["--threads", "1", "--memory-limit", "96M"]);
  const get = async (query = "") => await (await fetch(`${server.origin}/?${query}`)).text();

  assert.equal(await get(), "1");
  assert.equal(await get(), "2");
  assert.doesNotMatch(server.log(), /starting a fresh one/);
  assert.equal(await get("grow"), "3");
  await server.waitForLog(
    /isolate=1\] isolate has \d+ MiB of wasm memory \(memory-limit 96 MiB\); starting a fresh one to replace it/,
  );
  await server.waitForLog(/isolate=2\] isolate ready/);
  await server.waitForLog(
    /isolate=1\] isolate stopped: replaced after 3 requests, with \d+ MiB of wasm memory/,
  );

  assert.equal(await get(), "1");
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("large wasm memory without a limit is logged", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  for (let i = 0; i < 2; i++) {
    const response = await fetch(`${server.origin}/?allocate-mib=600`);
    assert.equal(await response.text(), "allocated");
  }
  // The memory stays after the block is freed, and the line comes once.
  await server.waitForLog(/isolate=1\] isolate has \d+ MiB of wasm memory, which it keeps/);
  assert.equal(countMatches(server.log(), /which it keeps until it stops/), 1);
  assert.match(server.log(), /--memory-limit replaces such isolates/);
});

for (const python of ["3.14", "3.12"]) {
  Deno.test(`memory max refuses growth past it on Python ${python}`, async () => {
    await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
      "--threads",
      "1",
      "--memory-max",
      "128M",
      "--python",
      python,
    ]);
    for (let i = 0; i < 2; i++) {
      const failed = await fetch(`${server.origin}/?allocate-mib=200`);
      assert.equal(failed.status, 500);
      await failed.body?.cancel();
    }
    // The isolate serves on, within the memory it has, and reports its limit.
    const response = await fetch(`${server.origin}/?allocate-mib=16`);
    assert.equal(await response.text(), "allocated");
    const limit = await fetch(`${server.origin}/?limit-as=1`);
    assert.equal(await limit.text(), "(134217728, 134217728)");

    assert.match(server.log(), /isolate=1 request=\S+\] MemoryError/);
    assert.equal(
      countMatches(
        server.log(),
        /isolate=1 request=\S+\] the application requested \d+ MiB of wasm memory, past the memory-max of 128 MiB/,
      ),
      1,
    );
    assert.doesNotMatch(server.log(), /isolate stopped/);
  });
}

Deno.test("memory max below the application snapshot", async () => {
  const script = await writeCountingScript(48);
  await using server = await startServer(script, ["--threads", "1", "--memory-max", "64M"]);
  await server.waitForLog(
    /the snapshot needs \d+ MiB of wasm memory at start, more than the memory-max of 64 MiB; raise memory-max/,
  );
  // Isolates start from the runtime snapshot instead, where the import fails.
  const response = await fetch(server.origin + "/");
  assert.equal(response.status, 500);
  await response.body?.cancel();
  assert.match(server.log(), /failed to import the application/);
  assert.match(server.log(), /request=\S+\] MemoryError/);
  // The snapshot is sound, so it stays for a start with a higher cap.
  assert.match(server.log(), /needs more wasm memory than the memory cap allows/);
  assert.doesNotMatch(server.log(), /could not be restored; deleting it/);
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("memory limit below fresh isolate", async () => {
  const script = await writeCountingScript(40);
  await using server = await startServer(script, ["--threads", "1", "--memory-limit", "48M"]);
  await server.waitForLog(
    /memory-limit 48 MiB is below the \d+ MiB of wasm memory that a fresh isolate has/,
  );

  // Replacing the isolate would not bring it under the limit, so it keeps serving.
  for (const expected of ["1", "2", "3"]) {
    assert.equal(await (await fetch(server.origin + "/")).text(), expected);
  }
  assert.doesNotMatch(server.log(), /starting a fresh one/);
  await Deno.remove(script.slice(0, -"/app.wsgi".length), { recursive: true });
});

Deno.test("queue limit counts requests held by isolates", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--queue-limit", "0"],
  );
  const slow = fetch(`${server.origin}/?seconds=1.5`);
  await new Promise((resolve) => setTimeout(resolve, 300));

  const rejected = await fetch(`${server.origin}/?seconds=0`);
  await rejected.body?.cancel();
  const first = await slow;
  await first.body?.cancel();

  assert.equal(first.status, 200);
  assert.equal(rejected.status, 503);
  assert.ok(rejected.headers.get("retry-after"));
});

Deno.test("queue limit ignores requests whose client left", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--queue-limit", "5"],
  );
  const get = async (query: string, signal?: AbortSignal) => {
    const response = await fetch(`${server.origin}/?${query}`, { signal });
    await response.text();
    return response.status;
  };
  // One request runs, one waits in the isolate behind it and one heads the queue.
  const running = get("seconds=2");
  await delay(300);
  const postedBehind = get("seconds=0");
  await delay(100);
  const queued = get("seconds=0");
  await delay(100);

  // Three clients give up while their requests wait behind the live one.
  const leave = async () => {
    try {
      return await get("seconds=0", AbortSignal.timeout(200));
    } catch {
      return "aborted";
    }
  };
  const leaving = [leave(), leave(), leave()];
  assert.deepEqual(await Promise.all(leaving), ["aborted", "aborted", "aborted"]);
  await waitForCount(server, /client closed the connection while the request was queued/, 3);

  // Two waiting requests are left, so the queue has room for this one.
  const later = get("seconds=0");
  assert.deepEqual(await Promise.all([running, postedBehind, queued, later]), [200, 200, 200, 200]);
  assert.doesNotMatch(server.log(), /queue is full/);
});

Deno.test("growing pool starts a spare isolate", async () => {
  // Daemon groups start one isolate and grow on demand up to `threads`.
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--daemon", "group=spare,processes=1,threads=3,user=nobody"],
  );
  assert.doesNotMatch(server.log(), /isolate=2\] isolate ready/);

  const response = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(response.status, 200);
  await response.text();

  // One request made the only isolate busy; a second one is started as the
  // spare without any further request.
  await server.waitForLog(/isolate=2\] isolate ready/, 30_000);
  assert.doesNotMatch(server.log(), /isolate=3\] isolate ready/);
});

Deno.test("retired isolates end their threads", async () => {
  // An idle isolate blocks in its inbox. Deno ends a terminated worker only
  // in its event loop, so the isolate must return there for its thread to end.
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--daemon", "group=retire,processes=1,threads=4,inactivity-timeout=1,user=nobody"],
  );
  const pid = Number(
    (await server.waitForLog(/group=retire process=(\d+)\]/)).match(/process=(\d+)/)![1],
  );
  const threads = () => Deno.readDirSync(`/proc/${pid}/task`).toArray().length;

  const load = [];
  for (let i = 0; i < 4; i++) {
    load.push(fetch(`${server.origin}/?seconds=1.5`).then((response) => response.text()));
  }
  await server.waitForLog(/isolate=4\] isolate ready/, 30_000);
  await Promise.all(load);
  const busy = threads();

  await server.waitForLog(/isolate retired after/, 20_000);
  // Retirement goes on until one busy isolate and one spare remain.
  let retired = 0;
  for (let waited = 0; waited < 15_000 && retired < 2; waited += 250) {
    await new Promise((resolve) => setTimeout(resolve, 250));
    retired = server.log().match(/isolate retired after/g)?.length ?? 0;
  }
  // A third isolate may retire meanwhile; its thread must end too.
  let now = threads();
  for (let waited = 0; waited < 5_000 && now > busy - retired; waited += 250) {
    await new Promise((resolve) => setTimeout(resolve, 250));
    now = threads();
    retired = server.log().match(/isolate retired after/g)?.length ?? 0;
  }
  assert.ok(retired >= 2, `only ${retired} isolates retired:\n${server.log()}`);
  assert.ok(
    now <= busy - retired,
    `threads went from ${busy} to ${now} after ${retired} isolates retired`,
  );
});

Deno.test("time.sleep leaves the CPU idle", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const response = fetch(`${server.origin}/?seconds=2`);
  await new Promise((resolve) => setTimeout(resolve, 400));
  const before = cpuTicks(server.process.pid);
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const used = cpuTicks(server.process.pid) - before;
  const reply = await response;

  assert.equal(reply.status, 200);
  assert.equal(await reply.text(), "slept 2.0");
  // Pyodide's own time.sleep() keeps a core busy: about 100 ticks in this second.
  assert.ok(used < 30, `the server used ${used} clock ticks of CPU during 1 s of time.sleep()`);
});

Deno.test("time.sleep arguments match CPython", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const cases: [string, string][] = [
    ["0", "slept"],
    ["0.01", "slept"],
    ["Seconds.ONE", "slept"],
    ["True", "slept"],
    ["-1", "ValueError"],
    ["float('nan')", "ValueError"],
    ["float('inf')", "OverflowError"],
    ["2**70", "OverflowError"],
    ["'1'", "TypeError"],
    ["None", "TypeError"],
  ];
  for (const [argument, expected] of cases) {
    const response = await fetch(`${server.origin}/?sleep-arg=${encodeURIComponent(argument)}`);
    assert.equal(await response.text(), expected, `time.sleep(${argument})`);
  }
});

Deno.test("waiting request survives a crash", async () => {
  // A request posted behind one whose interpreter fails must not start on
  // that interpreter: it goes back to the queue and the new isolate serves it.
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const crashing = fetch(`${server.origin}/?seconds=0.5&exit=1`);
  await new Promise((resolve) => setTimeout(resolve, 200));
  const waiting = fetch(`${server.origin}/?seconds=0`);
  const crashed = await crashing;
  await crashed.body?.cancel();
  const served = await waiting;

  assert.equal(crashed.status, 502);
  assert.equal(served.status, 200);
  assert.equal(await served.text(), "slept 0.0");
});

Deno.test("stack overflow in C code replaces the isolate", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const overflow = await fetch(`${server.origin}/?json-depth=100000`);
  await overflow.body?.cancel();
  const after = await fetch(`${server.origin}/?json-depth=100`);

  assert.equal(overflow.status, 502);
  assert.equal(after.status, 200);
  assert.equal(await after.text(), "parsed");
  await server.waitForLog(
    /isolate stopped: .*Maximum call stack size exceeded \(recursion in C code/,
    5000,
  );
  // Pyodide's own report becomes log lines with the request's id.
  assert.match(server.log(), /ERROR \[[^\]]*request=\S+\] Pyodide has suffered a fatal error/);
});

Deno.test("application cannot end its worker", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
    "--request-timeout",
    "0",
  ]);
  for (const call of ["deno", "close", "kill", "stdout"]) {
    const response = await fetch(`${server.origin}/?js-exit=${call}`);
    await response.body?.cancel();
    assert.equal(response.status, 500, call);
  }
  const served = await fetch(`${server.origin}/?seconds=0`);

  assert.equal(await served.text(), "slept 0.0");
  assert.match(
    server.log(),
    /exit\(\) would end the isolate's worker; an application cannot call it/,
  );
  assert.match(server.log(), /close\(\) would end the isolate's worker/);
  assert.match(server.log(), /kill\(\) would signal the server's own process/);
  assert.match(server.log(), /Deno\.stdout belongs to the server; an application cannot use it/);
  // The first isolate served every request.
  assert.doesNotMatch(server.log(), /isolate=2\]/);
});

Deno.test("requeued request whose client left ends", async () => {
  // The isolate dies while a second request waits behind the running one.
  // That request goes back to the queue. When its client leaves before a new
  // isolate takes it, the server must finish it at once.
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const crashing = fetch(`${server.origin}/?seconds=1&exit=1`);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const leaving = new AbortController();
  const waiting = fetch(`${server.origin}/?seconds=0`, { signal: leaving.signal }).catch((error) =>
    error
  );
  const crashed = await crashing;
  await crashed.body?.cancel();
  leaving.abort();
  await waiting;

  assert.equal(crashed.status, 502);
  await server.waitForLog(/client closed the connection while the request was queued/, 10_000);
});

Deno.test("embedded timeouts answer 504 and 503", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--request-timeout", "3", "--queue-timeout", "0.5"],
  );
  await server.waitForLog(/isolate=1\] isolate ready/);
  const spinning = fetch(`${server.origin}/?spin=1`);
  await new Promise((resolve) => setTimeout(resolve, 300));

  // The only isolate spins, so this request waits in the queue until its timeout.
  const queued = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(queued.status, 503);
  await queued.body?.cancel();
  assert.match(
    server.log(),
    /queue timed out: the request waited \d+ ms in the queue \(queue-timeout 0.5 s\)/,
  );

  const timedOut = await spinning;
  assert.equal(timedOut.status, 504);
  await timedOut.body?.cancel();
  assert.match(
    server.log(),
    /request timed out after \d+ ms \(request-timeout 3 s\); replacing the isolate/,
  );

  // A new isolate takes the next request.
  const after = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(after.status, 200);
  assert.equal(await after.text(), "slept 0.0");

  // A timed-out request is the request's fault, not the isolate's: timeouts
  // in a row restart the isolate with the shortest delay each time.
  for (let i = 0; i < 2; i++) {
    const again = await fetch(`${server.origin}/?spin=1`);
    assert.equal(again.status, 504);
    await again.body?.cancel();
  }
  assert.equal(server.log().match(/restarting the isolate in 100 ms/g)?.length, 3, server.log());
  assert.doesNotMatch(server.log(), /restarting the isolate in 1000 ms/);
});

Deno.test("timed-out isolate restarts for waiting requests", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--request-timeout", "1"],
  );
  await server.waitForLog(/isolate=1\] isolate ready/);
  const slow = [];
  for (let i = 0; i < 3; i++) {
    slow.push(fetch(`${server.origin}/?seconds=3`));
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  const hello = fetch(`${server.origin}/?seconds=0`);

  for (const response of await Promise.all(slow)) {
    assert.equal(response.status, 504);
    await response.body?.cancel();
  }
  const answer = await hello;
  assert.equal(answer.status, 200);
  assert.equal(await answer.text(), "slept 0.0");
  assert.equal(server.log().match(/request timed out after .*; replacing the isolate/g)?.length, 3);
  // The timeout's own ERROR line names the cause, so the stop that follows is INFO.
  assert.equal(countMatches(server.log(), /INFO .*isolate stopped: request timed out/), 3);
  assert.equal(countMatches(server.log(), /ERROR .*isolate stopped/), 0);
  // Each replacement started at once for the requests that waited, without a restart delay.
  assert.doesNotMatch(server.log(), /restarting the isolate in/);
});

/** Sends a request and closes its connection 200 ms later, before any response. */
async function sendAndLeave(url: string): Promise<void> {
  const client = new AbortController();
  const request = fetch(url, { signal: client.signal }).catch(() => null);
  await new Promise((resolve) => setTimeout(resolve, 200));
  client.abort();
  assert.equal(await request, null, "no response came before the client left");
}

/**
 * Starts a request of `runningSeconds` on the server's only isolate, then one
 * of `heldSeconds` whose client leaves while it waits behind the first.
 * Returns the first request's response.
 */
async function holdAndLeave(
  server: TestServer,
  runningSeconds: number,
  heldSeconds: number,
): Promise<Response> {
  await server.waitForLog(/isolate=1\] isolate ready/);
  const running = fetch(`${server.origin}/?seconds=${runningSeconds}`);
  await new Promise((resolve) => setTimeout(resolve, 200));
  await sendAndLeave(`${server.origin}/?seconds=${heldSeconds}`);
  return running;
}

Deno.test("held request whose client left ends", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--request-timeout", "1"],
  );
  // The second request waits in the isolate behind the running one; then its client leaves.
  const running = await holdAndLeave(server, 3, 0);

  // The pool takes the held request back when its client leaves, or at the latest when the
  // running request times out. Either way the held request must end.
  const timedOut = await running;
  assert.equal(timedOut.status, 504);
  await timedOut.body?.cancel();
  await server.waitForLog(/client closed the connection while the request was queued/, 5_000);
  assert.equal((await server.stop()).code, 0);
  assert.doesNotMatch(server.log(), /responses still running/);
});

for (const mode of ["embedded", "daemon"]) {
  Deno.test(`${mode} held request whose client left never runs`, async () => {
    await heldRequestNeverRuns(
      mode === "embedded" ? ["--threads", "1"] : [
        "--daemon",
        "group=held,processes=1,threads=1,user=nobody",
      ],
    );
  });
}

async function heldRequestNeverRuns(modeArgs: string[]): Promise<void> {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    [...modeArgs, "--access-log"],
  );
  const running = await holdAndLeave(server, 1.5, 0.1);

  const first = await running;
  assert.equal(first.status, 200);
  assert.equal(await first.text(), "slept 1.5");
  // The next request runs at once, not behind the one that was taken back.
  const next = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(await next.text(), "slept 0.0");
  assert.match(server.output(), /"GET \/\?seconds=0\.1 [^"]*" 499/);
  assert.doesNotMatch(server.output(), /"GET \/\?seconds=0\.1 [^"]*" 200/);
  assert.doesNotMatch(server.log(), /\?seconds=0\.1|slept 0\.1/);
}

Deno.test("embedded queue timeout 0 waits", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--queue-timeout", "0"],
  );
  await server.waitForLog(/isolate=1\] isolate ready/);
  const first = fetch(`${server.origin}/?seconds=1.5`);
  await new Promise((resolve) => setTimeout(resolve, 200));

  // This request waits behind the first for over a second, past the pool's check.
  const second = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(second.status, 200);
  assert.equal(await second.text(), "slept 0.0");
  const firstResponse = await first;
  assert.equal(firstResponse.status, 200);
  assert.equal(await firstResponse.text(), "slept 1.5");
});

Deno.test("first isolate restores alone", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "3", "--log-level", "debug"],
  );
  await server.waitForLog(/isolate=3\] isolate ready/);
  const log = server.log();
  const firstReady = log.search(/isolate=1\] isolate ready/);

  assert.ok(firstReady >= 0, `no ready line for isolate 1:\n${log}`);
  for (const id of [2, 3]) {
    const starting = log.search(new RegExp(`isolate=${id}\\] starting isolate`));
    assert.ok(starting > firstReady, `isolate ${id} started before isolate 1 was ready:\n${log}`);
  }
});

Deno.test("stop signal delivered twice drains", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const slow = fetch(`${server.origin}/?seconds=1.5`);
  await new Promise((resolve) => setTimeout(resolve, 300));

  // Ctrl-C under `deno task` reaches the server twice within milliseconds.
  // Sent back to back, the kernel would merge them into one pending signal.
  server.process.kill("SIGINT");
  await new Promise((resolve) => setTimeout(resolve, 50));
  server.process.kill("SIGINT");
  const response = await slow;
  const status = await server.process.status;

  assert.equal(response.status, 200);
  assert.equal(await response.text(), "slept 1.5");
  assert.equal(status.code, 0);
  assert.match(server.log(), /SIGINT again within \d+ ms: taken as the same stop/);
});

Deno.test("shutdown timeout answers running request", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--shutdown-timeout", "1"],
  );
  const stuck = fetch(`${server.origin}/?seconds=30`);
  await new Promise((resolve) => setTimeout(resolve, 300));

  server.process.kill("SIGTERM");
  const response = await stuck;
  const status = await server.process.status;

  assert.equal(response.status, 503);
  assert.equal(await response.text(), "Service Unavailable\n");
  assert.equal(status.code, 0);
  assert.match(server.log(), /responses still running after 1000 ms; stopping them/);
  assert.match(server.log(), /request failed with 503: the server is shutting down/);
});

Deno.test("upload cut by stop gets 503", async () => {
  await using server = await startServer(
    repoPath("tests/fixtures/pool_app.wsgi"),
    ["--threads", "1", "--shutdown-timeout", "3"],
  );
  // Half of a small body: the server reads such a body whole before it queues the request.
  const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  const head = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n";
  await connection.write(new TextEncoder().encode(head + "x".repeat(500)));
  await new Promise((resolve) => setTimeout(resolve, 300));

  server.process.kill("SIGTERM");
  const reply = await new Response(connection.readable).text();
  const status = await server.process.status;

  assert.match(reply, /^HTTP\/1\.1 503 /);
  assert.equal(status.code, 0);
  assert.match(server.log(), /request body cut off because the server is stopping/);
  assert.doesNotMatch(
    server.log(),
    /client stopped sending the request body|client closed the connection before the request body ended/,
  );
});

Deno.test("later second stop signal exits at once", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const slow = fetch(`${server.origin}/?seconds=5`).catch((error) => error);
  await new Promise((resolve) => setTimeout(resolve, 300));

  server.process.kill("SIGTERM");
  await server.waitForLog(/SIGTERM: stopping gracefully/);
  await new Promise((resolve) => setTimeout(resolve, 1500));
  server.process.kill("SIGTERM");
  const status = await server.process.status;
  await slow;

  assert.equal(status.code, 1);
  assert.match(server.log(), /SIGTERM during the graceful stop: exiting at once/);
});

Deno.test("SIGQUIT exits at once with status 0", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  const slow = fetch(`${server.origin}/?seconds=30`).catch((error) => error);
  await new Promise((resolve) => setTimeout(resolve, 300));

  server.process.kill("SIGQUIT");
  const status = await server.process.status;
  await slow;

  assert.equal(status.signal, null);
  assert.equal(status.code, 0);
  assert.match(server.log(), /WARNING .*SIGQUIT: exiting at once/);
});

Deno.test("SIGTTIN and SIGUSR2 are ignored", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  let response: Response;
  try {
    server.process.kill("SIGTTIN");
    await server.waitForLog(/SIGTTIN ignored: /, 10_000);
    server.process.kill("SIGUSR2");
    await server.waitForLog(/SIGUSR2 ignored: /, 10_000);
    response = await fetch(`${server.origin}/?seconds=0`, { signal: AbortSignal.timeout(10_000) });
  } finally {
    // SIGTTIN's default action stops a process, which could then not stop on SIGTERM.
    server.process.kill("SIGCONT");
  }

  assert.equal(response.status, 200);
  assert.equal(await response.text(), "slept 0.0");
  assert.match(server.log(), /WARNING .*SIGTTIN ignored: pools grow on their own up to --threads/);
});

Deno.test("SIGUSR1 debugger closed at once", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  // Deno listens for SIGUSR1 only from 500 ms after the process started.
  await new Promise((resolve) => setTimeout(resolve, 1000));
  server.process.kill("SIGUSR1");
  const line = await server.waitForLog(/.*SIGUSR1: .*/, 10_000);

  // Deno opens its debugger on SIGUSR1, which lets any local user run code in the server.
  assert.match(
    line,
    /WARNING .*SIGUSR1: Deno opened its debugger at ws:\/\/127\.0\.0\.1:9229\/\S+, which was closed after \d+ ms\. wsgirun does not act on SIGUSR1: send SIGHUP to reload/,
  );
  assert.equal(listensOn(server.process.pid, 9229), false);
  assert.doesNotMatch(server.log(), /reloading/);
  const response = await fetch(`${server.origin}/?seconds=0`);
  assert.equal(await response.text(), "slept 0.0");
});

Deno.test("SIGHUP delivered twice reloads once", async () => {
  await using server = await startServer(repoPath("tests/fixtures/pool_app.wsgi"), [
    "--threads",
    "1",
  ]);
  // A SIGHUP to the process group of `deno task` reaches the server twice.
  server.process.kill("SIGHUP");
  await new Promise((resolve) => setTimeout(resolve, 50));
  server.process.kill("SIGHUP");
  await server.waitForLog(/SIGHUP again within \d+ ms: taken as the same reload/, 10_000);

  assert.equal(countMatches(server.log(), /SIGHUP: reloading every application/), 1);
});
