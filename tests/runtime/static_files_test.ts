import assert from "node:assert/strict";

import type { UrlAlias } from "../../runtime/options.ts";
import { matchAlias, serveStatic, type StaticFilesLogger } from "../../runtime/static_files.ts";

const SECRET = "TOP-SECRET-CONTENT";
const INDEX_HTML = "<!doctype html><title>index</title>";
const HELLO = "hello, static world\n";

/**
 * Folder layout shared by the tests:
 *
 *   root/secret.txt           outside every alias
 *   root/public/              aliased as /static
 *     hello.txt, style.css, app.js, data.json, logo.png, blob.bin, empty.txt
 *     hello world.txt, café.txt
 *     docs/index.html         folder with an index
 *     bare/                   folder without an index
 *     escape.txt -> ../secret.txt         symbolic link out of the alias
 *     escape_dir -> ..                    symbolic link to the parent folder
 *   root/img/pixel.gif        aliased as /static/img (nested alias)
 *   root/favicon.ico          aliased as /favicon.ico (single file)
 */
interface Fixture {
  root: string;
  aliases: UrlAlias[];
}

async function makeFixture(): Promise<Fixture> {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "static_files_test_" }));
  const publicDir = `${root}/public`;
  await Deno.mkdir(`${publicDir}/docs`, { recursive: true });
  await Deno.mkdir(`${publicDir}/bare`);
  await Deno.mkdir(`${root}/img`);

  await Deno.writeTextFile(`${root}/secret.txt`, SECRET);
  await Deno.writeTextFile(`${publicDir}/hello.txt`, HELLO);
  await Deno.writeTextFile(`${publicDir}/style.css`, "body { color: red }");
  await Deno.writeTextFile(`${publicDir}/app.js`, "console.log(1);");
  await Deno.writeTextFile(`${publicDir}/data.json`, "{}");
  await Deno.writeFile(`${publicDir}/logo.png`, new Uint8Array([0x89, 0x50, 0x4e, 0x47]));
  await Deno.writeFile(`${publicDir}/blob.bin`, new Uint8Array([1, 2, 3]));
  await Deno.writeTextFile(`${publicDir}/empty.txt`, "");
  await Deno.writeTextFile(`${publicDir}/hello world.txt`, "with a space");
  await Deno.writeTextFile(`${publicDir}/café.txt`, "with an accent");
  await Deno.writeTextFile(`${publicDir}/docs/index.html`, INDEX_HTML);
  await Deno.symlink("../secret.txt", `${publicDir}/escape.txt`);
  await Deno.symlink("..", `${publicDir}/escape_dir`);
  await Deno.writeFile(`${root}/img/pixel.gif`, new Uint8Array([0x47, 0x49, 0x46]));
  await Deno.writeFile(`${root}/favicon.ico`, new Uint8Array([0, 0, 1, 0]));

  return {
    root,
    aliases: [
      { url: "/static", path: publicDir },
      { url: "/static/img", path: `${root}/img` },
      { url: "/favicon.ico", path: `${root}/favicon.ico` },
    ],
  };
}

interface TestServer {
  base: string;
  port: number;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Returns the raw request path: `request.url` minus scheme and Host, minus the query. */
function rawPathOf(request: Request): string {
  const prefix = `http://${request.headers.get("host")}`;
  const target = request.url.slice(prefix.length);
  const queryStart = target.indexOf("?");
  return queryStart === -1 ? target : target.slice(0, queryStart);
}

/**
 * Starts a loopback server that serves `aliases` and responds to every other path with
 * 200 "application", the way the front hands unmatched paths to the WSGI app.
 */
function startServer(aliases: UrlAlias[], logger?: StaticFilesLogger): TestServer {
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (request) => {
      const match = matchAlias(aliases, rawPathOf(request));
      if (match === undefined) return new Response("application");
      return await serveStatic(request, match.alias, match.rest, { logger });
    },
  );
  const port = server.addr.port;
  return {
    base: `http://127.0.0.1:${port}`,
    port,
    async [Symbol.asyncDispose]() {
      await server.shutdown();
    },
  };
}

/** Runs `test` with a fresh fixture and server, and removes both afterwards. */
async function withServer(
  test: (server: TestServer, fixture: Fixture) => Promise<void>,
): Promise<void> {
  const fixture = await makeFixture();
  try {
    await using server = startServer(fixture.aliases);
    await test(server, fixture);
  } finally {
    await Deno.remove(fixture.root, { recursive: true });
  }
}

