/**
 * End-to-end tests of the wsgirun server: a real server process, real
 * isolates and real HTTP over loopback, with raw sockets where the exact
 * bytes on the wire matter.
 *
 * Starting a server costs a few seconds, so each `Deno.test` starts one
 * server and runs its cases as steps against it.
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { OPTIONS } from "../runtime/cli.ts";
import { daemonMallocEnvironment } from "../supervisor/malloc.ts";
import { repoPath, serverArgs, startServer, type TestServer } from "./helpers/server.ts";
import { peakResident, residentBytes, uploadGenerated } from "./helpers/transfer.ts";
import { countMatches, delay, waitForCount } from "./helpers/load.ts";

const APP_SCRIPT = repoPath("tests/fixtures/server_app.wsgi");
const IMPORT_SCRIPT = repoPath("tests/fixtures/server_import.wsgi");
const MOUNT_LOG_SCRIPT = repoPath("tests/fixtures/mount_log_app.wsgi");
const OTHER_APP_SCRIPT = repoPath("tests/fixtures/daemon_other/app.wsgi");
const STATIC_DIR = repoPath("tests/fixtures/server_static");
const MiB = 1024 * 1024;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------
// Helpers

/** A raw HTTP exchange: what came back, and whether the server closed the connection. */
interface RawExchange {
  head: string;
  body: Uint8Array;
  /** Every byte received, one character per byte. */
  text: string;
  /** True when the server closed (or reset) the connection before the timeout. */
  closed: boolean;
}

/**
 * Returns one character per byte. TextDecoder("latin1") would not do, because it
 * decodes windows-1252, which maps 0x80-0x9F to other characters.
 */
function byteString(bytes: Uint8Array): string {
  let text = "";
  for (const byte of bytes) text += String.fromCharCode(byte);
  return text;
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.length;
  }
  return out;
}

function splitResponse(bytes: Uint8Array, closed: boolean): RawExchange {
  const text = byteString(bytes);
  const end = text.indexOf("\r\n\r\n");
  const head = end < 0 ? text : text.slice(0, end);
  const body = end < 0 ? new Uint8Array(0) : bytes.subarray(end + 4);
  return { head, body, text, closed };
}

/**
 * Sends `request` on a new connection and reads until the server closes it
 * or `timeoutMs` passes.
 */
async function exchange(
  port: number,
  request: string | Uint8Array,
  timeoutMs = 5000,
): Promise<RawExchange> {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  const chunks: Uint8Array[] = [];
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    connection.close();
  }, timeoutMs);
  try {
    await connection.write(typeof request === "string" ? encoder.encode(request) : request);
    const buffer = new Uint8Array(65536);
    for (;;) {
      const count = await connection.read(buffer);
      if (count === null) break;
      chunks.push(buffer.slice(0, count));
    }
  } catch (error) {
    // The server may abort a response with a reset. A closed handle means the timer fired.
    if (!timedOut && !(error instanceof Deno.errors.ConnectionReset)) throw error;
  } finally {
    clearTimeout(timer);
    if (!timedOut) connection.close();
  }
  return splitResponse(concat(chunks), !timedOut);
}

/**
 * Builds a GET request that closes the connection after the response. The
 * target may be raw bytes, and a Host in `headers` replaces "localhost".
 */
function getRequest(target: string | Uint8Array, headers: string[] = []): Uint8Array {
  const host = headers.some((header) => /^host:/i.test(header)) ? [] : ["Host: localhost"];
  const rest = ["", ...host, ...headers, "Connection: close", "", ""].join("\r\n");
  const targetBytes = typeof target === "string" ? encoder.encode(target) : target;
  return concat([encoder.encode("GET "), targetBytes, encoder.encode(" HTTP/1.1" + rest)]);
}

/** Sends `target` raw and returns the environ value `key` as the Latin-1 bytes the app encoded. */
async function echoKey(
  server: TestServer,
  target: string | Uint8Array,
  key: string,
  headers: string[] = [],
): Promise<Uint8Array> {
  const response = await exchange(
    server.port,
    getRequest(target, [...headers, `X-Echo-Key: ${key}`]),
  );
  assert.match(response.head, /^HTTP\/1\.1 200 /, `status for ${key}`);
  return response.body;
}

async function echoText(server: TestServer, target: string, key: string, headers: string[] = []) {
  return byteString(await echoKey(server, target, key, headers));
}

async function getText(
  server: TestServer,
  path: string,
): Promise<{ status: number; text: string }> {
  const response = await fetch(server.origin + path);
  return { status: response.status, text: await response.text() };
}

/** Returns how many times the app has been called, this call included. */
async function appCalls(server: TestServer): Promise<number> {
  return Number((await getText(server, "/app/do/count")).text);
}

/** Polls `read` every 50 ms until `done` accepts its value or `timeoutMs` passes. */
async function pollUntil<T>(
  read: () => T | Promise<T>,
  done: (value: T) => boolean,
  timeoutMs = 5000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let value = await read();
  while (!done(value) && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
    value = await read();
  }
  return value;
}

/** Reads text from `reader` until it matches `pattern`, the stream ends or `timeoutMs` passes; returns all of it. */
async function readUntil(
  reader: ReadableStreamDefaultReader<string>,
  pattern: RegExp,
  timeoutMs: number,
): Promise<string> {
  let text = "";
  const deadline = Date.now() + timeoutMs;
  while (!pattern.test(text) && Date.now() < deadline) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  return text;
}

function randomToken(): string {
  return crypto.randomUUID().replaceAll("-", "");
}

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(digest, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(size);
  // getRandomValues fills at most 65536 bytes per call.
  for (let offset = 0; offset < size; offset += 65536) {
    crypto.getRandomValues(bytes.subarray(offset, Math.min(size, offset + 65536)));
  }
  return bytes;
}

// ---------------------------------------------------------------------------
// One server for most cases

/** Starts the shared server with WSGIRUN_TEST_SECRET in its environment, which it inherits. */
async function startAppServer(secret: string): Promise<TestServer> {
  Deno.env.set("WSGIRUN_TEST_SECRET", secret);
  try {
    return await startServer(APP_SCRIPT, [
      "--callable-object",
      "app",
      "--threads",
      "1",
      "--queue-limit",
      "1",
      "--mount-point",
      "/app",
      "--url-alias",
      "/static",
      STATIC_DIR,
      "--access-log",
      "--preload",
      // A cached application snapshot restores the imported app without running
      // its import again, so the preload test could not see the import.
      "--snapshot",
      "runtime",
    ]);
  } finally {
    Deno.env.delete("WSGIRUN_TEST_SECRET");
  }
}

