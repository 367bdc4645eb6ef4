/**
 * End-to-end tests of the example applications in examples/: each example is
 * served by a real wsgirun process and used over loopback HTTP the way a
 * browser uses it (cookies kept and sent back, redirects inspected).
 *
 * The Flask, Django and Bottle examples need Debian's packages, which
 * examples/fetch_packages.sh downloads once; later runs only check its stamp.
 * Starting a server and importing a framework take seconds of CPU, so one
 * test starts the servers of all examples at once. It then runs each
 * example's cases as steps, in order, because some cases read what an
 * earlier one posted. The sanitizers are off because the servers' log
 * readers keep starting new reads while the steps run.
 */

import assert from "node:assert/strict";
import { repoPath, startServer, type TestServer } from "./helpers/server.ts";

const decoder = new TextDecoder();

/** Runs `examples/fetch_packages.sh` and returns the dist-packages folder it prints. */
async function fetchPackages(): Promise<string> {
  const output = await new Deno.Command("bash", {
    args: [repoPath("examples/fetch_packages.sh")],
    cwd: repoPath(""),
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).output();
  if (!output.success) {
    throw new Error(
      `examples/fetch_packages.sh failed with exit code ${output.code}; ` +
        `run it by hand to see why:\n${decoder.decode(output.stderr)}`,
    );
  }
  return decoder.decode(output.stdout).trim();
}

const DIST_PACKAGES = await fetchPackages();
/** The folder Debian's packages are unpacked into. */
const DEBIAN_ROOT = DIST_PACKAGES.slice(0, -"/usr/lib/python3/dist-packages".length);

/** Arguments shared by the framework examples: Debian bookworm's frameworks need Python 3.12. */
const FRAMEWORK_ARGS = ["--python", "3.12", "--threads", "1", "--python-path", DIST_PACKAGES];

type StepFn = (t: Deno.TestContext) => void | Promise<void>;

/** Runs one case against an example's server as a step. */
function step(t: Deno.TestContext, name: string, fn: StepFn): Promise<boolean> {
  return t.step({ name, fn, sanitizeOps: false, sanitizeResources: false });
}

/** Each example's server: the script and the arguments after it. */
const EXAMPLE_SERVERS = {
  hello312: { script: "examples/hello/app.wsgi", args: ["--python", "3.12", "--threads", "1"] },
  hello314: { script: "examples/hello/app.wsgi", args: ["--python", "3.14", "--threads", "1"] },
  flask: { script: "examples/flask/app.wsgi", args: FRAMEWORK_ARGS },
  django: {
    script: "examples/django/app.wsgi",
    args: [
      ...FRAMEWORK_ARGS,
      "--url-alias",
      "/static",
      repoPath("examples/django/static"),
      // The admin's files, as examples/README.md serves them.
      "--url-alias",
      "/static/admin",
      `${DIST_PACKAGES}/django/contrib/admin/static/admin`,
      "--url-alias",
      "/static/admin/js/vendor/jquery",
      `${DEBIAN_ROOT}/usr/share/javascript/jquery`,
      "--access-log",
    ],
  },
  bottle: { script: "examples/bottle/app.wsgi", args: FRAMEWORK_ARGS },
};

type ExampleName = keyof typeof EXAMPLE_SERVERS;

/**
 * Starts every example's server in parallel. When one fails to start, the
 * others are stopped before the error is thrown, so no process outlives the test.
 */
async function startExampleServers(): Promise<Record<ExampleName, TestServer>> {
  const names = Object.keys(EXAMPLE_SERVERS) as ExampleName[];
  const results = await Promise.allSettled(
    names.map((name) =>
      startServer(repoPath(EXAMPLE_SERVERS[name].script), EXAMPLE_SERVERS[name].args)
    ),
  );
  const failure = results.find((result) => result.status === "rejected");
  if (failure) {
    await Promise.all(
      results.map((result) => result.status === "fulfilled" && result.value.stop()),
    );
    throw failure.reason;
  }
  const servers = {} as Record<ExampleName, TestServer>;
  for (const [i, name] of names.entries()) {
    servers[name] = (results[i] as PromiseFulfilledResult<TestServer>).value;
  }
  return servers;
}

// ---------------------------------------------------------------------------
// A small browser: a cookie jar and fetch without following redirects

/**
 * Returns true when the attributes of a Set-Cookie header tell the client to
 * delete the cookie now. Max-Age wins over Expires when both are given, as in browsers.
 */
function isExpired(attributes: string[], now: number): boolean {
  const values = new Map<string, string>();
  for (const attribute of attributes) {
    const [name, ...rest] = attribute.split("=");
    values.set(name.trim().toLowerCase(), rest.join("=").trim());
  }
  const maxAge = values.get("max-age");
  if (maxAge !== undefined) return Number(maxAge) <= 0;
  const expires = values.get("expires");
  return expires !== undefined && Date.parse(expires) <= now;
}

/**
 * Cookies of one origin, kept the way a browser keeps them: by name, replaced
 * by a later Set-Cookie and deleted by an expired one. Path, domain and the
 * Secure flag are ignored, because every example sets its cookies for `/` on
 * plain HTTP.
 */
class CookieJar {
  #cookies = new Map<string, string>();

  store(response: Response): void {
    const now = Date.now();
    for (const header of response.headers.getSetCookie()) {
      const [pair, ...attributes] = header.split(";");
      const separator = pair.indexOf("=");
      const name = pair.slice(0, separator).trim();
      const value = pair.slice(separator + 1).trim();
      if (isExpired(attributes, now)) {
        this.#cookies.delete(name);
      } else {
        this.#cookies.set(name, value);
      }
    }
  }

  get(name: string): string | undefined {
    return this.#cookies.get(name);
  }

  /** Builds the value of a Cookie request header, or returns null when the jar is empty. */
  header(): string | null {
    if (this.#cookies.size === 0) return null;
    return [...this.#cookies].map(([name, value]) => `${name}=${value}`).join("; ");
  }
}

/** Sends requests to one server with a cookie jar, and leaves redirects to the caller. */
class Browser {
  readonly jar = new CookieJar();

  constructor(readonly origin: string) {}

  async request(path: string, init: RequestInit = {}): Promise<Response> {
    const headers = new Headers(init.headers);
    const cookies = this.jar.header();
    if (cookies !== null) headers.set("cookie", cookies);
    const response = await fetch(this.origin + path, { ...init, headers, redirect: "manual" });
    this.jar.store(response);
    return response;
  }

  /** Requests `path` and returns the response with its body read as text. */
  async text(path: string, init: RequestInit = {}): Promise<{ response: Response; body: string }> {
    const response = await this.request(path, init);
    return { response, body: await response.text() };
  }
}

/** Returns the path of a redirect's Location header, which may be relative or absolute. */
function locationPath(response: Response, origin: string): string {
  const location = response.headers.get("location");
  assert.ok(location, `the ${response.status} response has no Location header`);
  return new URL(location, origin).pathname;
}

/** Returns the text of the first `<tag class="className">` element in an HTML page. */
function elementText(html: string, tag: string, className: string): string | undefined {
  const match = html.match(new RegExp(`<${tag} class="${className}">([^<]*)</${tag}>`));
  return match?.[1];
}

async function sha256Hex(bytes: Uint8Array<ArrayBuffer>): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return [...digest].map((byte) => byte.toString(16).padStart(2, "0")).join("");
}

/** Returns `length` random bytes. crypto.getRandomValues fills at most 65536 bytes per call. */
function randomBytes(length: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(length);
  for (let offset = 0; offset < length; offset += 65536) {
    crypto.getRandomValues(bytes.subarray(offset, Math.min(length, offset + 65536)));
  }
  return bytes;
}

/** Escapes `&`, `<` and `>` as Jinja and Django templates do. */
function escapeHtml(text: string): string {
  return text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

function assertNoTraceback(server: TestServer): void {
  assert.doesNotMatch(
    server.log(),
    /Traceback/,
    `the server log has a Python traceback:\n${server.log()}`,
  );
}

// ---------------------------------------------------------------------------
// hello

async function checkHello(t: Deno.TestContext, server: TestServer, python: string): Promise<void> {
  await step(t, "isolate runs requested Python", () => {
    const version = python.replace(".", "\\.");
    assert.match(server.log(), new RegExp(`isolate ready: Python ${version}\\.\\d+ `));
  });

  await step(t, "plain text page", async () => {
    const response = await fetch(server.origin + "/");
    const body = await response.text();

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(body, "Hello, world!\n");
  });
}

// ---------------------------------------------------------------------------
// flask

async function checkFlask(t: Deno.TestContext, server: TestServer): Promise<void> {
  const browser = new Browser(server.origin);
  // Non-ASCII and HTML characters check the form decoding and Jinja's escaping together.
  const message = `Grüße & <b>bold</b> ${crypto.randomUUID()}`;
  const escapedMessage = escapeHtml(message);

  await step(t, "template page", async () => {
    const { response, body } = await browser.text("/");

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8");
    assert.match(body, /<title>Flask example<\/title>/);
    assert.match(body, /<h1>Flask on Python 3\.12\.\d+ \(emscripten\)<\/h1>/);
  });

  await step(t, "form post redirects with 303", async () => {
    const { response } = await browser.text("/messages", {
      method: "POST",
      body: new URLSearchParams({ message }),
    });

    assert.equal(response.status, 303);
    assert.equal(locationPath(response, server.origin), "/messages");
    assert.ok(browser.jar.get("session"), "the redirect set no Flask session cookie");
  });

  await step(t, "page after redirect shows value", async () => {
    const { response, body } = await browser.text("/messages");

    assert.equal(response.status, 200);
    assert.match(body, /<title>Messages<\/title>/);
    // The flashed message travels in the session cookie.
    assert.ok(
      body.includes(`<li>Received: ${escapedMessage}</li>`),
      `flashed message missing:\n${body}`,
    );
    // The isolate's own list also contains it, because there is only one isolate.
    assert.ok(
      body.includes(`<li>${escapedMessage}</li>`),
      `message list lacks the message:\n${body}`,
    );
    assert.equal(
      browser.jar.get("session"),
      undefined,
      "the session cookie was not cleared after the flash",
    );
  });

  await step(t, "flash comes from cookie", async () => {
    const { body } = await new Browser(server.origin).text("/messages");

    assert.ok(
      body.includes(`<li>${escapedMessage}</li>`),
      `message list lacks the message:\n${body}`,
    );
    assert.ok(
      !body.includes("Received:"),
      `a request without the cookie shows a flashed message:\n${body}`,
    );
  });

  await step(t, "multipart file upload", async () => {
    // Larger than the 64 KiB that the front reads ahead, so the body also streams to the isolate.
    const content = randomBytes(300 * 1024);
    const form = new FormData();
    form.append(
      "file",
      new Blob([content], { type: "application/octet-stream" }),
      "random data.bin",
    );
    const { response, body } = await browser.text("/upload", { method: "POST", body: form });

    assert.equal(response.status, 200);
    assert.equal(elementText(body, "dd", "name"), "random data.bin");
    assert.equal(elementText(body, "dd", "size"), `${content.length} bytes`);
    assert.equal(elementText(body, "dd", "sha256"), await sha256Hex(content));
  });

  await step(t, "JSON API GET", async () => {
    const response = await browser.request("/api/data");
    const data = await response.json();

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "application/json");
    assert.ok(
      data.messages.includes(message),
      `messages lack the posted one: ${JSON.stringify(data)}`,
    );
    assert.match(data.python, /^3\.12\.\d+$/);
    assert.equal(data.platform, "emscripten");
  });

  await step(t, "JSON API POST echoes", async () => {
    const payload = {
      text: "ünïcödé ✓",
      numbers: [1, 2.5, -3, null],
      nested: { ok: true, list: [] },
    };
    const response = await browser.request("/api/data", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(payload),
    });
    const data = await response.json();

    assert.equal(response.status, 200);
    assert.deepEqual(data, { received: payload });
  });

  await step(t, "invalid JSON gets 400", async () => {
    const { response } = await browser.text("/api/data", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{not json",
    });

    assert.equal(response.status, 400);
  });

  await step(t, "streamed response", async () => {
    const lineCount = 1000;
    const { response, body } = await browser.text(`/stream?lines=${lineCount}`);
    const expected = Array.from({ length: lineCount }, (_, i) => `line ${i + 1} of ${lineCount}\n`)
      .join("");

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    // A generator body has no known length, so the response goes out with chunked coding.
    assert.equal(response.headers.get("content-length"), null);
    assert.equal(response.headers.get("transfer-encoding"), "chunked");
    assert.equal(body, expected);
  });
}

// ---------------------------------------------------------------------------
// django

async function checkDjango(t: Deno.TestContext, server: TestServer): Promise<void> {
  const staticDir = repoPath("examples/django/static");
  const browser = new Browser(server.origin);
  const message = `Grüße & <i>hi</i> ${crypto.randomUUID()}`;
  const escapedMessage = escapeHtml(message);
  let csrfToken = "";

  await step(t, "template page sets CSRF cookie", async () => {
    const { response, body } = await browser.text("/");

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/html; charset=utf-8");
    assert.match(body, /<title>Django example<\/title>/);
    assert.match(body, /<h1>Django on Python 3\.12\.\d+ \(emscripten\)<\/h1>/);
    assert.match(body, /<link rel="stylesheet" href="\/static\/style\.css">/);
    assert.ok(browser.jar.get("csrftoken"), "the form page set no csrftoken cookie");
    const token = body.match(/name="csrfmiddlewaretoken" value="([^"]+)"/)?.[1];
    assert.ok(token, `the form has no csrfmiddlewaretoken field:\n${body}`);
    csrfToken = token;
  });

  await step(t, "form post with token redirects", async () => {
    const { response } = await browser.text("/", {
      method: "POST",
      body: new URLSearchParams({ csrfmiddlewaretoken: csrfToken, message }),
    });

    assert.equal(response.status, 302);
    assert.equal(locationPath(response, server.origin), "/");
    assert.ok(browser.jar.get("messages"), "the redirect set no Django messages cookie");
  });

  await step(t, "page after redirect shows value", async () => {
    const { response, body } = await browser.text("/");

    assert.equal(response.status, 200);
    // The messages framework keeps the value in its own signed cookie.
    assert.ok(
      body.includes(`<li>Received: ${escapedMessage}</li>`),
      `received message missing:\n${body}`,
    );
    assert.ok(
      body.includes(`<li>${escapedMessage}</li>`),
      `entry list lacks the message:\n${body}`,
    );
    assert.equal(
      browser.jar.get("messages"),
      undefined,
      "the messages cookie was not cleared after the message was shown",
    );
  });

  await step(t, "post without token gets 403", async () => {
    const { response } = await browser.text("/", {
      method: "POST",
      body: new URLSearchParams({ message: "no token" }),
    });

    assert.equal(response.status, 403);
  });

  await step(t, "post without cookie gets 403", async () => {
    const { response } = await new Browser(server.origin).text("/", {
      method: "POST",
      body: new URLSearchParams({ csrfmiddlewaretoken: csrfToken, message: "no cookie" }),
    });

    assert.equal(response.status, 403);
  });

  await step(t, "static CSS served without Python", async () => {
    const expected = await Deno.readFile(`${staticDir}/style.css`);
    const response = await browser.request("/static/style.css");
    const body = new Uint8Array(await response.arrayBuffer());

    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/css\b/);
    assert.deepEqual(body, expected);

    // The example's settings log every 404 that Django returns, tagged with the
    // isolate. A path that Django does not know shows that line. The CSS, for
    // which Django (DEBUG off, no staticfiles app) would also return 404, must not.
    const missing = await browser.text("/no-such-page");
    assert.equal(missing.response.status, 404);
    await server.waitForLog(/Not Found: \/no-such-page/, 10_000);
    assert.doesNotMatch(server.log(), /Not Found: \/static/);
    assert.match(server.output(), /"GET \/static\/style\.css HTTP\/1\.1" 200 /);
  });

  await step(t, "admin stylesheet and jQuery served", async () => {
    const login = await browser.text("/admin/login/");
    assert.equal(login.response.status, 200);
    assert.match(login.body, /href="\/static\/admin\/css\/base\.css"/);

    const css = await browser.request("/static/admin/css/base.css");
    assert.equal(css.status, 200);
    assert.match(await css.text(), /\bbody\b/);
    // Debian links the admin's jQuery into libjs-jquery, which fetch_packages.sh unpacks.
    const jquery = await browser.request("/static/admin/js/vendor/jquery/jquery.min.js");
    assert.equal(jquery.status, 200);
    assert.match(await jquery.text(), /jQuery/);
  });
}