interface RawResponse {
  status: number;
  headers: Map<string, string>;
  body: string;
}

/**
 * Sends `target` exactly as written over a raw TCP connection, because `fetch` removes
 * dot segments (also `%2e%2e`) before a request leaves the client.
 */
async function rawGet(port: number, target: string): Promise<RawResponse> {
  const connection = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => connection.close(), 5000);
  try {
    const head = `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nConnection: close\r\n\r\n`;
    await connection.write(new TextEncoder().encode(head));
    const bytes = await new Response(connection.readable).arrayBuffer();
    return parseRawResponse(new TextDecoder().decode(bytes));
  } finally {
    clearTimeout(timer);
  }
}

function parseRawResponse(text: string): RawResponse {
  const headEnd = text.indexOf("\r\n\r\n");
  const [statusLine, ...fieldLines] = text.slice(0, headEnd).split("\r\n");
  const headers = new Map<string, string>();
  for (const line of fieldLines) {
    const colon = line.indexOf(":");
    headers.set(line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim());
  }
  return { status: Number(statusLine.split(" ")[1]), headers, body: text.slice(headEnd + 4) };
}

/** Returns a logger that appends each line to `lines`, as "<level> <message>". */
function captureLogger(lines: string[]): StaticFilesLogger {
  return {
    error: (message: string) => lines.push(`error ${message}`),
    warning: (message: string) => lines.push(`warning ${message}`),
  };
}

async function sha256Hex(data: BufferSource): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", data);
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(size);
  // getRandomValues fills at most 65536 bytes per call.
  for (let offset = 0; offset < size; offset += 65536) {
    crypto.getRandomValues(bytes.subarray(offset, Math.min(size, offset + 65536)));
  }
  return bytes;
}

// matchAlias

Deno.test("matchAlias exact URL", () => {
  const aliases = [{ url: "/static", path: "/srv/static" }];
  assert.deepEqual(matchAlias(aliases, "/static"), { alias: aliases[0], rest: "" });
});

Deno.test("matchAlias path below URL", () => {
  const aliases = [{ url: "/static", path: "/srv/static" }];
  assert.deepEqual(matchAlias(aliases, "/static/a/b.css"), { alias: aliases[0], rest: "/a/b.css" });
});

Deno.test("matchAlias segment boundary", () => {
  const aliases = [{ url: "/static", path: "/srv/static" }];
  assert.equal(matchAlias(aliases, "/statics"), undefined);
  assert.equal(matchAlias(aliases, "/statics/x"), undefined);
  assert.equal(matchAlias(aliases, "/stati"), undefined);
  assert.equal(matchAlias(aliases, "/"), undefined);
});

Deno.test("matchAlias longest URL wins", () => {
  const aliases = [
    { url: "/static", path: "/srv/static" },
    { url: "/static/img", path: "/srv/img" },
    { url: "/static/im", path: "/srv/im" },
  ];
  assert.deepEqual(matchAlias(aliases, "/static/img/a.png"), { alias: aliases[1], rest: "/a.png" });
  assert.deepEqual(matchAlias(aliases, "/static/images/a.png"), {
    alias: aliases[0],
    rest: "/images/a.png",
  });
});

Deno.test("matchAlias longest URL wins in any order", () => {
  const aliases = [
    { url: "/static/img", path: "/srv/img" },
    { url: "/static", path: "/srv/static" },
  ];
  assert.deepEqual(matchAlias(aliases, "/static/img"), { alias: aliases[0], rest: "" });
});

Deno.test("matchAlias root alias", () => {
  const aliases = [{ url: "/", path: "/srv/www" }];
  assert.deepEqual(matchAlias(aliases, "/"), { alias: aliases[0], rest: "/" });
  assert.deepEqual(matchAlias(aliases, "/a/b"), { alias: aliases[0], rest: "/a/b" });
  assert.equal(matchAlias(aliases, "*"), undefined);
});

Deno.test("matchAlias compares raw path", () => {
  const aliases = [{ url: "/static", path: "/srv/static" }];
  assert.equal(matchAlias(aliases, "/st%61tic/x"), undefined);
  assert.deepEqual(matchAlias(aliases, "/static/%2e%2e/x"), {
    alias: aliases[0],
    rest: "/%2e%2e/x",
  });
});

