/**
 * Reloads in embedded mode: a changed script file or SIGHUP starts fresh
 * isolates while the old ones finish their requests, through the real server.
 */

import assert from "node:assert/strict";
import { startServer } from "./helpers/server.ts";
import { countMatches, delay, runLoad, waitForCount } from "./helpers/load.ts";
import { reloadFile } from "../supervisor/script_watch.ts";

/**
 * A script that returns its version after a pause of `ms` milliseconds per
 * request, or of the milliseconds in the query string (`/?2000`).
 */
function versionScript(version: string, ms: number): string {
  return `
import time

def application(environ, start_response):
    pause = int(environ.get("QUERY_STRING") or ${ms})
    time.sleep(pause / 1000)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"${version}"]
`;
}

async function writeScript(version: string): Promise<string> {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-reload-" });
  await Deno.writeTextFile(`${folder}/app.wsgi`, versionScript(version, 20));
  return `${folder}/app.wsgi`;
}

Deno.test("embedded reload on script change under load", async () => {
  const script = await writeScript("one");
  await using server = await startServer(script, ["--threads", "2"]);
  const { promise: stop, resolve: stopLoad } = Promise.withResolvers<void>();
  const load = runLoad(server.origin + "/", 6, stop);
  await delay(500);

  await Deno.writeTextFile(script, versionScript("two", 20));
  await server.waitForLog(/reloaded: fresh isolates take new requests/, 30_000);
  await delay(1000);
  stopLoad();
  const result = await load;

  // No request is lost, and the last ones run the new code.
  assert.deepEqual(result.failures, []);
  assert.ok(result.servedBy.includes("one"));
  assert.deepEqual(new Set(result.servedBy.slice(-10)), new Set(["two"]));
  assert.match(server.log(), /reloading: starting fresh isolates \(the script file changed\)/);
  // The fresh isolates continue the numbering, so log lines stay unambiguous.
  assert.match(server.log(), /isolate=3\] isolate ready/);
  assert.equal(countMatches(server.log(), /requests still running after/), 0);
});

Deno.test("embedded reload on module change", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-reload-" });
  await Deno.mkdir(`${folder}/mysite`);
  await Deno.writeTextFile(`${folder}/mysite/__init__.py`, "");
  await Deno.writeTextFile(`${folder}/mysite/wsgi.py`, versionScript("one", 0));
  await using server = await startServer("mysite.wsgi:application", [
    "--threads",
    "1",
    "--python-path",
    folder,
  ]);
  assert.equal(await (await fetch(server.origin + "/")).text(), "one");

  // In the package.module form the module's file is the one that a change reloads.
  await Deno.writeTextFile(`${folder}/mysite/wsgi.py`, versionScript("two", 0));
  await server.waitForLog(/reloaded: fresh isolates take new requests/, 30_000);
  assert.match(server.log(), /reloading: starting fresh isolates \(the module file changed\)/);

  assert.equal(await (await fetch(server.origin + "/")).text(), "two");
  await Deno.remove(folder, { recursive: true });
});

Deno.test("reload file of a module", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-reload-" });
  await Deno.mkdir(`${folder}/first/site/web`, { recursive: true });
  await Deno.mkdir(`${folder}/home/site`, { recursive: true });
  for (
    const file of ["first/site/__init__.py", "first/site/web.py", "first/site/web/__init__.py"]
  ) {
    await Deno.writeTextFile(`${folder}/${file}`, "");
  }
  await Deno.writeTextFile(`${folder}/home/site/__init__.py`, "");
  await Deno.writeTextFile(`${folder}/home/site/only_home.py`, "");
  const app = (module: string, home?: string) => ({
    name: module,
    callable: "application",
    python: "3.14" as const,
    pythonPath: [`${folder}/first`],
    preload: false,
    module,
    ...(home ? { home } : {}),
  });

  // A package comes before a module of the same name, as in Python's import.
  assert.equal(reloadFile(app("site.web")), `${folder}/first/site/web/__init__.py`);
  // A daemon group's home is searched after the python path.
  assert.equal(
    reloadFile(app("site.only_home", `${folder}/home`)),
    `${folder}/home/site/only_home.py`,
  );
  assert.equal(reloadFile(app("site.only_home")), undefined);
  assert.equal(reloadFile(app("json")), undefined);
  await Deno.remove(folder, { recursive: true });
});

Deno.test("embedded reload on SIGHUP", async () => {
  const script = await writeScript("one");
  await using server = await startServer(script, ["--threads", "1"]);
  assert.equal(await (await fetch(server.origin + "/")).text(), "one");

  // Without a change of the file only the signal reloads, with the same code.
  server.process.kill("SIGHUP");
  await server.waitForLog(/SIGHUP: reloading every application/);
  await waitForCount(server, /reloaded: fresh isolates take new requests/, 1);
  assert.match(server.log(), /reloading: starting fresh isolates \(the server received SIGHUP\)/);
  assert.equal(await (await fetch(server.origin + "/")).text(), "one");
  // The replaced isolate is stopped once it has finished.
  await waitForCount(server, /replaced isolate 1 stopped\n/, 1);
  assert.match(server.log(), /isolate=2\] isolate ready/);
});