Deno.test("server with one isolate", async (t) => {
  const secret = `secret-${randomToken()}`;
  const outside = await Deno.makeTempDir({ prefix: "wsgirun_server_test_" });
  const secretFile = join(outside, "secret.txt");
  const fileSecret = `file-${randomToken()}`;
  await Deno.writeTextFile(secretFile, fileSecret);

  try {
    await using server = await startAppServer(secret);

    await t.step("preload imports at start", async () => {
      await server.waitForLog(/server_app imported/, 10_000);
      assert.equal(server.output(), "", "no request was served before the import");
      await getText(server, "/app/do/hello");
      assert.equal(server.log().match(/server_app imported/g)?.length, 1, "imported once");
    });

    await t.step("callable-object app serves", async () => {
      const response = await getText(server, "/app/do/hello");
      assert.equal(response.status, 200);
      assert.equal(response.text, "hello");
    });

    await t.step("chunk larger than the response window", async () => {
      // The window is 256 KiB; a later chunk of 1 MiB must not wait for room forever.
      const response = await fetch(`${server.origin}/app/do/chunks?10,1048576,10`, {
        signal: AbortSignal.timeout(20_000),
      });
      const body = new Uint8Array(await response.arrayBuffer());
      assert.equal(response.status, 200);
      assert.equal(body.length, 1_048_596);
    });

    // --- Paths and the environ

    await t.step("percent-encoded UTF-8 path", async () => {
      const bytes = await echoKey(server, "/app/caf%C3%A9", "PATH_INFO");
      // PATH_INFO is "/cafÃ©": one character per byte, so Latin-1 gives the bytes back.
      assert.deepEqual(bytes, encoder.encode("/café"));
    });

    await t.step("raw UTF-8 path", async () => {
      const bytes = await echoKey(server, encoder.encode("/app/café"), "PATH_INFO");
      assert.deepEqual(bytes, encoder.encode("/café"));
    });

    await t.step("encoded slash in path", async () => {
      assert.equal(await echoText(server, "/app/a%2Fb", "PATH_INFO"), "/a/b");
      assert.equal(await echoText(server, "/app/a%2Fb", "REQUEST_URI"), "/app/a%2Fb");
    });

    await t.step("dot segments stay unresolved", async () => {
      // The server decodes percent escapes once and resolves no segment, so an
      // app that maps PATH_INFO to files must reject ".." itself.
      const cases: [string, string][] = [
        ["/app/a/../b", "/a/../b"],
        ["/app/a/./b", "/a/./b"],
        ["/app/a/%2E%2E/b", "/a/../b"],
        ["/app//a", "//a"],
        ["/app/a\\b", "/a\\b"],
      ];
      for (const [target, pathInfo] of cases) {
        assert.equal(await echoText(server, target, "PATH_INFO"), pathInfo, target);
      }
    });

    await t.step("crafted Host keeps PATH_INFO", async () => {
      const headers = ["Host: a.example/admin?x="];
      assert.equal(await echoText(server, "/app/page", "PATH_INFO", headers), "/page");
    });

    await t.step("absolute-form target", async () => {
      const target = "http://other.example/app/x?q=1";
      assert.equal(await echoText(server, target, "PATH_INFO"), "/x");
      assert.equal(await echoText(server, target, "QUERY_STRING"), "q=1");
    });

    await t.step("mount point is a segment", async () => {
      const before = await appCalls(server);
      const response = await getText(server, "/application");
      assert.equal(response.status, 404);
      assert.equal(await appCalls(server), before + 1, "the app was not called for /application");
    });

    await t.step("X_Auth cannot overwrite X-Auth", async () => {
      const orders = [
        ["X-Auth: dash", "X_Auth: underscore"],
        ["X_Auth: underscore", "X-Auth: dash"],
      ];
      for (const headers of orders) {
        assert.equal(await echoText(server, "/app/x", "HTTP_X_AUTH", headers), "dash", headers[0]);
      }
    });

    // --- Request bodies

    await t.step("chunked upload without length", async () => {
      const payload = randomBytes(1024 * 1024);
      const body = new ReadableStream<Uint8Array>({
        start(controller) {
          for (let offset = 0; offset < payload.length; offset += 65536) {
            controller.enqueue(payload.slice(offset, offset + 65536));
          }
          controller.close();
        },
      });
      const response = await fetch(server.origin + "/app/do/upload", { method: "POST", body });
      const result = await response.json();
      assert.equal(response.status, 200);
      assert.equal(result.content_length, null, "no Content-Length reached the app");
      assert.equal(result.length, payload.length);
      assert.equal(result.sha256, await sha256Hex(payload));
    });

    await t.step("1 GiB upload with bounded memory", async () => {
      // The front and the isolate reuse their read buffers. With a new array
      // per piece, this upload grew the server by about 100 MiB of garbage.
      const size = 1024 * MiB;
      const before = residentBytes(server.process.pid);
      const upload = uploadGenerated(server.port, "/app/do/count-body", size);
      const [peak] = await peakResident([server.process.pid], upload);
      assert.equal(await upload, String(size));
      const growth = peak - before;
      assert.ok(growth < 64 * MiB, `the server grew by ${Math.round(growth / MiB)} MiB`);
    });

    await t.step("client stopping mid-body raises OSError", async () => {
      const token = randomToken();
      const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      await connection.write(encoder.encode(
        `POST /app/do/read-error?token=${token} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n`,
      ));
      await connection.write(new Uint8Array(200_000));
      await new Promise((resolve) => setTimeout(resolve, 300));
      connection.close();
      await server.waitForLog(
        new RegExp(
          `read failed ${token}: OSError: request body read failed: the client stopped sending`,
        ),
        5000,
      );
      // The front's line names the closed connection, not Deno's resource table.
      await server.waitForLog(/client closed the connection before the request body ended/, 5000);
      assert.doesNotMatch(server.log(), /BadResource/);
      assert.equal((await getText(server, "/app/do/hello")).text, "hello", "server still serves");
    });

    await t.step("unread body after the response", async () => {
      // The application responds without reading a streamed body. Deno then
      // ends the body read, which is not a client that stopped sending.
      const logStart = server.log().length;
      const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      await connection.write(encoder.encode(
        "POST /app/do/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
      ));
      await connection.write(new Uint8Array(200_000));
      const buffer = new Uint8Array(4096);
      const count = await connection.read(buffer);
      const reply = decoder.decode(buffer.subarray(0, count ?? 0));
      await delay(300);
      connection.close();

      assert.match(reply, /^HTTP\/1\.1 200 /);
      assert.equal((await getText(server, "/app/do/hello")).text, "hello", "server still serves");
      assert.doesNotMatch(server.log().slice(logStart), /client stopped sending/);
    });

    await t.step("request larger than an inbox entry", async () => {
      // Most requests reach the isolate through its shared inbox; this one
      // does not fit an entry and takes the posted-message path, in order.
      const payload = randomBytes(40 * 1024);
      const big = "b".repeat(20 * 1024);
      // One request runs while the next waits behind it (the queue limit is 1).
      const small = fetch(server.origin + "/app/do/hello");
      const large = fetch(server.origin + "/app/do/upload", {
        method: "POST",
        body: payload,
        headers: { "x-big": big },
      });
      const [smallText, result] = await Promise.all([
        small.then((response) => response.text()),
        large.then((response) => response.json()),
      ]);
      assert.equal(result.length, payload.length);
      assert.equal(result.sha256, await sha256Hex(payload));
      assert.equal(smallText, "hello");
      assert.equal((await getText(server, "/app/do/hello")).text, "hello");
      assert.equal(await echoText(server, "/app/", "HTTP_X_BIG", [`X-Big: ${big}`]), big);
    });

    await t.step("readline(3) mid-line", async () => {
      const response = await fetch(server.origin + "/app/do/readline", {
        method: "POST",
        body: "abcdef\nxyz\n",
      });
      const [first, rest] = await response.json();
      assert.equal(first, "abc");
      assert.equal(rest, "def\n");
    });

    // --- Responses

    await t.step("generator raising after first chunk", async () => {
      // Keep-alive: only an aborted response makes the server close the connection.
      const request = "GET /app/do/stream-fail HTTP/1.1\r\nHost: localhost\r\n\r\n";
      const response = await exchange(server.port, request);
      assert.match(response.head, /^HTTP\/1\.1 200 /);
      assert.ok(response.text.includes("first chunk\n"), "first chunk received");
      assert.ok(response.closed, "connection closed");
      assert.ok(!response.text.includes("0\r\n\r\n"), "no final chunk");
      assert.equal((await getText(server, "/app/do/hello")).text, "hello", "server still serves");
    });

    await t.step("client hangup runs close()", async () => {
      const token = randomToken();
      const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
      await connection.write(
        encoder.encode(`GET /app/do/endless?token=${token} HTTP/1.1\r\nHost: x\r\n\r\n`),
      );
      const buffer = new Uint8Array(65536);
      const count = await connection.read(buffer);
      assert.notEqual(count, null, "the endless response started");
      connection.close();
      const closed = await server.waitForLog(new RegExp(`.*iterable closed ${token}`), 5000);
      assert.equal((await getText(server, "/app/do/hello")).text, "hello", "server still serves");
      // A client that leaves is no error of the server, whichever side notices it first.
      const requestId = closed.match(/request=([\w-]+)/)?.[1];
      assert.ok(requestId, closed);
      await server.waitForLog(
        new RegExp(`INFO \\[[^\\]]*request=${requestId}\\] client closed the connection`),
        5000,
      );
      // Its own marker line comes through wsgi.errors, which logs at ERROR.
      assert.doesNotMatch(
        server.log(),
        new RegExp(`ERROR \\[[^\\]]*request=${requestId}\\] (?!iterable closed)`),
      );
      assert.equal(
        countMatches(
          server.log(),
          new RegExp(`request=${requestId}\\] client closed the connection during`),
        ),
        1,
      );
    });

    await t.step("CRLF in header value", async () => {
      const response = await exchange(server.port, getRequest("/app/do/crlf-header"));
      assert.match(response.head, /^HTTP\/1\.1 500 /);
      assert.doesNotMatch(response.head, /^x-injected:/im);
      assert.doesNotMatch(response.head, /^x-bad:/im);
    });

    await t.step("two Set-Cookie headers", async () => {
      const response = await exchange(server.port, getRequest("/app/do/cookies"));
      const cookies = response.head.split("\r\n").filter((line) => /^set-cookie:/i.test(line));
      assert.deepEqual(cookies.map((line) => line.slice(line.indexOf(":") + 1).trim()), [
        "a=1",
        "b=2",
      ]);
    });

    // --- Static files and the access log

    await t.step("static alias bypasses Python", async () => {
      const before = await appCalls(server);
      const response = await getText(server, "/static/hello.txt");
      assert.equal(response.status, 200);
      assert.equal(response.text, await Deno.readTextFile(join(STATIC_DIR, "hello.txt")));
      assert.equal(await appCalls(server), before + 1, "the app was not called for /static");
    });

    await t.step("other paths reach the app", async () => {
      const response = await getText(server, "/app/not-static");
      assert.equal(response.status, 200);
      assert.equal(JSON.parse(response.text).PATH_INFO, "/not-static");
    });

    await t.step("access log line", async () => {
      const token = randomToken();
      await getText(server, `/app/logged?${token}`);
      const output = await pollUntil(() => server.output(), (text) => text.includes(token));
      const lines = output.split("\n").filter((line) => line.includes(token));
      assert.equal(lines.length, 1, "one line for the request");
      assert.ok(lines[0].includes(`"GET /app/logged?${token} HTTP/1.1" 200 `), lines[0]);
      // The duration in microseconds, then the id that the error log's lines carry.
      assert.match(lines[0], / \d+ [a-z0-9]{4}-\d+$/);
    });

    /** Returns the access log line of the request whose query is `token`. */
    const accessLine = async (token: string) => {
      const output = await pollUntil(() => server.output(), (text) => text.includes(token));
      return output.split("\n").find((line) => line.includes(token)) ?? "";
    };

    await t.step("access log sizes of server bodies", async () => {
      const missing = randomToken();
      assert.equal((await getText(server, `/nowhere?${missing}`)).status, 404);
      // "Not Found" and a newline.
      assert.ok((await accessLine(missing)).includes(`"GET /nowhere?${missing} HTTP/1.1" 404 10 `));

      const missingFile = randomToken();
      assert.equal((await getText(server, `/static/missing.txt?${missingFile}`)).status, 404);
      assert.ok(
        (await accessLine(missingFile)).includes(
          `"GET /static/missing.txt?${missingFile} HTTP/1.1" 404 10 `,
        ),
      );

      const head = randomToken();
      const response = await fetch(`${server.origin}/static/hello.txt?${head}`, { method: "HEAD" });
      await response.body?.cancel();
      assert.equal(response.status, 200);
      // As in Apache, a HEAD response sent no body.
      assert.ok(
        (await accessLine(head)).includes(`"HEAD /static/hello.txt?${head} HTTP/1.1" 200 - `),
      );
    });

    await t.step("access log time is the arrival", async () => {
      const token = randomToken();
      const sentAt = Date.now();
      assert.equal((await getText(server, `/app/do/slow?${token}`)).text, "slow done");
      const line = await accessLine(token);

      // [05/Dec/2026:09:14:47 +0000] has whole seconds, rounded down. The arrival
      // rounds down to at most sentAt plus the request's way to the server, while the
      // completion, 1.5 s later, would round down to at least sentAt + 500 ms.
      const stamp = /\[(\d\d)\/(\w{3})\/(\d{4}):(\d\d):(\d\d):(\d\d) \+0000\]/.exec(line);
      assert.ok(stamp, line);
      const months = [
        "Jan",
        "Feb",
        "Mar",
        "Apr",
        "May",
        "Jun",
        "Jul",
        "Aug",
        "Sep",
        "Oct",
        "Nov",
        "Dec",
      ];
      const [, day, month, year, hours, minutes, seconds] = stamp;
      const logged = Date.UTC(
        Number(year),
        months.indexOf(month),
        Number(day),
        Number(hours),
        Number(minutes),
        Number(seconds),
      );
      assert.ok(
        logged <= sentAt + 400,
        `logged ${logged - sentAt} ms after the request was sent: ${line}`,
      );
    });

    // --- Sandbox: the app requests host resources outside its folders

    const sandbox = async (caseName: string, query = "") => {
      const response = await getText(server, `/app/do/sandbox/${caseName}?${query}`);
      assert.equal(response.status, 200, `status of ${caseName}`);
      assert.ok(!response.text.includes(secret), `${caseName} shows the secret variable`);
      assert.ok(!response.text.includes(fileSecret), `${caseName} shows the secret file`);
      return response.text;
    };
    const pathQuery = `path=${encodeURIComponent(secretFile)}`;

    await t.step("sandbox: open() outside folders", async () => {
      // Only the app's folders are mounted, so the file does not exist for Python.
      assert.match(await sandbox("open", pathQuery), /^denied: FileNotFoundError/);
    });

    await t.step("sandbox: Deno.readTextFileSync", async () => {
      assert.match(await sandbox("deno-read", pathQuery), /^denied: JsException: NotCapable/);
      assert.match(
        await sandbox("deno-read", "path=/etc/hostname"),
        /^denied: JsException: NotCapable/,
      );
    });

    await t.step("sandbox: listing /", async () => {
      // os.listdir shows Pyodide's own file system, never the host's root.
      // Pyodide's /usr holds only the time zone data wsgirun mounts at
      // /usr/share/zoneinfo, so "usr" is not a sign of the host's root.
      const listing = await sandbox("listdir");
      assert.match(listing, /^allowed: /);
      for (const hostOnly of ["bin", "etc", "root", "var"]) {
        assert.ok(!listing.includes(`'${hostOnly}'`), `listing shows the host's /${hostOnly}`);
      }
      assert.match(await sandbox("deno-readdir"), /^denied: JsException: NotCapable/);
    });

    await t.step("sandbox: os.environ", async () => {
      const environ = await sandbox("environ");
      assert.match(environ, /^allowed: /);
      assert.ok(!environ.includes("WSGIRUN_TEST_SECRET"), "os.environ names the server's variable");
    });

    await t.step("sandbox: Deno.env.get", async () => {
      const result = await sandbox("deno-env", "name=WSGIRUN_TEST_SECRET");
      assert.match(result, /^denied: JsException: NotCapable/);
    });

    await t.step("sandbox: Deno.Command", async () => {
      // Deno 2 removed Deno.run, so Deno.Command is the API that starts a process.
      assert.match(await sandbox("deno-command"), /^denied: JsException: NotCapable/);
    });

    await t.step("sandbox: fetch to loopback", async () => {
      const url = encodeURIComponent(`${server.origin}/app/do/hello`);
      // fetch() returns a promise the app cannot wait for inside a request,
      // so the app records the outcome and a later request reads it.
      assert.equal(await sandbox("fetch", `url=${url}`), "allowed: 'started'");
      const outcome = await pollUntil(
        async () => (await getText(server, "/app/do/fetch-outcome")).text,
        (text) => text !== "pending",
      );
      assert.match(outcome, /^denied: NotCapable/);
    });

    // --- Queue limit: one isolate and one queue place

    await t.step("full queue answers 503", async () => {
      const slow = fetch(server.origin + "/app/do/slow");
      await server.waitForLog(/slow request started/, 5000);

      // One of the two waits in the queue and the other finds it full. Which one
      // arrives first is up to the network, so the test accepts either order.
      const responses = await Promise.all([
        fetch(server.origin + "/app/do/hello"),
        fetch(server.origin + "/app/do/hello"),
      ]);
      await Promise.all(responses.map((response) => response.text()));
      const statuses = responses.map((response) => response.status).sort();
      assert.deepEqual(statuses, [200, 503]);
      const rejected = responses.find((response) => response.status === 503)!;
      assert.match(rejected.headers.get("retry-after") ?? "", /^\d+$/, "Retry-After");
      assert.match(server.log(), /request rejected with 503: request queue is full/);

      const slowResponse = await slow;
      assert.equal(await slowResponse.text(), "slow done");
      assert.equal((await getText(server, "/app/do/hello")).status, 200, "served after the burst");
    });

    // --- Stop

    await t.step("SIGTERM stops with 0", async () => {
      const status = await server.stop();
      assert.equal(status.code, 0);
      assert.match(server.log(), /server stopped/);
    });
  } finally {
    await Deno.remove(outside, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Import failures: the script's behavior is chosen by mode.txt beside it

Deno.test("server import failures", async (t) => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_server_test_" });
  const script = join(folder, "server_import.wsgi");
  const setMode = (mode: string) => Deno.writeTextFile(join(folder, "mode.txt"), mode);
  await Deno.copyFile(IMPORT_SCRIPT, script);
  await setMode("raise");
  try {
    await using server = await startServer(script);

    // The server may also import the script once at start (to build a
    // snapshot), so the tests count the failures each request adds.
    const importFailures = () =>
      server.log().match(/RuntimeError: import failed on purpose/g)?.length ?? 0;
    const requestImportFailure = async () => {
      const before = importFailures();
      const response = await getText(server, "/");
      assert.equal(response.status, 500);
      const after = await pollUntil(importFailures, (count) => count > before);
      assert.equal(after, before + 1, "the request imported the script again");
    };

    await t.step("import error gives 500", async () => {
      await requestImportFailure();
      // The traceback starts at the script, below the server's own loader.
      assert.match(
        server.log(),
        /the next request retries\n.*\] Traceback \(most recent call last\):\n.*\] {3}File "[^"]*server_import\.wsgi"/,
      );
    });

    await t.step("server runs after import error", async () => {
      await requestImportFailure();
    });

    await t.step("missing application gives 500", async () => {
      await setMode("missing");
      const response = await getText(server, "/");
      assert.equal(response.status, 500);
      const line = await server.waitForLog(/defines no 'application'.*/, 5000);
      assert.match(line, /--callable-object/);
    });

    await t.step("import retried after fix", async () => {
      await setMode("ok");
      const response = await getText(server, "/");
      assert.equal(response.status, 200);
      assert.equal(response.text, "imported");
    });
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("preload failure named in ready line", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_server_test_" });
  const script = join(folder, "server_import.wsgi");
  await Deno.copyFile(IMPORT_SCRIPT, script);
  await Deno.writeTextFile(join(folder, "mode.txt"), "raise");
  try {
    await using server = await startServer(script, [
      "--threads",
      "1",
      "--preload",
      "--snapshot",
      "runtime",
    ]);
    await server.waitForLog(/isolate ready without the application, whose import failed: /, 60_000);
    assert.doesNotMatch(server.log(), /isolate ready: /);
    assert.equal((await getText(server, "/")).status, 500);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// One script at two prefixes: the log lines name the mount

Deno.test("server log names shared-name mounts", async () => {
  await using server = await startServer(MOUNT_LOG_SCRIPT, [
    "--threads",
    "1",
    "--mount-point",
    "/a",
    "--mount",
    "/b",
    MOUNT_LOG_SCRIPT,
    // A third application, with a name no other mount has, keeps its lines unchanged.
    "--mount",
    "/c",
    OTHER_APP_SCRIPT,
    "--access-log",
  ], { waitForReady: false });
  await server.waitForLog(/(isolate ready[\s\S]*){3}/, 120_000);
  const log = () => server.log();

  // Each pool numbers its isolates from 1, so only the mount key distinguishes the two pools.
  assert.match(log(), /\[app=mount_log_app\.wsgi mount=\/a pid=\d+ isolate=1\] isolate ready/);
  assert.match(log(), /\[app=mount_log_app\.wsgi mount=\/b pid=\d+ isolate=1\] isolate ready/);
  assert.match(log(), /\[app=app\.wsgi pid=\d+ isolate=1\] isolate ready/);
  const unlabelled = /\[app=mount_log_app\.wsgi pid=\d+ isolate=/;
  assert.doesNotMatch(log(), unlabelled, "an isolate line without mount=");

  // The server's own lines keep the main application's context, and their
  // messages name the prefixes.
  assert.match(log(), /listening on http:\/\/127\.0\.0\.1:\d+\/a \(/);
  assert.match(log(), /mounted mount_log_app\.wsgi at \/b: embedded/);
  assert.match(log(), /mounted app\.wsgi at \/c: embedded/);

  const idA = (await getText(server, "/a/")).text;
  const idB = (await getText(server, "/b/")).text;
  assert.match(idA, /^[a-z0-9]+-\d+$/);
  assert.match(idB, /^[a-z0-9]+-\d+$/);
  assert.notEqual(idA, idB, "request ids are unique across mounts");

  const requestLine = (id: string) => new RegExp(`.*request=${id}\\] mount log request.*`);
  const lineA = await server.waitForLog(requestLine(idA), 10_000);
  const lineB = await server.waitForLog(requestLine(idB), 10_000);
  assert.match(lineA, /ERROR \[app=mount_log_app\.wsgi mount=\/a pid=\d+ isolate=1 request=/);
  assert.match(lineA, /mount log request for \/a$/);
  assert.match(lineB, /ERROR \[app=mount_log_app\.wsgi mount=\/b pid=\d+ isolate=1 request=/);
  assert.match(lineB, /mount log request for \/b$/);

  // The access log shows the full path, prefix included.
  const output = await pollUntil(() => server.output(), (text) => text.includes("GET /b/ "));
  assert.match(output, /"GET \/a\/ HTTP\/1\.1" 200 /);
  assert.match(output, /"GET \/b\/ HTTP\/1\.1" 200 /);
});

Deno.test("send timeout frees a stalled reader's isolate", async () => {
  await using server = await startServer(APP_SCRIPT, [
    "--callable-object",
    "app",
    "--threads",
    "1",
    "--send-timeout",
    "1",
    "--access-log",
  ]);
  // This client requests an endless body and reads none of it.
  const token = randomToken();
  const stalled = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  try {
    await stalled.write(
      encoder.encode(`GET /do/endless?token=${token} HTTP/1.1\r\nHost: x\r\n\r\n`),
    );
    const stopped = await server.waitForLog(/.*response stopped after \d+ bytes.*/, 30_000);
    // The only isolate serves the next request while the stalled connection stays open.
    const hello = await fetch(`${server.origin}/do/hello`, { signal: AbortSignal.timeout(10_000) });

    assert.equal(hello.status, 200);
    assert.equal(await hello.text(), "hello");
    assert.match(
      stopped,
      /WARNING .*the client's socket took no more response bytes for 1 s \(--send-timeout\)/,
    );
    await server.waitForLog(new RegExp(`iterable closed ${token}`), 5000);
    assert.match(server.output(), /"GET \/do\/endless\?token=\w+ HTTP\/1\.1" 200 \d+ /);
  } finally {
    stalled.close();
  }
});

Deno.test("send timeout closes a stalled static file", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_static_stall_" });
  const file = join(folder, "large.bin");
  await Deno.writeFile(file, new Uint8Array(64 * MiB));
  try {
    await using server = await startServer(APP_SCRIPT, [
      "--callable-object",
      "app",
      "--url-alias",
      "/static",
      folder,
      "--send-timeout",
      "1",
    ]);
    const stalled = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    try {
      await stalled.write(encoder.encode("GET /static/large.bin HTTP/1.1\r\nHost: x\r\n\r\n"));
      await server.waitForLog(
        /WARNING .*Stopped sending a static file: the client's socket took no more response bytes for 1 s/,
        30_000,
      );

      // The file is closed while the connection stays open.
      const open = Array.from(Deno.readDirSync(`/proc/${server.process.pid}/fd`)).filter(
        (entry) => {
          try {
            return Deno.readLinkSync(`/proc/${server.process.pid}/fd/${entry.name}`) === file;
          } catch {
            return false;
          }
        },
      );
      assert.equal(open.length, 0);
    } finally {
      stalled.close();
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("static raw UTF-8 names and access lines", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_static_test_" });
  try {
    await Deno.writeTextFile(join(folder, "caf\u00e9.txt"), "accent\n");
    // Sparse, so the file costs no disk space.
    const large = await Deno.open(join(folder, "large.bin"), { create: true, write: true });
    await large.truncate(64 * MiB);
    large.close();
    await using server = await startServer(APP_SCRIPT, [
      "--callable-object",
      "app",
      "--threads",
      "1",
      "--url-alias",
      "/files",
      folder,
      "--access-log",
    ]);
    const accessLine = async (token: string) => {
      const output = await pollUntil(() => server.output(), (text) => text.includes(token));
      return output.split("\n").find((line) => line.includes(token)) ?? "";
    };

    // Clients other than browsers send the UTF-8 bytes of a name unescaped.
    const raw = randomToken();
    const response = await exchange(server.port, getRequest(`/files/caf\u00e9.txt?${raw}`));
    assert.match(response.head, /^HTTP\/1\.1 200 /);
    assert.equal(decoder.decode(response.body), "accent\n");
    // As in Apache, bytes outside printable ASCII appear as \xhh.
    assert.ok(
      (await accessLine(raw)).includes(`"GET /files/caf\\xc3\\xa9.txt?${raw} HTTP/1.1" 200 7 `),
      await accessLine(raw),
    );
    const escaped = await fetch(`${server.origin}/files/caf%C3%A9.txt`);
    assert.equal(await escaped.text(), "accent\n");

    // A client that leaves after the first read of a large file: the line
    // comes once the body stops, with the bytes that went out.
    const cut = randomToken();
    const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    await connection.write(getRequest(`/files/large.bin?${cut}`));
    assert.notEqual(await connection.read(new Uint8Array(65536)), null);
    connection.close();
    const cutLine = await accessLine(cut);
    // "-" when the client left before the first piece of the body went out.
    const sent = /" 200 (\d+|-) /.exec(cutLine);
    assert.ok(sent, cutLine);
    const bytes = sent[1] === "-" ? 0 : Number(sent[1]);
    assert.ok(bytes < 64 * MiB, cutLine);

    const whole = randomToken();
    const all = await fetch(`${server.origin}/files/large.bin?${whole}`);
    assert.equal((await all.arrayBuffer()).byteLength, 64 * MiB);
    assert.ok((await accessLine(whole)).includes(` 200 ${64 * MiB} `), await accessLine(whole));
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Python 3.12

Deno.test("server on Python 3.12", async () => {
  await using server = await startServer(APP_SCRIPT, [
    "--python",
    "3.12",
    "--callable-object",
    "app",
  ]);
  const hello = await getText(server, "/do/hello");
  assert.equal(hello.text, "hello");
  const version = await getText(server, "/do/version");
  assert.match(version.text, /^3\.12\./);
});

const MMAP_ARGS = ["--callable-object", "app", "--threads", "1", "--log-level", "debug"];

Deno.test("server fixes glibc's mmap threshold unless the user set it", async () => {
  {
    await using server = await startServer(APP_SCRIPT, MMAP_ARGS);
    assert.equal((await getText(server, "/do/hello")).text, "hello");
    assert.match(server.log(), /malloc: mmap threshold fixed at 131072 bytes/);
  }
  await using server = await startServer(APP_SCRIPT, MMAP_ARGS, {
    env: { MALLOC_MMAP_THRESHOLD_: "262144" },
  });
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  assert.match(server.log(), /malloc: MALLOC_MMAP_THRESHOLD_ is set, keeping it/);
});

Deno.test("server replaces an invalid mmap threshold", async () => {
  await using server = await startServer(APP_SCRIPT, MMAP_ARGS, {
    env: { MALLOC_MMAP_THRESHOLD_: "abc" },
  });
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  assert.match(
    server.log(),
    /WARNING \[pid=\d+\] malloc: MALLOC_MMAP_THRESHOLD_="abc" is invalid: .* mmap threshold fixed at 131072 bytes instead/,
  );
});

Deno.test("server keeps a threshold from GLIBC_TUNABLES", async () => {
  await using server = await startServer(APP_SCRIPT, MMAP_ARGS, {
    env: { GLIBC_TUNABLES: "glibc.malloc.mmap_threshold=262144" },
  });
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  assert.match(server.log(), /malloc: GLIBC_TUNABLES sets glibc.malloc.mmap_threshold, keeping it/);
});

Deno.test("daemon malloc environment follows the user's settings", () => {
  const saved = {
    threshold: Deno.env.get("MALLOC_MMAP_THRESHOLD_"),
    tunables: Deno.env.get("GLIBC_TUNABLES"),
  };
  const set = (name: string, value: string | undefined) =>
    value === undefined ? Deno.env.delete(name) : Deno.env.set(name, value);
  try {
    set("GLIBC_TUNABLES", undefined);
    set("MALLOC_MMAP_THRESHOLD_", undefined);
    assert.deepEqual(daemonMallocEnvironment(), { MALLOC_MMAP_THRESHOLD_: "131072" });
    set("MALLOC_MMAP_THRESHOLD_", "262144");
    assert.deepEqual(daemonMallocEnvironment(), { MALLOC_MMAP_THRESHOLD_: "262144" });
    for (const invalid of ["", "abc", "-1", "1e6", "99999999999"]) {
      set("MALLOC_MMAP_THRESHOLD_", invalid);
      assert.deepEqual(daemonMallocEnvironment(), { MALLOC_MMAP_THRESHOLD_: "131072" }, invalid);
    }
    set("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536");
    assert.deepEqual(daemonMallocEnvironment(), {
      GLIBC_TUNABLES: "glibc.malloc.mmap_threshold=65536",
    });
  } finally {
    set("MALLOC_MMAP_THRESHOLD_", saved.threshold);
    set("GLIBC_TUNABLES", saved.tunables);
  }
});

Deno.test("server without FFI permission warns about malloc", async () => {
  await using server = await startServer(APP_SCRIPT, MMAP_ARGS, {
    permissions: [
      "--allow-read",
      "--allow-write",
      "--allow-net",
      "--allow-env",
      "--allow-run",
      "--allow-sys",
    ],
  });
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  assert.match(
    server.log(),
    /WARNING \[pid=\d+\] malloc: cannot fix the mmap threshold without FFI permission.*--allow-ffi/,
  );
});

Deno.test("server without FFI names an invalid threshold", async () => {
  await using server = await startServer(APP_SCRIPT, MMAP_ARGS, {
    permissions: [
      "--allow-read",
      "--allow-write",
      "--allow-net",
      "--allow-env",
      "--allow-run",
      "--allow-sys",
    ],
    env: { MALLOC_MMAP_THRESHOLD_: "abc" },
  });
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  assert.match(
    server.log(),
    /WARNING \[pid=\d+\] malloc: MALLOC_MMAP_THRESHOLD_="abc" is invalid: .* cannot replace it, .*correct or unset it/,
  );
});

// ---------------------------------------------------------------------------
// Command line through the real entry point

async function runCli(
  args: string[],
  permissions = ["--allow-all"],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const command = new Deno.Command(Deno.execPath(), {
    args: serverArgs(args, permissions),
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    signal: AbortSignal.timeout(30_000),
  });
  const output = await command.output();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

Deno.test("cli --help lists every option", async () => {
  const result = await runCli(["--help"]);
  assert.equal(result.code, 0);
  for (const option of OPTIONS) {
    assert.ok(result.stdout.includes(option.name), `help lists ${option.name}`);
  }
});

Deno.test("cli without permissions names them", async () => {
  const result = await runCli([APP_SCRIPT, "--port", "0"], ["--allow-read", "--allow-net"]);
  assert.equal(result.code, 2);
  assert.match(
    result.stderr,
    /^wsgirun: missing Deno permissions: write, env, run, sys; start it with `deno run --allow-all`/,
  );
});

Deno.test("server --env reaches the application", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-env-" });
  await Deno.writeTextFile(
    `${folder}/app.wsgi`,
    `
import os

AT_IMPORT = os.environ.get("GREETING", "unset")

def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    values = [AT_IMPORT, os.environ.get("GREETING", "unset"), os.environ.get("WSGIRUN_TEST_SERVER_ONLY", "unset"), os.environ.get("WSGIRUN_TEST_PASSED", "unset")]
    return [" ".join(values).encode()]
`,
  );
  try {
    await using server = await startServer(`${folder}/app.wsgi`, [
      "--threads",
      "1",
      "--env",
      "GREETING=hello there",
      "--env",
      "WSGIRUN_TEST_PASSED",
    ], {
      env: { WSGIRUN_TEST_SERVER_ONLY: "secret", WSGIRUN_TEST_PASSED: "passed on" },
    });
    const text = await (await fetch(server.origin + "/")).text();

    // The variable is set before the import, so module code reads it. The server's
    // own variables stay out, except the one named alone.
    assert.equal(text, "hello there hello there unset passed on");
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("server IPv6 address in brackets", async () => {
  const command = new Deno.Command(Deno.execPath(), {
    args: serverArgs([APP_SCRIPT, "--host", "::1", "--port", "0"]),
    stdout: "null",
    stderr: "piped",
    stdin: "null",
  });
  const process = command.spawn();
  let log = "";
  try {
    const reader = process.stderr.pipeThrough(new TextDecoderStream()).getReader();
    log = await readUntil(reader, /listening on/, 30_000);
    reader.releaseLock();
  } finally {
    process.kill("SIGTERM");
    await process.status;
    await process.stderr.cancel().catch(() => {});
  }

  assert.match(log, /listening on http:\/\/\[::1\]:\d+\/ /);
});

Deno.test("server outlives the reader of its log", async () => {
  const process = new Deno.Command(Deno.execPath(), {
    args: serverArgs([
      APP_SCRIPT,
      "--callable-object",
      "app",
      "--threads",
      "1",
      "--port",
      "0",
      "--access-log",
      "--log-level",
      "debug",
    ]),
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  try {
    const reader = process.stderr.pipeThrough(new TextDecoderStream()).getReader();
    const log = await readUntil(reader, /isolate ready/, 60_000);
    const port = /listening on http:\/\/127\.0\.0\.1:(\d+)\//.exec(log)?.[1];
    assert.ok(port, log);
    // Like `wsgirun ... 2>&1 | head -1`: both pipes lose their reader.
    await reader.cancel();
    await process.stdout.cancel();

    // Each request writes an access line and debug lines to the closed pipes.
    for (let i = 0; i < 3; i++) {
      const response: Response = await fetch(`http://127.0.0.1:${port}/do/hello`);
      assert.equal(await response.text(), "hello");
    }
    const exited = await Promise.race([
      process.status.then(() => true),
      delay(500).then(() => false),
    ]);
    assert.equal(exited, false, "the server exited");
  } finally {
    process.kill("SIGTERM");
    await process.status;
  }
});

for (const signal of ["SIGTERM", "SIGQUIT"] as const) {
  Deno.test(`pid file removed after ${signal}`, async () => {
    const folder = await Deno.makeTempDir({ prefix: "wsgirun_pid_test_" });
    const path = join(folder, "wsgirun.pid");
    // A file that a killed server left behind is replaced.
    await Deno.writeTextFile(path, "999999\n");
    const server = await startEchoServer(["--pid", path]);
    try {
      assert.equal(await Deno.readTextFile(path), `${server.process.pid}\n`);
      // A second server does not take over the pid file of a running server.
      const second = await runCli([APP_SCRIPT, "--port", "0", "--pid", path]);
      assert.equal(second.code, 2);
      assert.match(
        second.stderr,
        new RegExp(
          `the pid file \\S+ names process ${server.process.pid}, a server that is still running`,
        ),
      );
      assert.equal(await Deno.readTextFile(path), `${server.process.pid}\n`);
    } finally {
      server.process.kill(signal);
      assert.equal((await server.stop()).code, 0);
    }
    await assert.rejects(Deno.lstat(path), Deno.errors.NotFound);
    await Deno.remove(folder, { recursive: true });
  });
}

Deno.test("rejected uploads free their connections", async () => {
  await using server = await startEchoServer(["--queue-limit", "1"]);
  const openFiles = () => [...Deno.readDirSync(`/proc/${server.process.pid}/fd`)].length;
  const before = openFiles();
  // Each client announces 10 MiB, sends 100 kB and leaves. The isolate and the
  // queue hold the first two, and the others get 503 before their body is read.
  const head = "POST /do/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n";
  const payload = new Uint8Array([...encoder.encode(head), ...new Uint8Array(100_000)]);
  for (let i = 0; i < 40; i++) {
    const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
    await connection.write(payload).catch(() => 0);
    connection.close();
  }
  await waitForCount(server, /request rejected with 503/, 38);
  await delay(1000);
  // Without the cancel of the unread body, each rejected connection kept a descriptor.
  assert.ok(openFiles() <= before + 5, `${before} open files before, ${openFiles()} after`);
});

Deno.test("server from a config file", async () => {
  // The command line's --port 0 comes after the file's port 8000 and replaces it.
  await using server = await startServer("", [
    "--config",
    repoPath("examples/hello/wsgirun.conf"),
  ]);
  assert.match(
    server.log(),
    /listening on http:\/\/127\.0\.0\.1:\d+\/ \(Python 3\.14, 2 isolates\)/,
  );
  const response = await fetch(`${server.origin}/from-config`);
  assert.equal(await response.text(), "Hello, world!\n");
  const output = await pollUntil(() => server.output(), (text) => text.includes("/from-config"));
  assert.match(output, /"GET \/from-config HTTP\/1\.1" 200 14 "-" "\S+"$/m);
});

Deno.test("access log format", async () => {
  await using server = await startServer(repoPath("examples/hello/app.wsgi"), [
    "--threads",
    "1",
    "--access-log-format",
    "%m %U%q %>s %B %{X-Trace}i %u %L",
  ]);
  const token = randomToken();
  const response = await fetch(`${server.origin}/hello?${token}`, {
    headers: { "X-Trace": "t-1", Authorization: "Basic " + btoa("ops:pw") },
  });
  const size = (await response.arrayBuffer()).byteLength;
  const output = await pollUntil(() => server.output(), (text) => text.includes(token));
  const line = output.split("\n").find((text) => text.includes(token));
  assert.match(
    line ?? "",
    new RegExp(`^GET /hello\\?${token} 200 ${size} t-1 ops [a-z0-9]{4}-\\d+$`),
  );
});

const FORWARDING_HEADERS = {
  "X-Forwarded-For": "203.0.113.9, 127.0.0.1",
  "X-Forwarded-Proto": "https",
  "X-Forwarded-Host": "shop.example.test",
  "X-Forwarded-Port": "443",
};

/** Starts the echo fixture with one isolate and `args`. */
function startEchoServer(args: string[]): Promise<TestServer> {
  return startServer(APP_SCRIPT, ["--callable-object", "app", "--threads", "1", ...args]);
}

Deno.test("trusted proxy headers applied", async () => {
  await using server = await startEchoServer([
    "--trusted-proxy",
    "127.0.0.0/8",
    "--access-log-format",
    "%a %h %U",
  ]);
  const response = await fetch(`${server.origin}/echo`, { headers: FORWARDING_HEADERS });
  const environ = await response.json();
  assert.equal(environ.REMOTE_ADDR, "203.0.113.9");
  assert.equal(environ["wsgi.url_scheme"], "https");
  assert.equal(environ.HTTPS, "on");
  assert.equal(environ.HTTP_HOST, "shop.example.test");
  assert.equal(environ.SERVER_NAME, "shop.example.test");
  assert.equal(environ.SERVER_PORT, "443");
  // The access log's %a is the client, %h the connection's peer.
  const output = await pollUntil(() => server.output(), (text) => text.includes("/echo"));
  assert.match(output, /^203\.0\.113\.9 127\.0\.0\.1 \/echo$/m);

  // An invalid value is ignored, with one warning per header.
  for (let i = 0; i < 2; i++) {
    const bad = await fetch(`${server.origin}/echo`, { headers: { "X-Forwarded-Proto": "ftp" } });
    assert.equal((await bad.json())["wsgi.url_scheme"], "http");
  }
  assert.equal(
    countMatches(
      server.log(),
      /WARNING .*request=\S+\] ignored the invalid X-Forwarded-Proto header 'ftp' from the trusted proxy 127\.0\.0\.1/,
    ),
    1,
  );
});

Deno.test("untrusted peer loses forwarding headers", async () => {
  await using server = await startEchoServer(["--trusted-proxy", "192.0.2.1"]);
  const response = await fetch(`${server.origin}/echo`, {
    headers: { ...FORWARDING_HEADERS, "X-Other": "kept" },
  });
  const environ = await response.json();
  assert.equal(environ.REMOTE_ADDR, "127.0.0.1");
  assert.equal(environ["wsgi.url_scheme"], "http");
  assert.equal(environ.HTTP_X_OTHER, "kept");
  for (const key of ["FOR", "PROTO", "HOST", "PORT"]) {
    assert.equal(environ[`HTTP_X_FORWARDED_${key}`], undefined, key);
  }
});

const TLS_FIXTURE = repoPath("tests/fixtures/tls");

Deno.test("https with certfile and keyfile", async () => {
  await using server = await startEchoServer([
    "--certfile",
    join(TLS_FIXTURE, "cert.pem"),
    "--keyfile",
    join(TLS_FIXTURE, "key.pem"),
  ]);
  assert.ok(server.origin.startsWith("https://"), server.origin);
  const cert = await Deno.readTextFile(join(TLS_FIXTURE, "cert.pem"));
  using client = Deno.createHttpClient({ caCerts: [cert] });
  const response = await fetch(`${server.origin}/echo?x=1`, { client });
  const environ = await response.json();
  assert.equal(environ["wsgi.url_scheme"], "https");
  assert.equal(environ.HTTPS, "on");
  assert.equal(environ.PATH_INFO, "/echo");
  assert.equal(environ.QUERY_STRING, "x=1");

  // HTTP/2 sends no Host header: the host comes from its :authority.
  using http2 = Deno.createHttpClient({ caCerts: [cert], http1: false, http2: true });
  const overHttp2 = await (await fetch(`${server.origin}/echo`, { client: http2 })).json();
  assert.equal(overHttp2.HTTP_HOST, `127.0.0.1:${server.port}`);
  assert.equal(overHttp2.SERVER_NAME, "127.0.0.1");
  assert.equal(overHttp2["wsgi.url_scheme"], "https");

  // Plain HTTP gets no response on that port.
  await assert.rejects(fetch(`http://127.0.0.1:${server.port}/echo`));
});

Deno.test("https key of another certificate", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_tls_test_" });
  try {
    // A fresh key, in PEM form, that the fixture's certificate does not belong to.
    const pair = await crypto.subtle.generateKey(
      { name: "ECDSA", namedCurve: "P-256" },
      true,
      ["sign"],
    ) as CryptoKeyPair;
    const der = new Uint8Array(await crypto.subtle.exportKey("pkcs8", pair.privateKey));
    const base64 = btoa(String.fromCharCode(...der)).replace(/.{64}/g, "$&\n");
    const keyFile = join(folder, "other-key.pem");
    await Deno.writeTextFile(
      keyFile,
      `-----BEGIN PRIVATE KEY-----\n${base64}\n-----END PRIVATE KEY-----\n`,
    );
    const outcome = await startEchoServer([
      "--certfile",
      join(TLS_FIXTURE, "cert.pem"),
      "--keyfile",
      keyFile,
    ]).then(
      async (server) => {
        await server.stop();
        return "the server started";
      },
      (error: Error) => error.message,
    );
    assert.match(outcome, /the server exited with code 2 during startup/);
    assert.match(
      outcome,
      /wsgirun: cannot use the certificate \S+cert\.pem with the key \S+other-key\.pem: .*KeyMismatch/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

/**
 * Leaves a socket file at `path` without a listener, as a server killed
 * with SIGKILL does: a child process listens there and is killed.
 */
async function leaveStaleSocket(path: string): Promise<void> {
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "eval",
      `Deno.listen({ transport: "unix", path: ${JSON.stringify(path)} }); ` +
      `console.log("listening"); setInterval(() => {}, 1000);`,
    ],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  await reader.read();
  child.kill("SIGKILL");
  await child.status;
  await reader.cancel();
  assert.ok((await Deno.lstat(path)).isSocket);
}

Deno.test("unix socket server", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_unix_test_" });
  const path = join(folder, "site.sock");
  await leaveStaleSocket(path);
  const process = new Deno.Command(Deno.execPath(), {
    args: serverArgs([
      APP_SCRIPT,
      "--callable-object",
      "app",
      "--threads",
      "1",
      "--unix-socket",
      path,
      "--trusted-proxy",
      "unix",
    ]),
    stdout: "null",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  const reader = process.stderr.pipeThrough(new TextDecoderStream()).getReader();
  try {
    const log = await readUntil(reader, /isolate ready/, 60_000);
    assert.match(log, /listening on unix:\S+site\.sock, URL path \/ \(/);
    // As on a loopback port, every local user may connect.
    assert.equal((await Deno.lstat(path)).mode! & 0o777, 0o666);

    using client = Deno.createHttpClient({ proxy: { transport: "unix", path } });
    const response = await fetch("http://site.test:8080/echo", {
      client,
      headers: { "X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https" },
    });
    const environ = await response.json();
    assert.equal(environ.SERVER_NAME, "site.test");
    assert.equal(environ.SERVER_PORT, "8080");
    assert.equal(environ.PATH_INFO, "/echo");
    assert.equal(environ.REMOTE_PORT, undefined);
    // The proxy on the socket is trusted, so its headers tell the client.
    assert.equal(environ.REMOTE_ADDR, "198.51.100.7");
    assert.equal(environ["wsgi.url_scheme"], "https");

    // A second server on the same path fails at once with the reason.
    const second = await runCli([APP_SCRIPT, "--unix-socket", path]);
    assert.equal(second.code, 2);
    assert.match(
      second.stderr,
      /cannot listen on the Unix socket \S+: another server listens there/,
    );
  } finally {
    process.kill("SIGTERM");
    await process.status;
    await reader.cancel();
  }
  // The server removes its socket when it stops.
  await assert.rejects(Deno.lstat(path), Deno.errors.NotFound);
  await Deno.remove(folder, { recursive: true });
});

Deno.test("unix socket path taken by a file", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun_unix_test_" });
  const path = join(folder, "taken");
  await Deno.writeTextFile(path, "data");
  const result = await runCli([APP_SCRIPT, "--unix-socket", path]);
  assert.equal(result.code, 2);
  assert.match(
    result.stderr,
    /cannot listen on the Unix socket \S+taken: the path is taken by a file that is not a socket/,
  );
  assert.equal(await Deno.readTextFile(path), "data");
  await Deno.remove(folder, { recursive: true });
});

Deno.test("cli port in use", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const result = await runCli([APP_SCRIPT, "--port", String(listener.addr.port)]);

    assert.equal(result.code, 1);
    assert.equal(
      result.stderr.trim().split("\n").at(-1),
      `wsgirun: cannot listen on 127.0.0.1:${listener.addr.port}: the address is already in use; ` +
        "stop the server that uses it or choose another --port",
    );
    assert.doesNotMatch(result.stderr, /Uncaught|at startServer/);
  } finally {
    listener.close();
  }
});

Deno.test("cli invalid --port", async () => {
  const result = await runCli([APP_SCRIPT, "--port", "abc"]);
  assert.equal(result.code, 2);
  const message = result.stderr.trim();
  assert.ok(!message.includes("\n"), `one line: ${message}`);
  assert.ok(message.includes("--port"), message);
  assert.ok(message.includes("'abc'"), message);
});

Deno.test("cli missing script file", async () => {
  const result = await runCli([repoPath("tests/fixtures/server_no_such_script.wsgi")]);
  assert.equal(result.code, 2);
  assert.ok(result.stderr.includes("server_no_such_script.wsgi"), result.stderr);
});

Deno.test("cli without script", async () => {
  const result = await runCli([]);
  assert.equal(result.code, 2);
  assert.ok(result.stderr.includes("SCRIPT"), result.stderr);
});

Deno.test("cli unknown option", async () => {
  const result = await runCli([APP_SCRIPT, "--no-such-option"]);
  assert.equal(result.code, 2);
  assert.ok(result.stderr.includes("--no-such-option"), result.stderr);
});

// ---------------------------------------------------------------------------
// Body timeout

/**
 * Sends a request head and `sent` bytes of a body of `declared` bytes (or
 * one chunk of `sent` bytes when `declared` is null), then nothing more, and
 * returns the start of the response.
 */
async function stallBody(port: number, declared: number | null, sent: number): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const framing = declared === null
      ? "Transfer-Encoding: chunked"
      : `Content-Length: ${declared}`;
    const head = `POST /do/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n${framing}\r\n\r\n`;
    const data = "a".repeat(sent);
    const body = declared === null ? `${sent.toString(16)}\r\n${data}\r\n` : data;
    await conn.write(encoder.encode(head + body));
    const reply = new Uint8Array(4096);
    const count = await conn.read(reply);
    return decoder.decode(reply.subarray(0, count ?? 0));
  } finally {
    conn.close();
  }
}

/** The test application's callable on one isolate. */
const ONE_APP_ISOLATE = ["--callable-object", "app", "--threads", "1"];

Deno.test("malformed chunked body gets 400", async () => {
  await using server = await startServer(APP_SCRIPT, ONE_APP_ISOLATE);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  let reply = "";
  try {
    const head =
      "POST /do/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    await conn.write(encoder.encode(head + "5\r\nhello\r\n"));
    // The bad chunk comes once the application reads the body.
    await delay(500);
    await conn.write(encoder.encode("zz\r\nbad\r\n0\r\n\r\n"));
    const buffer = new Uint8Array(4096);
    const count = await conn.read(buffer);
    reply = decoder.decode(buffer.subarray(0, count ?? 0));
  } finally {
    conn.close();
  }

  assert.equal(reply.split("\r\n")[0], "HTTP/1.1 400 Bad Request", reply);
  await server.waitForLog(
    /WARNING .*request failed with 400: malformed request body \(invalid chunked transfer coding\)/,
    5000,
  );
  // The isolate that was reading the body names the cause, not a client that left.
  await server.waitForLog(
    /isolate=1 .*\] the client sent a malformed request body \(invalid chunked transfer coding\); the request was stopped/,
    5000,
  );
  assert.doesNotMatch(
    server.log(),
    /client stopped sending the request body|client closed the connection before the request body ended/,
  );
  assert.equal((await fetch(`${server.origin}/`)).status, 200);
});

Deno.test("module removed from Python 3.14 named with the fix", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-removed-" });
  try {
    await Deno.writeTextFile(
      `${folder}/app.wsgi`,
      "import cgi\nimport ast\nast.Str\ndef application(environ, start_response):\n    pass\n",
    );
    await using server = await startServer(`${folder}/app.wsgi`, ["--threads", "1"]);
    const response = await fetch(server.origin + "/");
    await response.body?.cancel();

    assert.equal(response.status, 500);
    assert.match(
      server.log(),
      /The module 'cgi' was removed in Python 3\.13: this isolate runs Python 3\.14; run the application on Python 3\.12 \(--python 3\.12, or python=3\.12 for a daemon group\)/,
    );
    // The ast names that Python 3.14 removed get the same advice.
    await Deno.writeTextFile(
      `${folder}/app.wsgi`,
      "import ast\nast.Str\ndef application(environ, start_response):\n    pass\n",
    );
    server.process.kill("SIGHUP");
    await server.waitForLog(/reloaded/, 60_000);
    const second = await fetch(server.origin + "/");
    await second.body?.cancel();
    assert.match(
      server.log(),
      /ast\.Str was removed in Python 3\.14: this isolate runs Python 3\.14/,
    );
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("streamed upload cut by stop names the stop", async () => {
  await using server = await startServer(APP_SCRIPT, [
    ...ONE_APP_ISOLATE,
    "--shutdown-timeout",
    "2",
  ]);
  // A body larger than the front reads ahead, so the isolate reads it as it comes.
  const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  const head = "POST /do/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n";
  await connection.write(encoder.encode(head + "a".repeat(100_000)));
  await new Promise((resolve) => setTimeout(resolve, 500));

  server.process.kill("SIGTERM");
  await server.process.status;
  connection.close();

  // The error the application gets names the server stop as the cause.
  assert.match(
    server.log(),
    /OSError: request body read failed: the server is stopping and no longer reads the request body/,
  );
  assert.doesNotMatch(server.log(), /OSError: request body read failed: the client/);
});

Deno.test("read-ahead keeps a slow upload off the isolate", async () => {
  await using server = await startServer(APP_SCRIPT, [...ONE_APP_ISOLATE, "--read-ahead", "1M"]);
  // Half of a 500 kB body, the rest after 2 s: the server reads it before the
  // request waits for the only isolate, so a GET meanwhile does not wait.
  const connection = await Deno.connect({ hostname: "127.0.0.1", port: server.port });
  const head = "POST /do/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n";
  await connection.write(encoder.encode(head + "a".repeat(250_000)));
  await new Promise((resolve) => setTimeout(resolve, 300));

  const started = performance.now();
  assert.equal((await getText(server, "/do/hello")).text, "hello");
  const waited = performance.now() - started;
  await connection.write(encoder.encode("a".repeat(250_000)));
  const reply = new Uint8Array(4096);
  const count = await connection.read(reply);
  connection.close();

  assert.ok(waited < 1500, `the GET waited ${Math.round(waited)} ms for the upload`);
  assert.match(
    decoder.decode(reply.subarray(0, count ?? 0)),
    /^HTTP\/1\.1 200 .*"length": 500000/s,
  );
});

Deno.test("stalled body gets 408", async () => {
  await using server = await startServer(APP_SCRIPT, [...ONE_APP_ISOLATE, "--body-timeout", "1"]);
  // Read ahead by the front, streamed to the isolate, and chunked.
  const cases: [number | null, number][] = [[1000, 10], [1_000_000, 100_000], [null, 5000]];
  for (const [declared, sent] of cases) {
    const reply = await stallBody(server.port, declared, sent);

    assert.equal(reply.split("\r\n")[0], "HTTP/1.1 408 Request Timeout", `${declared} ${sent}`);
    assert.ok(reply.endsWith("\r\n\r\nRequest Timeout\n"), reply);
  }
  // A response can reach the client before the test has read its log line.
  await waitForCount(
    server,
    /WARNING .*408: the client sent no request body data for 1 s \(--body-timeout\)/,
    3,
    0,
    5000,
  );
  const timeouts = server.log().match(
    /WARNING .*408: the client sent no request body data for 1 s \(--body-timeout\)/g,
  );
  assert.equal(timeouts?.length, 3, server.log());
  // The timeout has its own line; the body pump adds none.
  assert.doesNotMatch(
    server.log(),
    /client stopped sending the request body|client closed the connection before the request body ended/,
  );
  // The isolate that was reading a streamed body names the timeout, not a client that left.
  await server.waitForLog(
    /INFO .*isolate=1 .*\] the client sent no request body data within --body-timeout; the request was stopped/,
    5000,
  );
  assert.doesNotMatch(server.log(), /client closed the connection; the request was stopped/);
  // The only isolate is free again, and a body that keeps coming is not cut.
  const slowBody = new ReadableStream<Uint8Array>({
    async start(controller) {
      for (let piece = 0; piece < 3; piece++) {
        controller.enqueue(new Uint8Array(40_000));
        await new Promise((resolve) => setTimeout(resolve, 600));
      }
      controller.close();
    },
  });
  const response = await fetch(server.origin + "/do/upload", { method: "POST", body: slowBody });
  assert.equal(response.status, 200);
  assert.equal(JSON.parse(await response.text()).length, 120_000);
  assert.doesNotMatch(server.log(), /isolate=2\]/);
});