Deno.test("matchAlias no aliases", () => {
  assert.equal(matchAlias([], "/static"), undefined);
});

// Content and headers

Deno.test("serveStatic text file content", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(response.headers.get("content-length"), String(HELLO.length));
    assert.equal(response.headers.get("accept-ranges"), "bytes");
    assert.match(response.headers.get("etag") ?? "", /^W\/"[0-9a-f]+-[0-9a-f]+"$/);
    assert.match(response.headers.get("last-modified") ?? "", / GMT$/);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic content types", async () => {
  await withServer(async ({ base }) => {
    const cases: [string, string][] = [
      ["style.css", "text/css; charset=utf-8"],
      ["app.js", "text/javascript; charset=utf-8"],
      ["data.json", "application/json; charset=utf-8"],
      ["logo.png", "image/png"],
      ["blob.bin", "application/octet-stream"],
      ["docs/index.html", "text/html; charset=utf-8"],
    ];
    for (const [name, expected] of cases) {
      const response = await fetch(`${base}/static/${name}`);
      await response.body?.cancel();
      assert.equal(response.status, 200, name);
      assert.equal(response.headers.get("content-type"), expected, name);
    }
  });
});

Deno.test("serveStatic more content types", async () => {
  await withServer(async ({ base }, { root }) => {
    const cases: [string, string][] = [
      ["page.htm", "text/html; charset=utf-8"],
      ["song.mp3", "audio/mpeg"],
      ["font.ttf", "font/ttf"],
      ["site.webmanifest", "application/manifest+json; charset=utf-8"],
    ];
    for (const [name, expected] of cases) {
      await Deno.writeTextFile(`${root}/public/${name}`, "x");
      const response = await fetch(`${base}/static/${name}`);
      await response.body?.cancel();
      assert.equal(response.headers.get("content-type"), expected, name);
    }
  });
});

Deno.test("serveStatic reports each finished response", async () => {
  const fixture = await makeFixture();
  const records: { status: number; bytes: number; error?: string }[] = [];
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, (request) => {
    const match = matchAlias(fixture.aliases, rawPathOf(request))!;
    return serveStatic(request, match.alias, match.rest, { onDone: (r) => records.push(r) });
  });
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    assert.equal(await (await fetch(`${base}/static/hello.txt`)).text(), HELLO);
    await (await fetch(`${base}/static/hello.txt`, { method: "HEAD" })).body?.cancel();
    await (await fetch(`${base}/static/missing.txt`)).text();
    const ranged = await fetch(`${base}/static/hello.txt`, { headers: { range: "bytes=0-4" } });
    assert.equal(await ranged.text(), HELLO.slice(0, 5));
    assert.deepEqual(records, [
      { status: 200, bytes: HELLO.length, error: undefined },
      { status: 200, bytes: 0 },
      { status: 404, bytes: "Not Found\n".length },
      { status: 206, bytes: 5, error: undefined },
    ]);
  } finally {
    await server.shutdown();
    await Deno.remove(fixture.root, { recursive: true });
  }
});

Deno.test("serveStatic binary content", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/logo.png`);
    assert.deepEqual(
      new Uint8Array(await response.arrayBuffer()),
      new Uint8Array([0x89, 0x50, 0x4e, 0x47]),
    );
  });
});

Deno.test("serveStatic empty file", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/empty.txt`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-length"), "0");
    assert.equal(await response.text(), "");
  });
});

Deno.test("serveStatic percent-encoded names", async () => {
  await withServer(async ({ base }) => {
    const space = await fetch(`${base}/static/hello%20world.txt`);
    assert.equal(space.status, 200);
    assert.equal(await space.text(), "with a space");

    const accent = await fetch(`${base}/static/caf%C3%A9.txt`);
    assert.equal(accent.status, 200);
    assert.equal(await accent.text(), "with an accent");
  });
});

Deno.test("serveStatic missing file 404", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/nope.txt`);
    assert.equal(response.status, 404);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(await response.text(), "Not Found\n");
  });
});

Deno.test("serveStatic path below file 404", async () => {
  await withServer(async ({ base }) => {
    const below = await fetch(`${base}/static/hello.txt/x`);
    assert.equal(below.status, 404);
    await below.body?.cancel();

    const slash = await fetch(`${base}/static/hello.txt/`);
    assert.equal(slash.status, 404);
    await slash.body?.cancel();
  });
});

Deno.test("serveStatic HEAD headers without body", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`, { method: "HEAD" });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-length"), String(HELLO.length));
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.ok(response.headers.get("etag"));
    assert.equal(await response.text(), "");
  });
});

