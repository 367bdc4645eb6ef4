/**
 * Real applications in isolates: Debian's pure-Python drivers against real
 * PostgreSQL, MariaDB and Redis servers, outbound sockets and the allow-net
 * list, SQLite shared by two isolates, host file locks, the POSIX modules,
 * and the errors for what cannot work.
 *
 * The database servers come from tests/services.sh (.ci/run starts them).
 * Outside CI, the tests of a server that is not listening are skipped with a
 * message; with CI=true they run and fail.
 */

import assert from "node:assert/strict";
import { repoPath, startServer, type TestServer } from "./helpers/server.ts";
import { parseCommandLine, UsageError } from "../runtime/cli.ts";

const IN_CI = Deno.env.get("CI") === "true";
const FIXTURE = repoPath("tests/fixtures/realapp_services.wsgi");
const FIXTURE_PYLIB = repoPath("tests/fixtures/realapp_pylib");
const CA_FILE = repoPath(".cache/services/tls/ca.pem");

const SERVICES = { postgres: 55432, mariadb: 53306, redis: 56379 } as const;
type Service = keyof typeof SERVICES;

async function isListening(port: number): Promise<boolean> {
  try {
    const connection = await Deno.connect({ hostname: "127.0.0.1", port });
    connection.close();
    return true;
  } catch {
    return false;
  }
}