/** An application that returns the greeting that config.json held when it was imported. */
const CONFIG_SCRIPT = `import json, os

with open(os.path.join(os.path.dirname(__file__), "config.json")) as config:
    GREETING = json.load(config)["greeting"]


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [GREETING.encode()]
`;

Deno.test("SIGHUP imports the application again", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-reimport-" });
  try {
    await Deno.writeTextFile(`${folder}/app.wsgi`, CONFIG_SCRIPT);
    await Deno.writeTextFile(`${folder}/config.json`, '{"greeting": "one"}');
    await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"]);
    assert.equal(await (await fetch(server.origin + "/")).text(), "one");

    // config.json is no module, so only a new import reads the change.
    await Deno.writeTextFile(`${folder}/config.json`, '{"greeting": "two"}');
    server.process.kill("SIGHUP");
    await waitForCount(server, /reloaded: fresh isolates take new requests/, 1);

    assert.equal(await (await fetch(server.origin + "/")).text(), "two");
    assert.match(
      server.log(),
      /building the application snapshot \(the server received SIGHUP after it was built\)/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("embedded reload follows a switched release link", async () => {
  // The layout of many deploy tools: current -> releases/N, switched at once.
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-release-" });
  try {
    // The two scripts have the same size and time: only their real paths differ.
    const time = new Date(2026, 0, 1);
    for (const release of ["one", "two"]) {
      await Deno.mkdir(`${folder}/${release}`);
      await Deno.writeTextFile(`${folder}/${release}/app.wsgi`, versionScript(release, 0));
      await Deno.utime(`${folder}/${release}/app.wsgi`, time, time);
    }
    await Deno.symlink("one", `${folder}/current`);
    await using server = await startServer(`${folder}/current/app.wsgi`, [
      "--threads",
      "2",
      "--min-threads",
      "1",
    ]);
    assert.equal(await (await fetch(server.origin + "/")).text(), "one");

    await Deno.symlink("two", `${folder}/next`);
    await Deno.rename(`${folder}/next`, `${folder}/current`);
    // Until the reload, the pool keeps its release, also in an isolate it adds now.
    const before = await Promise.all(
      [1, 2].map(async () => await (await fetch(server.origin + "/?500")).text()),
    );
    assert.deepEqual(before, ["one", "one"]);
    assert.match(server.log(), /isolate=2\] isolate ready/);
    server.process.kill("SIGHUP");
    await waitForCount(server, /reloaded: fresh isolates take new requests/, 1);

    assert.equal(await (await fetch(server.origin + "/")).text(), "two");
    // Each release's application was imported into a snapshot.
    assert.doesNotMatch(server.log(), /no application snapshot|WARNING|ERROR/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("links inside a linked release lead to their targets", async () => {
  // current -> releases/one, whose data and uploads folders are links to a
  // shared folder beside the releases, as deploy tools make them.
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-release-links-" });
  try {
    const release = `${folder}/releases/one`;
    await Deno.mkdir(`${release}/assets`, { recursive: true });
    await Deno.mkdir(`${folder}/shared/data`, { recursive: true });
    await Deno.mkdir(`${folder}/shared/uploads`, { recursive: true });
    await Deno.writeTextFile(`${release}/assets/style.css`, "body {}");
    await Deno.symlink("../../shared/data", `${release}/data`);
    await Deno.symlink(`${folder}/shared/uploads`, `${release}/uploads`);
    await Deno.symlink("assets", `${release}/static`);
    await Deno.symlink("releases/one", `${folder}/current`);
    await Deno.writeTextFile(
      `${release}/app.wsgi`,
      `
import os

HERE = os.path.dirname(__file__)

def application(environ, start_response):
    for name in ("data", "uploads"):
        with open(os.path.join(HERE, name, name + ".txt"), "w") as file:
            file.write("written through " + name)
    with open(os.path.join(HERE, "static", "style.css")) as file:
        style = file.read()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [style.encode()]
`,
    );
    // The shared data folder by its own path, the uploads folder by its path in the release.
    await using server = await startServer(`${folder}/current/app.wsgi`, [
      "--threads",
      "1",
      "--write",
      `${folder}/shared/data`,
      "--write",
      `${folder}/current/uploads`,
    ]);

    const response = await fetch(server.origin + "/");
    assert.equal(await response.text(), "body {}");
    assert.equal(response.status, 200);
    assert.equal(await Deno.readTextFile(`${folder}/shared/data/data.txt`), "written through data");
    assert.equal(
      await Deno.readTextFile(`${folder}/shared/uploads/uploads.txt`),
      "written through uploads",
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

/**
 * Starts a server on a fresh script, sends a request that takes `ms`
 * milliseconds, and sends SIGTERM while it runs.
 */
async function stopDuringRequest(ms: number) {
  const script = await writeScript("one");
  const server = await startServer(script, ["--threads", "1"]);
  const slow = fetch(`${server.origin}/?${ms}`);
  await delay(300);

  server.process.kill("SIGTERM");
  await server.waitForLog(/SIGTERM: stopping gracefully/);
  return { script, server, slow };
}

Deno.test("SIGHUP during stop is ignored", async () => {
  const stopping = await stopDuringRequest(1500);
  await using server = stopping.server;
  const slow = stopping.slow;

  server.process.kill("SIGHUP");
  await server.waitForLog(/SIGHUP ignored: the server is stopping/);
  const response = await slow;
  const status = await server.process.status;

  assert.equal(response.status, 200);
  assert.equal(await response.text(), "one");
  assert.equal(status.code, 0);
  assert.doesNotMatch(server.log(), /reloading: starting fresh isolates/);
  assert.doesNotMatch(server.log(), /isolate=2\]/);
});

Deno.test("script change during stop is ignored", async () => {
  const stopping = await stopDuringRequest(3000);
  await using server = stopping.server;
  const slow = stopping.slow;

  await Deno.writeTextFile(stopping.script, versionScript("two", 20));
  const response = await slow;
  const status = await server.process.status;

  // The server checks the script once a second, so it had over two checks to notice the change.
  assert.equal(response.status, 200);
  assert.equal(await response.text(), "one");
  assert.equal(status.code, 0);
  assert.doesNotMatch(server.log(), /reloading: starting fresh isolates/);
});

Deno.test("embedded reload moves waiting requests", async () => {
  const script = await writeScript("one");
  await using server = await startServer(script, ["--threads", "1"]);
  const started = performance.now();
  const slow = fetch(server.origin + "/?3000").then(async (response) => ({
    status: response.status,
    body: await response.text(),
    ms: performance.now() - started,
  }));
  await delay(300);
  // These wait behind the slow request in the only isolate.
  const waiting = Array.from(
    { length: 3 },
    () =>
      fetch(server.origin + "/").then(async (response) => ({
        status: response.status,
        body: await response.text(),
        ms: performance.now() - started,
      })),
  );
  await delay(300);

  server.process.kill("SIGHUP");
  const moved = await Promise.all(waiting);
  const first = await slow;

  assert.equal(first.status, 200);
  for (const response of moved) {
    assert.equal(response.status, 200);
    // The fresh isolate ran them while the old one still ran the slow request.
    assert.ok(
      response.ms < first.ms,
      `a waiting request ended after ${response.ms} ms, the slow one after ${first.ms} ms`,
    );
  }
  await waitForCount(server, /replaced isolate 1 stopped\n/, 1);
});

Deno.test("embedded reload keeps the arrival order", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-reload-" });
  await Deno.writeTextFile(
    `${folder}/app.wsgi`,
    `
import time

def application(environ, start_response):
    print("START", environ["QUERY_STRING"], flush=True)
    time.sleep(1)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [environ["QUERY_STRING"].encode()]
`,
  );
  // One isolate, so that the fresh one starts the handed-over requests in the
  // order of its queue: one runs, one waits in the isolate, four in the queue.
  await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"]);
  const requests: Promise<string>[] = [];
  for (let i = 1; i <= 6; i++) {
    requests.push(fetch(`${server.origin}/?r${i}`).then((response) => response.text()));
    await delay(50);
  }
  await delay(300);
  server.process.kill("SIGHUP");
  assert.deepEqual(await Promise.all(requests), ["r1", "r2", "r3", "r4", "r5", "r6"]);

  // The fresh isolate starts the waiting requests in the order they arrived:
  // the one that waited in the old isolate first. How many the old isolate
  // started before the fresh one was ready depends on the machine's speed.
  const afterReload = server.log().slice(server.log().indexOf("reloaded: fresh isolates"));
  const started = [...afterReload.matchAll(/START (r\d)/g)].map((match) => match[1]);
  assert.ok(started.length >= 3, server.log());
  assert.deepEqual(started, [...started].sort(), server.log());
  assert.equal(started.at(-1), "r6", server.log());
  await Deno.remove(folder, { recursive: true });
});

Deno.test("embedded reload keeps a preloaded app that fails", async () => {
  const script = await writeScript("one");
  await using server = await startServer(script, ["--threads", "1", "--preload"]);
  assert.equal(await (await fetch(server.origin + "/")).text(), "one");

  await Deno.writeTextFile(
    script,
    versionScript("two", 20) + "\nraise RuntimeError('broken at import')\n",
  );
  await server.waitForLog(
    /reload failed, the running isolates keep serving: the application failed to import/,
    30_000,
  );
  const response = await fetch(server.origin + "/");
  assert.equal(response.status, 200);
  assert.equal(await response.text(), "one");
  assert.doesNotMatch(server.log(), /reloaded: fresh isolates take new requests/);
  assert.match(
    server.log(),
    /reload failed, the running isolates keep serving: the application failed to import \(RuntimeError: broken at import; traceback above\)\n/,
  );
  // The snapshot build and the isolate that tried the import log the traceback; the reload's line does not repeat it.
  assert.match(
    server.log(),
    /no application snapshot: the application raised an exception while it was imported for the snapshot, so each isolate imports it itself .*: Traceback/,
  );
  assert.equal(countMatches(server.log(), /Traceback \(most recent call last\)/), 2);
});