Deno.test("serveStatic HEAD ignores Range", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`, {
      method: "HEAD",
      headers: { range: "bytes=0-1" },
    });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-length"), String(HELLO.length));
    await response.body?.cancel();
  });
});

Deno.test("serveStatic POST 405", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`, { method: "POST", body: "x" });
    assert.equal(response.status, 405);
    assert.equal(response.headers.get("allow"), "GET, HEAD");
    await response.body?.cancel();
  });
});

Deno.test("serveStatic other methods 405", async () => {
  await withServer(async ({ base }) => {
    for (const method of ["PUT", "DELETE", "OPTIONS", "PATCH"]) {
      const response = await fetch(`${base}/static/hello.txt`, { method });
      assert.equal(response.status, 405, method);
      assert.equal(response.headers.get("allow"), "GET, HEAD", method);
      await response.body?.cancel();
    }
  });
});

// Conditional requests

Deno.test("serveStatic If-None-Match 304", async () => {
  await withServer(async ({ base }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();
    const etag = first.headers.get("etag")!;

    const second = await fetch(`${base}/static/hello.txt`, { headers: { "if-none-match": etag } });
    assert.equal(second.status, 304);
    assert.equal(second.headers.get("etag"), etag);
    assert.equal(await second.text(), "");
  });
});

Deno.test("serveStatic If-None-Match list and star", async () => {
  await withServer(async ({ base }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();
    const etag = first.headers.get("etag")!;

    const list = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-none-match": `"other", ${etag.slice(2)}` },
    });
    assert.equal(list.status, 304);
    await list.body?.cancel();

    const star = await fetch(`${base}/static/hello.txt`, { headers: { "if-none-match": "*" } });
    assert.equal(star.status, 304);
    await star.body?.cancel();
  });
});

Deno.test("serveStatic If-None-Match stale 200", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-none-match": 'W/"0-0"' },
    });
    assert.equal(response.status, 200);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic If-None-Match after change 200", async () => {
  await withServer(async ({ base }, { root }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();
    const etag = first.headers.get("etag")!;

    await Deno.writeTextFile(`${root}/public/hello.txt`, "changed and longer\n");
    const second = await fetch(`${base}/static/hello.txt`, { headers: { "if-none-match": etag } });
    assert.equal(second.status, 200);
    assert.equal(await second.text(), "changed and longer\n");
  });
});

Deno.test("serveStatic If-Modified-Since 304", async () => {
  await withServer(async ({ base }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();
    const lastModified = first.headers.get("last-modified")!;

    const second = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-modified-since": lastModified },
    });
    assert.equal(second.status, 304);
    assert.equal(second.headers.get("last-modified"), lastModified);
    assert.equal(await second.text(), "");
  });
});

Deno.test("serveStatic If-Modified-Since older 200", async () => {
  await withServer(async ({ base }, { root }) => {
    await Deno.utime(
      `${root}/public/hello.txt`,
      new Date("2020-01-02T00:00:00Z"),
      new Date("2020-01-02T00:00:00Z"),
    );
    const response = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-modified-since": "Wed, 01 Jan 2020 00:00:00 GMT" },
    });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("last-modified"), "Thu, 02 Jan 2020 00:00:00 GMT");
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic If-Modified-Since invalid date 200", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-modified-since": "not a date" },
    });
    assert.equal(response.status, 200);
    await response.body?.cancel();
  });
});

Deno.test("serveStatic If-Modified-Since in the future 200", async () => {
  await withServer(async ({ base }) => {
    // A date after now is invalid, so the file is sent even though it is older.
    const response = await fetch(`${base}/static/hello.txt`, {
      headers: { "if-modified-since": new Date(Date.now() + 86_400_000).toUTCString() },
    });
    assert.equal(response.status, 200);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic If-None-Match wins over date", async () => {
  await withServer(async ({ base }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();

    // A stale tag with a current date: RFC 9110 has If-None-Match decide alone.
    const second = await fetch(`${base}/static/hello.txt`, {
      headers: {
        "if-none-match": 'W/"0-0"',
        "if-modified-since": first.headers.get("last-modified")!,
      },
    });
    assert.equal(second.status, 200);
    await second.body?.cancel();
  });
});

// Ranges

async function fetchRange(base: string, range: string, extra: Record<string, string> = {}) {
  return await fetch(`${base}/static/hello.txt`, { headers: { range, ...extra } });
}

Deno.test("serveStatic Range first-last", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=0-4");
    assert.equal(response.status, 206);
    assert.equal(response.headers.get("content-range"), `bytes 0-4/${HELLO.length}`);
    assert.equal(response.headers.get("content-length"), "5");
    assert.equal(await response.text(), "hello");
  });
});