/** Unpacks Debian's drivers with tests/fetch_drivers.sh and returns their folder. */
async function fetchDrivers(): Promise<string | undefined> {
  const output = await new Deno.Command("bash", {
    args: [repoPath("tests/fetch_drivers.sh")],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (output.success) return new TextDecoder().decode(output.stdout).trim();
  const reason = new TextDecoder().decode(output.stderr).trim();
  if (IN_CI) throw new Error(`tests/fetch_drivers.sh failed: ${reason}`);
  console.warn(
    `real_apps_test: the driver tests are skipped: tests/fetch_drivers.sh failed: ${reason}`,
  );
  return undefined;
}

const driversFolder = await fetchDrivers();
const running = {} as Record<Service, boolean>;
for (const [service, port] of Object.entries(SERVICES) as [Service, number][]) {
  running[service] = await isListening(port);
  if (!running[service] && !IN_CI) {
    console.warn(
      `real_apps_test: the ${service} tests are skipped: nothing listens on 127.0.0.1:${port}; ` +
        "start the servers with 'tests/services.sh start' (CI=true makes these tests fail instead)",
    );
  }
}

/** Reports whether the tests that need `service` are skipped (never in CI). */
function skips(service: Service): boolean {
  return !IN_CI && (!running[service] || driversFolder === undefined);
}

/** Returns a port that nothing listens on: the system picked it, and it was closed again. */
function closedPort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Starts a server that accepts connections and never sends a byte. */
function silentServer(): { port: number; close(): void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const connections: Deno.Conn[] = [];
  (async () => {
    for await (const connection of listener) connections.push(connection);
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    close() {
      listener.close();
      for (const connection of connections) connection.close();
    },
  };
}

async function getJson(server: TestServer, path: string): Promise<Record<string, unknown>> {
  const response = await fetch(server.origin + path);
  const text = await response.text();
  assert.equal(response.status, 200, text);
  return JSON.parse(text);
}

/** Waits until `path` exists on the host, for at most `timeoutMs`. */
async function waitForFile(path: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    try {
      await Deno.stat(path);
      return;
    } catch {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
  throw new Error(`${path} did not appear within ${timeoutMs} ms`);
}

/** Starts the fixture with the drivers, two isolates and the given extra options. */
async function startFixture(python: "3.12" | "3.14", args: string[]): Promise<TestServer> {
  const pythonPath = driversFolder ? ["--python-path", driversFolder] : [];
  // pg8000 1.10.6 calls ssl.wrap_socket() without a CA; the server's Deno must trust it.
  Deno.env.set("DENO_CERT", CA_FILE);
  try {
    return await startServer(FIXTURE, [
      "--python",
      python,
      "--threads",
      "2",
      ...pythonPath,
      "--python-path",
      FIXTURE_PYLIB,
      ...args,
    ]);
  } finally {
    Deno.env.delete("DENO_CERT");
  }
}

Deno.test("real apps on python 3.12", async (t) => {
  const data = await Deno.makeTempDir({ prefix: "wsgirun-realapp-" });
  const extensions = await Deno.makeTempDir({ prefix: "wsgirun-extension-" });
  // An x86 build of a C extension, as a package from another platform would contain.
  await Deno.writeFile(
    `${extensions}/fake_ext.cpython-311-x86_64-linux-gnu.so`,
    new Uint8Array([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0]),
  );
  const refused = closedPort();
  const silent = silentServer();
  const unlisted = closedPort();
  const allowed = [
    ...Object.values(SERVICES).map((port) => `127.0.0.1:${port}`),
    `127.0.0.1:${refused}`,
    `127.0.0.1:${silent.port}`,
    "nonexistent.invalid:80",
  ];
  try {
    await using server = await startFixture("3.12", [
      ...allowed.flatMap((entry) => ["--allow-net", entry]),
      "--write",
      data,
      "--python-path",
      extensions,
    ]);

    await t.step({
      name: "redis round trip",
      ignore: skips("redis"),
      fn: async () => {
        const result = await getJson(server, "/redis");
        assert.equal(result.error, undefined, String(result.message));
        assert.equal(result.length, 100000);
        assert.deepEqual(result.list, ["a", "b"]);
        assert.match(String(result.failure), /^redis\.exceptions\.ResponseError: /);
      },
    });

    await t.step({
      name: "postgres round trip",
      ignore: skips("postgres"),
      fn: async () => {
        const result = await getJson(server, "/postgres");
        assert.equal(result.error, undefined, String(result.message));
        assert.deepEqual(result.names, ["first", "second"]);
        assert.equal(result.tls, false);
        assert.match(String(result.failure), /^pg8000\.ProgrammingError: .*no_such_table/);
      },
    });

    await t.step({
      name: "postgres starttls",
      ignore: skips("postgres"),
      fn: async () => {
        const result = await getJson(server, "/postgres?tls=1");
        assert.equal(result.error, undefined, String(result.message));
        assert.deepEqual(result.names, ["first", "second"]);
        assert.equal(result.tls, true);
      },
    });

    await t.step({
      name: "mariadb round trip",
      ignore: skips("mariadb"),
      fn: async () => {
        const result = await getJson(server, "/mariadb");
        assert.equal(result.error, undefined, String(result.message));
        assert.deepEqual(result.names, ["first", "second"]);
        assert.equal(result.tls, "");
        assert.match(String(result.failure), /^pymysql\.err\.ProgrammingError: .*no_such_table/);
      },
    });

    await t.step({
      name: "mariadb tls with ca file",
      ignore: skips("mariadb"),
      fn: async () => {
        await Deno.copyFile(CA_FILE, `${data}/ca.pem`);
        const result = await getJson(server, `/mariadb?ca=${encodeURIComponent(`${data}/ca.pem`)}`);
        assert.equal(result.error, undefined, String(result.message));
        assert.deepEqual(result.names, ["first", "second"]);
        assert.match(String(result.tls), /^TLSv1\.[23]$/);
      },
    });

    await t.step("connection not on allow-net", async () => {
      const result = await getJson(server, `/connect?host=127.0.0.1&port=${unlisted}`);
      assert.equal(result.error, "builtins.PermissionError");
      assert.match(
        String(result.message),
        new RegExp(`add --allow-net 127\\.0\\.0\\.1:${unlisted}`),
      );
      await server.waitForLog(
        new RegExp(`connection to 127\\.0\\.0\\.1:${unlisted} is not allowed`),
        5000,
      );
    });

    await t.step("connection refused", async () => {
      const result = await getJson(server, `/connect?host=127.0.0.1&port=${refused}`);
      assert.equal(result.error, "builtins.ConnectionRefusedError");
    });

    await t.step("receive timeout", async () => {
      const result = await getJson(server, `/connect?host=127.0.0.1&port=${silent.port}&recv=0.5`);
      assert.equal(result.error, "builtins.TimeoutError");
      assert.ok(Number(result.elapsed) >= 0.45, `timed out after ${result.elapsed} s`);
      assert.ok(Number(result.elapsed) < 5, `timed out after ${result.elapsed} s`);
    });

    await t.step("unknown host name", async () => {
      const result = await getJson(server, "/connect?host=nonexistent.invalid&port=80");
      assert.equal(result.error, "socket.gaierror");
    });

    await t.step("sqlite written by two isolates", async () => {
      const db = encodeURIComponent(`${data}/shared.sqlite3`);
      const writes = await Promise.all(
        ["a", "b"].map((tag) => getJson(server, `/sqlite-write?db=${db}&rows=150&tag=${tag}`)),
      );
      for (const write of writes) assert.equal(write.error, undefined, String(write.message));
      assert.notEqual(writes[0].isolate, writes[1].isolate, "both writers ran in one isolate");
      const check = await getJson(server, `/sqlite-check?db=${db}`);
      assert.equal(check.integrity, "ok");
      assert.deepEqual(check.counts, { a: 150, b: 150 });
    });

    await t.step("sqlite round trip", async () => {
      const result = await getJson(
        server,
        `/sqlite?db=${encodeURIComponent(`${data}/things.sqlite3`)}`,
      );
      assert.equal(result.error, undefined, String(result.message));
      assert.deepEqual(result.row, ["a", 2, "float", [0, 255], 2 ** 62]);
      assert.match(String(result.failure), /^sqlite3\.IntegrityError: UNIQUE constraint failed/);
      assert.deepEqual(result.doubled, [42, "integer", 3]);
    });

    await t.step("sqlite db-api details", async () => {
      const result = await getJson(server, "/sqlite-api");
      assert.equal(result.error, undefined, String(result.message));
      assert.equal(result.in_transaction, true);
      assert.equal(result.count_after_rollback, 0);
      assert.equal(result.inserted, 1500);
      assert.deepEqual(result.first, [0, 1, 2]);
      assert.equal(result.rest, 1497);
      assert.equal(result.last, 1499);
      assert.deepEqual(result.named, ["n1499", "n7"]);
      assert.equal(result.at, "2024-05-06T07:08:09.123456");
      assert.equal(result.tagged, "N0");
      assert.equal(result.updated, 10);
      assert.equal(result.several, "You can only execute one statement at a time.");
      assert.equal(result.total, (1499 * 1500) / 2);
    });

    await t.step("flock excludes another isolate", async () => {
      const lock = `${data}/app.lock`;
      const path = encodeURIComponent(lock);
      const holding = getJson(server, `/flock-hold?path=${path}&seconds=2`);
      await waitForFile(`${lock}.held`, 15_000);
      const whileHeld = await getJson(server, `/flock-try?path=${path}`);
      assert.equal(whileHeld.lock, "blocked");
      assert.equal((await holding).held, true);
      const afterwards = await getJson(server, `/flock-try?path=${path}`);
      assert.equal(afterwards.lock, "acquired");
    });

    await t.step("posix modules", async () => {
      const result = await getJson(server, "/posix?pytz=1");
      assert.equal(result.error, undefined, String(result.message));
      assert.equal(result.same_user, true);
      assert.equal(result.group, result.user);
      assert.deepEqual(result.nofile, [4096, 4096]);
      assert.ok(Number(result.maxrss) > 1024, `ru_maxrss ${result.maxrss}`);
      assert.deepEqual(result.berlin, [3600, 7200]);
      assert.equal(result.tokyo, 32400);
    });

    await t.step("write outside writable folders", async () => {
      const result = await getJson(
        server,
        `/write?path=${encodeURIComponent(FIXTURE + ".written")}`,
      );
      assert.equal(result.error, "builtins.PermissionError");
      await server.waitForLog(
        /WARNING .*writing '.*realapp_services\.wsgi\.written' is not allowed/,
        5000,
      );
      // The hint names the option of each mode.
      assert.match(
        server.log(),
        /of the host folders, .* writable \(--write DIR adds one to the application, allow-write=DIR to its daemon group\)/,
      );
    });

    await t.step("write inside writable folder", async () => {
      const result = await getJson(server, `/write?path=${encodeURIComponent(`${data}/note.txt`)}`);
      assert.equal(result.written, true);
      assert.equal(
        await Deno.readTextFile(`${data}/note.txt`),
        "written by the test application\n",
      );
    });

    await t.step("file deleted by another process written again", async () => {
      // Each round writes the file through the isolate that has just
      // created it, after the test has deleted it on the host.
      const path = `${data}/rewritten.txt`;
      for (let round = 0; round < 3; round++) {
        const result = await getJson(server, `/write?path=${encodeURIComponent(path)}`);
        assert.equal(result.written, true, `round ${round}: ${result.message}`);
        assert.equal(await Deno.readTextFile(path), "written by the test application\n");
        // Python requests mode 0o666, and the server's umask applies, as for a native process.
        assert.equal((await Deno.stat(path)).mode! & 0o777, 0o666 & ~Deno.umask());
        await Deno.remove(path);
      }
    });

    await t.step("folder deleted by another process made again", async () => {
      const folder = `${data}/made`;
      for (let round = 0; round < 3; round++) {
        const result = await getJson(server, `/write-in?folder=${encodeURIComponent(folder)}`);
        assert.equal(result.written, true, `round ${round}: ${result.message}`);
        assert.equal((await Deno.stat(folder)).mode! & 0o777, 0o777 & ~Deno.umask());
        await Deno.remove(folder, { recursive: true });
      }
    });

    await t.step("symbolic link denied with a log line", async () => {
      const link = `${data}/link`;
      const result = await getJson(
        server,
        `/symlink?target=note.txt&path=${encodeURIComponent(link)}`,
      );
      assert.equal(result.error, "builtins.PermissionError");
      await server.waitForLog(
        /WARNING .*an operation on the host file system is not allowed in the isolate, so Python gets PermissionError: .*symlink/,
        5000,
      );
    });

    await t.step("thread start error", async () => {
      const result = await getJson(server, "/thread");
      assert.equal(result.error, "builtins.RuntimeError");
      assert.match(String(result.message), /cannot start thread 'worker'/);
      await server.waitForLog(/WARNING .*cannot start thread 'worker'/, 5000);
    });

    await t.step("subprocess error", async () => {
      const result = await getJson(server, "/subprocess");
      assert.equal(result.error, "builtins.OSError");
      assert.match(String(result.message), /cannot start the subprocess \['ls', '-l'\]/);
    });

    await t.step("foreign c extension error", async () => {
      const result = await getJson(server, "/import?name=fake_ext");
      assert.equal(result.error, "builtins.ModuleNotFoundError");
      assert.match(String(result.message), /fake_ext.*is a C extension built for another platform/);
      await server.waitForLog(
        /INFO .*cannot import fake_ext.*falls back to pure Python works without it/,
        5000,
      );
    });
  } finally {
    silent.close();
    await Deno.remove(data, { recursive: true });
    await Deno.remove(extensions, { recursive: true });
  }
});

Deno.test("real apps on python 3.14", async (t) => {
  const data = await Deno.makeTempDir({ prefix: "wsgirun-realapp-" });
  try {
    await using server = await startFixture("3.14", [
      "--allow-net",
      `127.0.0.1:${SERVICES.redis}`,
      "--write",
      data,
    ]);

    await t.step("sqlite round trip", async () => {
      const result = await getJson(
        server,
        `/sqlite?db=${encodeURIComponent(`${data}/things.sqlite3`)}`,
      );
      assert.equal(result.error, undefined, String(result.message));
      assert.deepEqual(result.row, ["a", 2, "float", [0, 255], 2 ** 62]);
      assert.match(String(result.failure), /^sqlite3\.IntegrityError: UNIQUE constraint failed/);
    });

    await t.step({
      name: "redis round trip",
      ignore: skips("redis"),
      fn: async () => {
        const result = await getJson(server, "/redis");
        assert.equal(result.error, undefined, String(result.message));
        assert.equal(result.length, 100000);
      },
    });

    await t.step("posix modules", async () => {
      const result = await getJson(server, "/posix");
      assert.equal(result.error, undefined, String(result.message));
      assert.equal(result.same_user, true);
      assert.deepEqual(result.berlin, [3600, 7200]);
    });

    await t.step("sqlite outside writable folders", async () => {
      const result = await getJson(
        server,
        `/sqlite?db=${encodeURIComponent("/tmp/in-memory.sqlite3")}`,
      );
      assert.equal(result.error, "sqlite3.dbapi2.OperationalError");
      assert.match(String(result.message), /--write DIR/);
    });
  } finally {
    await Deno.remove(data, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Django example: migrate, a model form and the admin on the host's SQLite

/** Unpacks Debian's Django with examples/fetch_packages.sh and returns its folder. */
async function fetchFrameworks(): Promise<string> {
  const output = await new Deno.Command("bash", {
    args: [repoPath("examples/fetch_packages.sh")],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  if (!output.success) {
    throw new Error(`examples/fetch_packages.sh failed: ${text.decode(output.stderr)}`);
  }
  return text.decode(output.stdout).trim();
}

/** Cookies of one client, enough for Django's CSRF and session cookies. */
class Client {
  #cookies = new Map<string, string>();

  constructor(readonly origin: string) {}

  async request(
    path: string,
    init: RequestInit = {},
  ): Promise<{ response: Response; body: string }> {
    const headers = new Headers(init.headers);
    if (this.#cookies.size > 0) {
      headers.set(
        "cookie",
        [...this.#cookies].map(([name, value]) => `${name}=${value}`).join("; "),
      );
    }
    const response = await fetch(this.origin + path, { ...init, headers, redirect: "manual" });
    for (const line of response.headers.getSetCookie()) {
      const [pair] = line.split(";");
      const equals = pair.indexOf("=");
      this.#cookies.set(pair.slice(0, equals).trim(), pair.slice(equals + 1).trim());
    }
    return { response, body: await response.text() };
  }

  /** Posts a form with the CSRF token of `page`, as a browser would after loading it. */
  post(path: string, page: string, fields: Record<string, string>) {
    const token = page.match(/name="csrfmiddlewaretoken" value="([^"]+)"/)?.[1];
    assert.ok(token, `the page has no CSRF token:\n${page}`);
    return this.request(path, {
      method: "POST",
      headers: { referer: this.origin + path },
      body: new URLSearchParams({ csrfmiddlewaretoken: token, ...fields }),
    });
  }
}

/** Reads one column of a query from the example's database file, on the host. */
async function queryHost(file: string, sql: string): Promise<unknown[]> {
  const { DatabaseSync } = await import("node:sqlite");
  const database = new DatabaseSync(file, { readOnly: true });
  try {
    return database.prepare(sql).all().map((row) => Object.values(row)[0]);
  } finally {
    database.close();
  }
}

Deno.test("django example with sqlite", async (t) => {
  const frameworks = await fetchFrameworks();
  // A copy, so that the test's database never mixes with one a developer made.
  const root = await Deno.makeTempDir({ prefix: "wsgirun-django-" });
  await new Deno.Command("cp", { args: ["-r", repoPath("examples/django"), root] }).output();
  const site = `${root}/django`;
  for await (const entry of Deno.readDir(`${site}/data`)) {
    if (entry.name !== ".gitignore") await Deno.remove(`${site}/data/${entry.name}`);
  }
  const database = `${site}/data/db.sqlite3`;
  const password = crypto.randomUUID();
  await Deno.writeTextFile(`${site}/data/admin-password`, password);
  try {
    await using server = await startServer(`${site}/app.wsgi`, [
      "--python",
      "3.12",
      "--threads",
      "2",
      "--python-path",
      frameworks,
      "--write",
      `${site}/data`,
    ]);
    const client = new Client(server.origin);

    await t.step("migrate on first request", async () => {
      const { response, body } = await client.request("/notes/");
      assert.equal(response.status, 200, body);
      assert.match(body, /0 saved/);
      const applied = await queryHost(database, "SELECT app FROM django_migrations");
      assert.ok(applied.includes("guestbook"), `applied migrations: ${applied}`);
      assert.ok(applied.includes("auth"), `applied migrations: ${applied}`);
    });

    await t.step("model form saves a row", async () => {
      const text = `note ${crypto.randomUUID()}`;
      const page = await client.request("/notes/");
      const { response } = await client.post("/notes/", page.body, { text });
      assert.equal(response.status, 302);
      const after = await client.request("/notes/");
      assert.ok(after.body.includes(`<li>${text}</li>`), after.body);
      assert.deepEqual(await queryHost(database, "SELECT text FROM guestbook_note"), [text]);
    });

    await t.step("admin login", async () => {
      const login = await client.request("/admin/login/");
      assert.equal(login.response.status, 200);
      assert.match(login.body, /<input type="password" name="password"/);
      const { response } = await client.post("/admin/login/", login.body, {
        username: "admin",
        password,
        next: "/admin/",
      });
      assert.equal(response.status, 302);
      assert.equal(new URL(response.headers.get("location")!, server.origin).pathname, "/admin/");
      const admin = await client.request("/admin/");
      assert.match(admin.body, /<title>Site administration \| Django site admin<\/title>/);
    });

    await t.step("admin login with wrong password", async () => {
      const fresh = new Client(server.origin);
      const login = await fresh.request("/admin/login/");
      const { response, body } = await fresh.post("/admin/login/", login.body, {
        username: "admin",
        password: "wrong",
        next: "/admin/",
      });
      assert.equal(response.status, 200);
      assert.match(body, /Please enter the correct username and password/);
    });
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

// ---------------------------------------------------------------------------
// Command line

function parseApp(args: string[]) {
  const line = parseCommandLine([FIXTURE, ...args], { cwd: Deno.cwd(), cpus: 2 });
  assert.equal(line.kind, "serve");
  return line.kind === "serve" ? line.options.app : undefined;
}

Deno.test("allow-net and write options", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-write-" });
  try {
    const app = parseApp([
      "--allow-net",
      "db.example.com:5432",
      "--allow-net",
      "[::1]",
      "--write",
      folder,
    ]);
    assert.deepEqual(app?.allowNet, ["db.example.com:5432", "[::1]"]);
    assert.deepEqual(app?.writePaths, [await Deno.realPath(folder)]);
  } finally {
    await Deno.remove(folder);
  }
});

Deno.test("allow-net rejects invalid entries", () => {
  for (const value of ["db:99999", "db:0", "::1:80", "a b", "http://db"]) {
    assert.throws(
      () => parseApp(["--allow-net", value]),
      (error: unknown) =>
        error instanceof UsageError && error.message.includes(`--allow-net: '${value}'`),
      value,
    );
  }
});

Deno.test("write rejects missing folder", () => {
  assert.throws(
    () => parseApp(["--write", "/nonexistent/wsgirun-folder"]),
    (error: unknown) => error instanceof UsageError && error.message.includes("--write"),
  );
});