// ---------------------------------------------------------------------------
// bottle

async function checkBottle(t: Deno.TestContext, server: TestServer): Promise<void> {
  const browser = new Browser(server.origin);

  await step(t, "plain text route", async () => {
    const { response, body } = await browser.text("/");

    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-type"), "text/plain; charset=utf-8");
    assert.equal(body, "Bottle example. Try /hello?name=World\n");
  });

  await step(t, "template route", async () => {
    const { response, body } = await browser.text("/hello?name=World");

    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", /^text\/html\b/);
    assert.match(body, /<h1>Hello, World!<\/h1>/);
    assert.match(body, /<p>Bottle 0\.12\.\d+ on Python 3\.12\.\d+<\/p>/);
  });

  await step(t, "script query value escaped", async () => {
    const name = encodeURIComponent("<script>alert(1)</script>");
    const { response, body } = await browser.text(`/hello?name=${name}`);

    assert.equal(response.status, 200);
    assert.ok(body.includes("<h1>Hello, &lt;script&gt;alert(1)&lt;/script&gt;!</h1>"), body);
    assert.ok(!body.includes("<script>"), `the page contains an unescaped <script> tag:\n${body}`);
  });

  await step(t, "UTF-8 query value", async () => {
    const { body } = await browser.text(`/hello?name=${encodeURIComponent("Jürgen")}`);

    assert.match(body, /<h1>Hello, Jürgen!<\/h1>/);
  });

  await step(t, "overlong name gets 400", async () => {
    const { response } = await browser.text(`/hello?name=${"x".repeat(101)}`);

    assert.equal(response.status, 400);
  });
}

// ---------------------------------------------------------------------------

Deno.test({
  name: "examples",
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const servers = await startExampleServers();
    try {
      const checks: [
        string,
        ExampleName,
        (t: Deno.TestContext, server: TestServer) => Promise<void>,
      ][] = [
        ["hello on Python 3.12", "hello312", (t, server) => checkHello(t, server, "3.12")],
        ["hello on Python 3.14", "hello314", (t, server) => checkHello(t, server, "3.14")],
        ["flask", "flask", checkFlask],
        ["django", "django", checkDjango],
        ["bottle", "bottle", checkBottle],
      ];
      for (const [name, example, check] of checks) {
        const server = servers[example];
        await step(t, name, async (t) => {
          await check(t, server);
          assertNoTraceback(server);
        });
      }
    } finally {
      await Promise.all(Object.values(servers).map((server) => server.stop()));
    }
  },
});