Deno.test("serveStatic Range middle", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=7-12");
    assert.equal(response.status, 206);
    assert.equal(await response.text(), HELLO.slice(7, 13));
  });
});

Deno.test("serveStatic Range open end", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=7-");
    assert.equal(response.status, 206);
    assert.equal(
      response.headers.get("content-range"),
      `bytes 7-${HELLO.length - 1}/${HELLO.length}`,
    );
    assert.equal(await response.text(), HELLO.slice(7));
  });
});

Deno.test("serveStatic Range suffix", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=-6");
    assert.equal(response.status, 206);
    assert.equal(
      response.headers.get("content-range"),
      `bytes ${HELLO.length - 6}-${HELLO.length - 1}/${HELLO.length}`,
    );
    assert.equal(await response.text(), HELLO.slice(-6));
  });
});

Deno.test("serveStatic Range suffix longer than file", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=-1000");
    assert.equal(response.status, 206);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic Range end past file", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=6-1000");
    assert.equal(response.status, 206);
    assert.equal(
      response.headers.get("content-range"),
      `bytes 6-${HELLO.length - 1}/${HELLO.length}`,
    );
    assert.equal(await response.text(), HELLO.slice(6));
  });
});

Deno.test("serveStatic Range unsatisfiable 416", async () => {
  await withServer(async ({ base }) => {
    for (const range of [`bytes=${HELLO.length}-`, "bytes=1000-2000", "bytes=-0"]) {
      const response = await fetchRange(base, range);
      assert.equal(response.status, 416, range);
      assert.equal(response.headers.get("content-range"), `bytes */${HELLO.length}`, range);
      await response.body?.cancel();
    }
  });
});

Deno.test("serveStatic Range several ranges ignored", async () => {
  await withServer(async ({ base }) => {
    const response = await fetchRange(base, "bytes=0-1,4-5");
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-range"), null);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic Range invalid ignored", async () => {
  await withServer(async ({ base }) => {
    for (const range of ["bytes=5-2", "bytes=-", "items=0-1", "bytes=a-b"]) {
      const response = await fetchRange(base, range);
      assert.equal(response.status, 200, range);
      assert.equal(await response.text(), HELLO, range);
    }
  });
});

Deno.test("serveStatic If-Range date match 206", async () => {
  await withServer(async ({ base }) => {
    const first = await fetch(`${base}/static/hello.txt`);
    await first.body?.cancel();

    const response = await fetchRange(base, "bytes=0-4", {
      "if-range": first.headers.get("last-modified")!,
    });
    assert.equal(response.status, 206);
    assert.equal(await response.text(), "hello");
  });
});

Deno.test("serveStatic If-Range mismatch 200", async () => {
  await withServer(async ({ base }) => {
    for (const ifRange of ["Wed, 01 Jan 2020 00:00:00 GMT", '"some-tag"']) {
      const response = await fetchRange(base, "bytes=0-4", { "if-range": ifRange });
      assert.equal(response.status, 200, ifRange);
      assert.equal(await response.text(), HELLO, ifRange);
    }
  });
});

// Traversal and containment

const TRAVERSAL_TARGETS = [
  "/static/../secret.txt",
  "/static/%2e%2e/secret.txt",
  "/static/%2E%2E/secret.txt",
  "/static/..%2fsecret.txt",
  "/static/..%2Fsecret.txt",
  "/static/docs/../../secret.txt",
  "/static/%2e%2e%2fsecret.txt",
  "/static/.%2e/secret.txt",
  "/static/..\\secret.txt",
  "/static/..%5csecret.txt",
  "/static/./hello.txt",
];

Deno.test("serveStatic traversal 400", async () => {
  await withServer(async ({ port }) => {
    for (const target of TRAVERSAL_TARGETS) {
      const response = await rawGet(port, target);
      assert.equal(response.status, 400, target);
      assert.ok(!response.body.includes(SECRET), target);
    }
  });
});

Deno.test("serveStatic symlink to outside file 404", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/escape.txt`);
    assert.equal(response.status, 404);
    assert.ok(!(await response.text()).includes(SECRET));
  });
});

Deno.test("serveStatic symlink to outside folder 404", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/escape_dir/secret.txt`);
    assert.equal(response.status, 404);
    assert.ok(!(await response.text()).includes(SECRET));
  });
});

Deno.test("serveStatic index symlink to outside 404", async () => {
  await withServer(async ({ base }, { root }) => {
    await Deno.symlink("../../secret.txt", `${root}/public/bare/index.html`);
    const response = await fetch(`${base}/static/bare/`);
    assert.equal(response.status, 404);
    assert.ok(!(await response.text()).includes(SECRET));
  });
});

Deno.test("serveStatic symlink inside alias followed", async () => {
  await withServer(async ({ base }, { root }) => {
    await Deno.symlink("hello.txt", `${root}/public/link.txt`);
    const response = await fetch(`${base}/static/link.txt`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), HELLO);
  });
});

Deno.test("serveStatic invalid escapes 400", async () => {
  await withServer(async ({ port }) => {
    for (
      const target of ["/static/%zz.txt", "/static/%ff.txt", "/static/%C3.txt", "/static/a%00.txt"]
    ) {
      const response = await rawGet(port, target);
      assert.equal(response.status, 400, target);
    }
  });
});

Deno.test("serveStatic double slashes skipped", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static//hello.txt`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), HELLO);
  });
});

// Folders

Deno.test("serveStatic folder redirect", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/docs`, { redirect: "manual" });
    assert.equal(response.status, 301);
    assert.equal(response.headers.get("location"), "/static/docs/");
    await response.body?.cancel();
  });
});

Deno.test("serveStatic folder redirect keeps query", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/docs?a=1&b=%20`, { redirect: "manual" });
    assert.equal(response.status, 301);
    assert.equal(response.headers.get("location"), "/static/docs/?a=1&b=%20");
    await response.body?.cancel();
  });
});

Deno.test("serveStatic alias root redirect", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static`, { redirect: "manual" });
    assert.equal(response.status, 301);
    assert.equal(response.headers.get("location"), "/static/");
    await response.body?.cancel();
  });
});

Deno.test("serveStatic redirect never starts with two slashes", async () => {
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "static_files_test_" }));
  try {
    await Deno.mkdir(`${root}/evil.example`);
    await using server = startServer([{ url: "/", path: root }]);
    const response = await rawGet(server.port, "//evil.example");
    assert.equal(response.status, 301);
    assert.equal(response.headers.get("location"), "/evil.example/");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("serveStatic redirect encodes raw UTF-8", async () => {
  await withServer(async ({ port }, { root }) => {
    await Deno.mkdir(`${root}/public/dossié`);
    // rawGet sends the target as raw UTF-8 bytes, which Deno accepts.
    const response = await rawGet(port, "/static/dossié?q=é");
    assert.equal(response.status, 301);
    assert.equal(response.headers.get("location"), "/static/dossi%C3%A9/?q=%C3%A9");
  });
});

Deno.test("serveStatic folder index", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/docs/`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8");
    assert.equal(await response.text(), INDEX_HTML);
  });
});

Deno.test("serveStatic folder without index 404", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/bare/`);
    assert.equal(response.status, 404);
    assert.equal(await response.text(), "Not Found\n");
  });
});

Deno.test("serveStatic alias root without index 404", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/`);
    assert.equal(response.status, 404);
    await response.body?.cancel();
  });
});

// Routing

Deno.test("serveStatic prefix boundary", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/statics/hello.txt`);
    assert.equal(response.status, 200);
    assert.equal(await response.text(), "application");
  });
});

Deno.test("serveStatic nested alias", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/static/img/pixel.gif`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "image/gif");
    assert.deepEqual(
      new Uint8Array(await response.arrayBuffer()),
      new Uint8Array([0x47, 0x49, 0x46]),
    );
  });
});

Deno.test("serveStatic single file alias", async () => {
  await withServer(async ({ base }) => {
    const response = await fetch(`${base}/favicon.ico`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "image/x-icon");
    assert.deepEqual(new Uint8Array(await response.arrayBuffer()), new Uint8Array([0, 0, 1, 0]));
  });
});

Deno.test("serveStatic single file alias below 404", async () => {
  await withServer(async ({ base }) => {
    for (const path of ["/favicon.ico/", "/favicon.ico/x"]) {
      const response = await fetch(`${base}${path}`);
      assert.equal(response.status, 404, path);
      await response.body?.cancel();
    }
  });
});

// Errors

Deno.test({
  name: "serveStatic unreadable file 403",
  // root reads a file whatever its mode, so the case cannot be set up as root.
  ignore: Deno.uid() === 0,
  fn: async () => {
    await withServer(async ({ base }, { root }) => {
      await Deno.chmod(`${root}/public/hello.txt`, 0o000);
      const response = await fetch(`${base}/static/hello.txt`);
      assert.equal(response.status, 403);
      await response.body?.cancel();
    });
  },
});

Deno.test("serveStatic fault 500 logged", async () => {
  const lines: string[] = [];
  const logger = captureLogger(lines);
  // An alias path with a NUL byte makes Deno.realPath throw a TypeError, an error that
  // no request path can cause, so it is a fault on the server.
  const alias = { url: "/static", path: "/invalid\0path" };
  const response = await serveStatic(
    new Request("http://127.0.0.1/static/a.txt"),
    alias,
    "/a.txt",
    {
      logger,
    },
  );
  assert.equal(response.status, 500);
  assert.equal(await response.text(), "Internal Server Error\n");
  assert.equal(lines.length, 1);
  assert.match(lines[0], /^error Failed to serve a static file/);
});

// Large files

Deno.test("serveStatic 5 MiB file streamed", async () => {
  await withServer(async ({ base }, { root }) => {
    const bytes = randomBytes(5 * 1024 * 1024);
    await Deno.writeFile(`${root}/public/big.bin`, bytes);

    const response = await fetch(`${base}/static/big.bin`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-length"), String(bytes.length));
    const received = await response.arrayBuffer();
    assert.equal(received.byteLength, bytes.length);
    assert.equal(await sha256Hex(received), await sha256Hex(bytes));
  });
});

Deno.test("serveStatic 5 MiB file range", async () => {
  await withServer(async ({ base }, { root }) => {
    const bytes = randomBytes(5 * 1024 * 1024);
    await Deno.writeFile(`${root}/public/big.bin`, bytes);
    const start = 1_000_003;
    const end = 3_500_007;

    const response = await fetch(`${base}/static/big.bin`, {
      headers: { range: `bytes=${start}-${end}` },
    });
    assert.equal(response.status, 206);
    const received = await response.arrayBuffer();
    assert.equal(received.byteLength, end - start + 1);
    assert.equal(await sha256Hex(received), await sha256Hex(bytes.subarray(start, end + 1)));
  });
});

Deno.test("serveStatic client abort not logged", async () => {
  const fixture = await makeFixture();
  try {
    await Deno.writeFile(`${fixture.root}/public/big.bin`, randomBytes(5 * 1024 * 1024));
    const lines: string[] = [];
    const server = startServer(fixture.aliases, captureLogger(lines));

    const response = await fetch(`${server.base}/static/big.bin`);
    const reader = response.body!.getReader();
    const first = await reader.read();
    await reader.cancel();
    // shutdown waits for the response in flight, so its stream has seen the cancel.
    await server[Symbol.asyncDispose]();

    assert.equal(first.done, false);
    assert.deepEqual(lines, []);
  } finally {
    await Deno.remove(fixture.root, { recursive: true });
  }
});

Deno.test("serveStatic follows a switched link", async () => {
  // An alias on current/static, where current -> releases/N switches.
  const root = await Deno.realPath(await Deno.makeTempDir({ prefix: "static_files_link_" }));
  try {
    for (const release of ["1", "2"]) {
      await Deno.mkdir(`${root}/releases/${release}/static`, { recursive: true });
      await Deno.writeTextFile(`${root}/releases/${release}/static/app.css`, `release ${release}`);
    }
    await Deno.symlink("releases/1", `${root}/current`);
    await using server = startServer([{ url: "/static", path: `${root}/current/static` }]);
    assert.equal(await (await fetch(`${server.base}/static/app.css`)).text(), "release 1");

    await Deno.symlink("releases/2", `${root}/next`);
    await Deno.rename(`${root}/next`, `${root}/current`);

    assert.equal(await (await fetch(`${server.base}/static/app.css`)).text(), "release 2");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});
