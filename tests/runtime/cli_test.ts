import assert from "node:assert/strict";
import { join } from "node:path";
import {
  formatUsageError,
  HELP_TEXT,
  OPTIONS,
  optionSynopsis,
  parseCommandLine,
  UsageError,
  WSGIRUN_VERSION,
} from "../../runtime/cli.ts";
import type { ServerOptions } from "../../runtime/options.ts";
import { repoPath } from "../helpers/server.ts";

/** A temporary working directory with a script, two directories and a file to point options at. */
interface Fixture extends AsyncDisposable {
  /** Real path of the working directory. */
  dir: string;
  env: { cwd: string; cpus: number };
}

async function makeFixture(): Promise<Fixture> {
  const dir = await Deno.realPath(await Deno.makeTempDir({ prefix: "wsgirun_cli_test_" }));
  await Deno.writeTextFile(join(dir, "app.wsgi"), "def application(environ, start_response):\n");
  await Deno.mkdir(join(dir, "pylib"));
  await Deno.mkdir(join(dir, "static"));
  await Deno.writeTextFile(join(dir, "static", "logo.txt"), "logo");
  return {
    dir,
    env: { cwd: dir, cpus: 3 },
    [Symbol.asyncDispose]: () => Deno.remove(dir, { recursive: true }),
  };
}

/** Parses `args` and returns the server options, failing when the result is help or version. */
function serve(args: string[], env: Fixture["env"]): ServerOptions {
  const result = parseCommandLine(args, env);
  assert.equal(result.kind, "serve");
  if (result.kind !== "serve") throw new Error("unreachable");
  return result.options;
}

/** Parses `args` and returns the UsageError it throws. */
function usageError(args: string[], env: Fixture["env"]): UsageError {
  try {
    parseCommandLine(args, env);
  } catch (error) {
    if (error instanceof UsageError) return error;
    throw error;
  }
  assert.fail(`expected a UsageError for ${JSON.stringify(args)}`);
}

// ---------------------------------------------------------------------------
// Defaults

Deno.test("parseCommandLine defaults for a script", async () => {
  await using fixture = await makeFixture();
  const options = serve(["app.wsgi"], fixture.env);

  assert.equal(options.host, "127.0.0.1");
  assert.equal(options.port, 8000);
  assert.equal(options.threads, 3);
  assert.equal(options.mountPoint, "");
  assert.deepEqual(options.urlAliases, []);
  assert.equal(options.accessLog, false);
  assert.equal(options.logLevel, "info");
  assert.equal(options.queueLimit, 100);
  assert.equal(options.requestTimeoutMs, 60_000);
  assert.equal(options.queueTimeoutMs, 45_000);
  assert.equal(options.app.name, "app.wsgi");
  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
  assert.equal(options.app.module, undefined);
  assert.equal(options.app.callable, "application");
  assert.equal(options.app.python, "3.14");
  assert.deepEqual(options.app.pythonPath, [fixture.dir]);
  assert.equal(options.app.preload, false);
});

Deno.test("parseCommandLine threads default clamped", async () => {
  await using fixture = await makeFixture();

  assert.equal(serve(["app.wsgi"], { ...fixture.env, cpus: 0 }).threads, 1);
  assert.equal(serve(["app.wsgi"], { ...fixture.env, cpus: 1000 }).threads, 256);
});

Deno.test("parseCommandLine script path absolute", async () => {
  await using fixture = await makeFixture();
  const options = serve([join(fixture.dir, "app.wsgi")], { cwd: "/", cpus: 1 });

  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
  assert.deepEqual(options.app.pythonPath, [fixture.dir]);
});

Deno.test("parseCommandLine script symlink resolved", async () => {
  await using fixture = await makeFixture();
  await Deno.mkdir(join(fixture.dir, "links"));
  await Deno.symlink(join(fixture.dir, "app.wsgi"), join(fixture.dir, "links", "site.wsgi"));
  const options = serve(["links/site.wsgi"], fixture.env);

  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
  assert.equal(options.app.name, "site.wsgi");
  assert.deepEqual(options.app.pythonPath, [fixture.dir]);
});

// ---------------------------------------------------------------------------
// Valid option values

interface ValidCase {
  args: string[];
  read: (options: ServerOptions, dir: string) => unknown;
  expected: (dir: string) => unknown;
}

const VALID_CASES: ValidCase[] = [
  { args: ["--host", "0.0.0.0"], read: (o) => o.host, expected: () => "0.0.0.0" },
  { args: ["--host", "::1"], read: (o) => o.host, expected: () => "::1" },
  { args: ["--host", "localhost"], read: (o) => o.host, expected: () => "localhost" },
  { args: ["--port", "0"], read: (o) => o.port, expected: () => 0 },
  { args: ["--port", "65535"], read: (o) => o.port, expected: () => 65535 },
  { args: ["--threads", "1"], read: (o) => o.threads, expected: () => 1 },
  { args: ["--threads", "256"], read: (o) => o.threads, expected: () => 256 },
  { args: ["--python", "3.12"], read: (o) => o.app.python, expected: () => "3.12" },
  { args: ["--python", "3.14"], read: (o) => o.app.python, expected: () => "3.14" },
  { args: ["--log-level", "WARNING"], read: (o) => o.logLevel, expected: () => "warning" },
  {
    args: ["--python-path", "pylib"],
    read: (o) => o.app.pythonPath,
    expected: (dir) => [dir, join(dir, "pylib")],
  },
  { args: ["--callable-object", "app"], read: (o) => o.app.callable, expected: () => "app" },
  { args: ["--callable-object", "_wsgi2"], read: (o) => o.app.callable, expected: () => "_wsgi2" },
  { args: ["--mount-point", "/app"], read: (o) => o.mountPoint, expected: () => "/app" },
  { args: ["--mount-point", "/app/"], read: (o) => o.mountPoint, expected: () => "/app" },
  { args: ["--mount-point", "/a/b-c.d"], read: (o) => o.mountPoint, expected: () => "/a/b-c.d" },
  { args: ["--mount-point", "/"], read: (o) => o.mountPoint, expected: () => "" },
  {
    args: ["--url-alias", "/static", "static"],
    read: (o) => o.urlAliases,
    expected: (dir) => [{ url: "/static", path: join(dir, "static") }],
  },
  {
    args: ["--url-alias", "/static/", "./static"],
    read: (o) => o.urlAliases,
    expected: (dir) => [{ url: "/static", path: join(dir, "static") }],
  },
  {
    args: ["--url-alias", "/logo.txt", "static/logo.txt"],
    read: (o) => o.urlAliases,
    expected: (dir) => [{ url: "/logo.txt", path: join(dir, "static", "logo.txt") }],
  },
  { args: ["--access-log"], read: (o) => o.accessLog, expected: () => true },
  { args: ["--threads", "2"], read: (o) => o.accessLogFormat, expected: () => "default" },
  { args: ["--threads", "2"], read: (o) => o.trustedProxies, expected: () => [] },
  {
    args: ["--trusted-proxy", "10.0.0.0/8", "--trusted-proxy", "::1"],
    read: (o) => o.trustedProxies.map((range) => `${range.text} ${range.bits}`),
    expected: () => ["10.0.0.0/8 8", "::1 128"],
  },
  {
    args: ["--access-log-format", "%h %>s"],
    read: (o) => [o.accessLog, o.accessLogFormat],
    expected: () => [true, "%h %>s"],
  },
  { args: ["--log-level", "debug"], read: (o) => o.logLevel, expected: () => "debug" },
  { args: ["--log-level", "warning"], read: (o) => o.logLevel, expected: () => "warning" },
  { args: ["--log-level", "critical"], read: (o) => o.logLevel, expected: () => "critical" },
  { args: ["--preload"], read: (o) => o.app.preload, expected: () => true },
  { args: ["--queue-limit", "0"], read: (o) => o.queueLimit, expected: () => 0 },
  { args: ["--queue-limit", "100000"], read: (o) => o.queueLimit, expected: () => 100000 },
  { args: ["--request-timeout", "2.5"], read: (o) => o.requestTimeoutMs, expected: () => 2500 },
  { args: ["--request-timeout", "0"], read: (o) => o.requestTimeoutMs, expected: () => 0 },
  { args: ["--queue-timeout", "0.125"], read: (o) => o.queueTimeoutMs, expected: () => 125 },
  { args: ["--queue-timeout", "90"], read: (o) => o.queueTimeoutMs, expected: () => 90_000 },
  { args: ["--shutdown-timeout", "1.5"], read: (o) => o.shutdownTimeoutMs, expected: () => 1500 },
  { args: ["--threads", "4"], read: (o) => o.minThreads, expected: () => 4 },
  { args: ["--threads", "4", "--min-threads", "1"], read: (o) => o.minThreads, expected: () => 1 },
  { args: ["--threads", "4", "--min-threads", "4"], read: (o) => o.minThreads, expected: () => 4 },
  {
    args: ["--inactivity-timeout", "2.5"],
    read: (o) => o.inactivityTimeoutMs,
    expected: () => 2500,
  },
  { args: ["--inactivity-timeout", "0"], read: (o) => o.inactivityTimeoutMs, expected: () => 0 },
  { args: ["--threads", "5"], read: (o) => o.maximumRequests, expected: () => 0 },
  { args: ["--maximum-requests", "1000"], read: (o) => o.maximumRequests, expected: () => 1000 },
  { args: ["--threads", "7"], read: (o) => o.app.environment, expected: () => undefined },
  {
    args: ["--env", "A=1", "--env", "B=x=y", "--env", "EMPTY=", "--env", "A=2"],
    read: (o) => o.app.environment,
    expected: () => ({ A: "2", B: "x=y", EMPTY: "" }),
  },
  { args: ["--threads", "6"], read: (o) => o.memoryLimitBytes, expected: () => 0 },
  {
    args: ["--memory-limit", "512M"],
    read: (o) => o.memoryLimitBytes,
    expected: () => 512 * 1024 * 1024,
  },
  {
    args: ["--memory-limit", "1g"],
    read: (o) => o.memoryLimitBytes,
    expected: () => 1024 * 1024 * 1024,
  },
  {
    args: ["--memory-limit", "65536K"],
    read: (o) => o.memoryLimitBytes,
    expected: () => 64 * 1024 * 1024,
  },
  {
    args: ["--memory-limit", "268435456"],
    read: (o) => o.memoryLimitBytes,
    expected: () => 268435456,
  },
  { args: ["--threads", "6"], read: (o) => o.memoryMaxBytes, expected: () => 0 },
  {
    args: ["--memory-max", "1G", "--memory-limit", "512M"],
    read: (o) => o.memoryMaxBytes,
    expected: () => 1024 * 1024 * 1024,
  },
  { args: ["--memory-limit", "0"], read: (o) => o.memoryLimitBytes, expected: () => 0 },
  { args: ["--shutdown-timeout", "0"], read: (o) => o.shutdownTimeoutMs, expected: () => 0 },
  { args: ["--threads", "3"], read: (o) => o.readAheadBytes, expected: () => 65536 },
  { args: ["--read-ahead", "0"], read: (o) => o.readAheadBytes, expected: () => 0 },
  { args: ["--read-ahead", "1M"], read: (o) => o.readAheadBytes, expected: () => 1048576 },
  { args: ["--read-ahead", "512k"], read: (o) => o.readAheadBytes, expected: () => 524288 },
  { args: ["--read-ahead", "16M"], read: (o) => o.readAheadBytes, expected: () => 16777216 },
  {
    args: ["--snapshot", "off", "--no-snapshot-app"],
    read: (o) => o.app.snapshot,
    expected: () => "off",
  },
  {
    args: ["--snapshot", "app", "--no-snapshot-app"],
    read: (o) => o.app.snapshot,
    expected: () => "runtime",
  },
  {
    args: ["--shutdown-timeout", "2147483"],
    read: (o) => o.shutdownTimeoutMs,
    expected: () => 2_147_483_000,
  },
];

for (const testCase of VALID_CASES) {
  Deno.test(`option ${testCase.args.join(" ")}`, async () => {
    await using fixture = await makeFixture();
    const options = serve(["app.wsgi", ...testCase.args], fixture.env);

    assert.deepEqual(testCase.read(options, fixture.dir), testCase.expected(fixture.dir));
  });

  // The same case written as "--option=VALUE", with any second value as its own argument.
  if (testCase.args.length < 2) continue;
  const [name, first, ...rest] = testCase.args;
  const inlineArgs = [`${name}=${first}`, ...rest];
  Deno.test(`option ${inlineArgs.join(" ")}`, async () => {
    await using fixture = await makeFixture();
    const options = serve(["app.wsgi", ...inlineArgs], fixture.env);

    assert.deepEqual(testCase.read(options, fixture.dir), testCase.expected(fixture.dir));
  });
}

Deno.test("option before SCRIPT", async () => {
  await using fixture = await makeFixture();
  const options = serve(["--port", "9000", "app.wsgi"], fixture.env);

  assert.equal(options.port, 9000);
  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
});

Deno.test("option inline value keeps later equals signs", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--host=a=b"], fixture.env);

  // Only the first '=' ends the name, so the check receives the whole value.
  assert.match(error.message, /^invalid value for --host: 'a=b'/);
});

// ---------------------------------------------------------------------------
// Repeated options

Deno.test("python-path repeated keeps order", async () => {
  await using fixture = await makeFixture();
  const options = serve(
    ["app.wsgi", "--python-path", "static", "--python-path=pylib"],
    fixture.env,
  );

  assert.deepEqual(options.app.pythonPath, [
    fixture.dir,
    join(fixture.dir, "static"),
    join(fixture.dir, "pylib"),
  ]);
});

Deno.test("python-path duplicates removed", async () => {
  await using fixture = await makeFixture();
  const options = serve(
    ["app.wsgi", "--python-path", ".", "--python-path", "pylib", "--python-path", "./pylib/"],
    fixture.env,
  );

  assert.deepEqual(options.app.pythonPath, [fixture.dir, join(fixture.dir, "pylib")]);
});

Deno.test("python-path symlink kept", async () => {
  await using fixture = await makeFixture();
  await Deno.symlink(join(fixture.dir, "pylib"), join(fixture.dir, "lib-link"));
  const options = serve(["app.wsgi", "--python-path", "lib-link"], fixture.env);

  assert.deepEqual(options.app.pythonPath, [fixture.dir, join(fixture.dir, "lib-link")]);
});

Deno.test("script folder symlink kept", async () => {
  await using fixture = await makeFixture();
  await Deno.symlink(fixture.dir, join(fixture.dir, "current"));
  const options = serve(["current/app.wsgi"], fixture.env);

  assert.equal(options.app.scriptPath, join(fixture.dir, "current", "app.wsgi"));
  assert.deepEqual(options.app.pythonPath, [join(fixture.dir, "current")]);
});

Deno.test("script file symlink followed", async () => {
  await using fixture = await makeFixture();
  await Deno.symlink(join(fixture.dir, "app.wsgi"), join(fixture.dir, "pylib", "link.wsgi"));
  const options = serve(["pylib/link.wsgi"], fixture.env);

  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
  assert.deepEqual(options.app.pythonPath, [fixture.dir]);
});

Deno.test("url-alias repeated keeps order", async () => {
  await using fixture = await makeFixture();
  const options = serve(
    ["app.wsgi", "--url-alias", "/static", "static", "--url-alias", "/lib", "pylib"],
    fixture.env,
  );

  assert.deepEqual(options.urlAliases, [
    { url: "/static", path: join(fixture.dir, "static") },
    { url: "/lib", path: join(fixture.dir, "pylib") },
  ]);
});

Deno.test("url-alias same URL twice rejected", async () => {
  await using fixture = await makeFixture();
  const error = usageError(
    ["app.wsgi", "--url-alias", "/static", "static", "--url-alias", "/static/", "pylib"],
    fixture.env,
  );

  assert.match(error.message, /--url-alias/);
  assert.match(error.message, /'\/static\/'/);
});

Deno.test("url-alias covering a mount rejected", async () => {
  await using fixture = await makeFixture();
  const cases: [string[], string][] = [
    [["--mount-point", "/app", "--url-alias", "/app", "static"], "/app"],
    [["--mount", "/x/api", "app.wsgi", "--url-alias", "/x", "static"], "/x/api"],
  ];
  for (const [args, mountPoint] of cases) {
    const error = usageError(["app.wsgi", ...args], fixture.env);

    assert.match(error.message, /^invalid value for --url-alias: /, args.join(" "));
    assert.ok(error.message.includes(`mounted at '${mountPoint}'`), error.message);
  }
});

Deno.test("url-alias beside or below mounts", async () => {
  await using fixture = await makeFixture();
  const options = serve(
    [
      "app.wsgi",
      "--mount-point",
      "/app",
      "--mount",
      "/x/api",
      "app.wsgi",
      "--url-alias",
      "/app/static",
      "static",
      "--url-alias",
      "/x/apidocs",
      "static",
    ],
    fixture.env,
  );

  assert.deepEqual(options.urlAliases.map((alias) => alias.url), ["/app/static", "/x/apidocs"]);
});

Deno.test("single-valued option repeated keeps last", async () => {
  await using fixture = await makeFixture();
  const options = serve(["app.wsgi", "--port", "9000", "--port=9001"], fixture.env);

  assert.equal(options.port, 9001);
});

// ---------------------------------------------------------------------------
// Invalid option values

interface InvalidCase {
  args: string[];
  option: string;
  value: string;
}

const INVALID_CASES: InvalidCase[] = [
  { args: ["--host", ""], option: "--host", value: "" },
  { args: ["--host", "[::1]"], option: "--host", value: "[::1]" },
  { args: ["--host", "my host"], option: "--host", value: "my host" },
  { args: ["--host", "-x"], option: "--host", value: "-x" },
  { args: ["--port", "abc"], option: "--port", value: "abc" },
  { args: ["--port", "65536"], option: "--port", value: "65536" },
  { args: ["--port", "-1"], option: "--port", value: "-1" },
  { args: ["--port", "80.5"], option: "--port", value: "80.5" },
  { args: ["--port", "0x50"], option: "--port", value: "0x50" },
  { args: ["--port", "1e3"], option: "--port", value: "1e3" },
  { args: ["--port", " 80"], option: "--port", value: " 80" },
  { args: ["--port="], option: "--port", value: "" },
  { args: ["--threads", "0"], option: "--threads", value: "0" },
  { args: ["--threads", "257"], option: "--threads", value: "257" },
  { args: ["--threads", "two"], option: "--threads", value: "two" },
  { args: ["--python", "3.13"], option: "--python", value: "3.13" },
  { args: ["--python", "python3"], option: "--python", value: "python3" },
  { args: ["--python-path", "missing"], option: "--python-path", value: "missing" },
  { args: ["--python-path", "app.wsgi"], option: "--python-path", value: "app.wsgi" },
  // An unset shell variable, as in --write "$DATA_DIR", must not mean the working folder.
  { args: ["--python-path", ""], option: "--python-path", value: "" },
  { args: ["--write", ""], option: "--write", value: "" },
  { args: ["--url-alias", "/static", ""], option: "--url-alias", value: "" },
  { args: ["--callable-object", "my-app"], option: "--callable-object", value: "my-app" },
  { args: ["--callable-object", "2app"], option: "--callable-object", value: "2app" },
  { args: ["--callable-object", "a.b"], option: "--callable-object", value: "a.b" },
  { args: ["--mount-point", "app"], option: "--mount-point", value: "app" },
  { args: ["--mount-point", ""], option: "--mount-point", value: "" },
  { args: ["--mount-point", "/app?x=1"], option: "--mount-point", value: "/app?x=1" },
  { args: ["--mount-point", "/app#top"], option: "--mount-point", value: "/app#top" },
  { args: ["--mount-point", "/my%20app"], option: "--mount-point", value: "/my%20app" },
  { args: ["--mount-point", "/my app"], option: "--mount-point", value: "/my app" },
  { args: ["--mount-point", "/caf\u00e9"], option: "--mount-point", value: "/caf\u00e9" },
  { args: ["--mount-point", "/a//b"], option: "--mount-point", value: "/a//b" },
  { args: ["--mount-point", "//"], option: "--mount-point", value: "//" },
  { args: ["--mount-point", "/a/../b"], option: "--mount-point", value: "/a/../b" },
  { args: ["--mount-point", "/.."], option: "--mount-point", value: "/.." },
  { args: ["--mount-point", "/a/./b"], option: "--mount-point", value: "/a/./b" },
  {
    args: ["--mount", "/x:process-group=g", "app.wsgi"],
    option: "--mount",
    value: "/x:process-group=g",
  },
  { args: ["--url-alias", "/", "static"], option: "--url-alias", value: "/" },
  { args: ["--url-alias", "static", "static"], option: "--url-alias", value: "static" },
  { args: ["--url-alias", "/s/../x", "static"], option: "--url-alias", value: "/s/../x" },
  { args: ["--url-alias", "/static", "missing"], option: "--url-alias", value: "missing" },
  { args: ["--log-level", "verbose"], option: "--log-level", value: "verbose" },
  { args: ["--queue-limit", "100001"], option: "--queue-limit", value: "100001" },
  { args: ["--queue-limit", "-5"], option: "--queue-limit", value: "-5" },
  { args: ["--request-timeout", "1e3"], option: "--request-timeout", value: "1e3" },
  { args: ["--request-timeout", "-1"], option: "--request-timeout", value: "-1" },
  { args: ["--request-timeout", "2.0001"], option: "--request-timeout", value: "2.0001" },
  { args: ["--request-timeout", "2147484"], option: "--request-timeout", value: "2147484" },
  { args: ["--shutdown-timeout", "2592000"], option: "--shutdown-timeout", value: "2592000" },
  { args: ["--queue-timeout", "soon"], option: "--queue-timeout", value: "soon" },
  { args: ["--shutdown-timeout", "5s"], option: "--shutdown-timeout", value: "5s" },
  { args: ["--min-threads", "0"], option: "--min-threads", value: "0" },
  { args: ["--threads", "2", "--min-threads", "3"], option: "--min-threads", value: "3" },
  { args: ["--inactivity-timeout", "-1"], option: "--inactivity-timeout", value: "-1" },
  { args: ["--maximum-requests", "1.5"], option: "--maximum-requests", value: "1.5" },
  { args: ["--env", "NOT_SET"], option: "--env", value: "NOT_SET" },
  { args: ["--env", "1A=2"], option: "--env", value: "1A=2" },
  { args: ["--env", "=x"], option: "--env", value: "=x" },
  { args: ["--memory-limit", "16M"], option: "--memory-limit", value: "16M" },
  { args: ["--memory-limit", "5G"], option: "--memory-limit", value: "5G" },
  { args: ["--memory-limit", "512MB"], option: "--memory-limit", value: "512MB" },
  { args: ["--memory-limit", "-1"], option: "--memory-limit", value: "-1" },
  { args: ["--memory-max", "16M"], option: "--memory-max", value: "16M" },
  { args: ["--memory-max", "5G"], option: "--memory-max", value: "5G" },
  { args: ["--maximum-requests", "1000000001"], option: "--maximum-requests", value: "1000000001" },
  { args: ["--access-log=yes"], option: "--access-log", value: "yes" },
  { args: ["--access-log-format", "%h %x"], option: "--access-log-format", value: "%h %x" },
  { args: ["--trusted-proxy", "proxy.lan"], option: "--trusted-proxy", value: "proxy.lan" },
  { args: ["--trusted-proxy", "10.0.0.0/40"], option: "--trusted-proxy", value: "10.0.0.0/40" },
  { args: ["--read-ahead", "17M"], option: "--read-ahead", value: "17M" },
  { args: ["--read-ahead", "1G"], option: "--read-ahead", value: "1G" },
  { args: ["--read-ahead", "-1"], option: "--read-ahead", value: "-1" },
  { args: ["--read-ahead", "1MB"], option: "--read-ahead", value: "1MB" },
  { args: ["--preload=true"], option: "--preload", value: "true" },
];

for (const testCase of INVALID_CASES) {
  Deno.test(`option ${JSON.stringify(testCase.args.join(" "))} rejected`, async () => {
    await using fixture = await makeFixture();
    const error = usageError(["app.wsgi", ...testCase.args], fixture.env);

    assert.ok(
      error.message.startsWith(
        `invalid value for ${testCase.option}: '${testCase.value}' (expected `,
      ),
      error.message,
    );
    assert.ok(error.message.endsWith(")"), error.message);
  });
}

Deno.test("certfile and keyfile read", async () => {
  await using fixture = await makeFixture();
  const tls = repoPath("tests/fixtures/tls");
  const options = serve(
    ["app.wsgi", "--certfile", join(tls, "cert.pem"), "--keyfile", join(tls, "key.pem")],
    fixture.env,
  );
  assert.equal(options.tls?.certFile, join(tls, "cert.pem"));
  assert.equal(options.tls?.keyFile, join(tls, "key.pem"));
  assert.match(options.tls?.cert ?? "", /^-----BEGIN CERTIFICATE-----\n/);
  assert.match(options.tls?.key ?? "", /^-----BEGIN PRIVATE KEY-----\n/);
  assert.equal(serve(["app.wsgi"], fixture.env).tls, undefined);
});

Deno.test("certfile and keyfile errors", async () => {
  await using fixture = await makeFixture();
  const cert = repoPath("tests/fixtures/tls/cert.pem");
  const key = repoPath("tests/fixtures/tls/key.pem");
  const cases: [string[], string][] = [
    [["--certfile", cert], "--certfile needs --keyfile: give the certificate and its key together"],
    [["--keyfile", key], "--keyfile needs --certfile: give the certificate and its key together"],
    [
      ["--certfile", key, "--keyfile", key],
      `--certfile '${key}' is not a PEM file with a '-----BEGIN ...CERTIFICATE-----' line`,
    ],
    [
      ["--certfile", cert, "--keyfile", cert],
      `--keyfile '${cert}' is not a PEM file with a '-----BEGIN ...PRIVATE KEY-----' line`,
    ],
  ];
  for (const [args, message] of cases) {
    assert.equal(usageError(["app.wsgi", ...args], fixture.env).message, message);
  }
  const encrypted = join(fixture.dir, "encrypted.pem");
  await Deno.writeTextFile(
    encrypted,
    "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
  );
  assert.match(
    usageError(["app.wsgi", "--certfile", cert, "--keyfile", encrypted], fixture.env).message,
    /^--keyfile '.*encrypted\.pem' is encrypted, and the server cannot ask for its passphrase; /,
  );
  const missing = usageError(["app.wsgi", "--certfile", "nope.pem"], fixture.env);
  assert.match(
    missing.message,
    /^invalid value for --certfile: 'nope\.pem' \(expected an existing file, but '.*nope\.pem' does not exist\)$/,
  );
  const folder = usageError(["app.wsgi", "--keyfile", "static"], fixture.env);
  assert.match(
    folder.message,
    /^invalid value for --keyfile: 'static' \(expected an existing file, but '.*static' is a directory\)$/,
  );
});

Deno.test("pid file option", async () => {
  await using fixture = await makeFixture();
  assert.equal(
    serve(["app.wsgi", "--pid", "static/wsgirun.pid"], fixture.env).pidFile,
    join(fixture.dir, "static", "wsgirun.pid"),
  );
  assert.equal(
    usageError(["app.wsgi", "--pid", "run/wsgirun.pid"], fixture.env).message,
    "invalid value for --pid: 'run/wsgirun.pid' (expected a path in an existing directory)",
  );
  assert.equal(
    usageError(["app.wsgi", "--pid", "static"], fixture.env).message,
    "invalid value for --pid: 'static' (expected a file path, but it is a directory)",
  );
});

Deno.test("unix socket option", async () => {
  await using fixture = await makeFixture();
  const options = serve(["app.wsgi", "--unix-socket", "static/site.sock"], fixture.env);
  assert.equal(options.unixSocket, join(fixture.dir, "static", "site.sock"));
  assert.equal(serve(["app.wsgi"], fixture.env).unixSocket, undefined);

  const missing = usageError(["app.wsgi", "--unix-socket", "run/site.sock"], fixture.env);
  assert.equal(
    missing.message,
    "invalid value for --unix-socket: 'run/site.sock' (expected a path in an existing directory)",
  );
  const clash = usageError(
    ["app.wsgi", "--port", "9000", "--unix-socket", "s.sock", "--host", "0.0.0.0"],
    fixture.env,
  );
  assert.equal(
    clash.message,
    "--unix-socket cannot be combined with --port or --host: the server listens on the Unix " +
      "socket alone",
  );
  const long = usageError(["app.wsgi", "--unix-socket", `${"s".repeat(110)}.sock`], fixture.env);
  assert.match(
    long.message,
    /^invalid value for --unix-socket: 's+\.sock' \(expected a path of at most 107 bytes, the limit of Linux, but '.*' has \d+; choose a shorter folder, such as \/run\)$/,
  );
});

Deno.test("memory limit at the memory cap rejected", async () => {
  await using fixture = await makeFixture();
  const error = usageError(
    ["app.wsgi", "--memory-limit", "256M", "--memory-max", "256M"],
    fixture.env,
  );
  assert.equal(
    error.message,
    "--memory-limit (268435456 bytes) is not below --memory-max (268435456 bytes), so an " +
      "isolate never passes it: give a --memory-limit below --memory-max, or leave " +
      "--memory-limit out",
  );
});

Deno.test("env NAME passes the server's variable", async () => {
  await using fixture = await makeFixture();
  const variables: Record<string, string> = { DB_PASSWORD: "s3cret", EMPTY: "" };
  const env = { ...fixture.env, variable: (name: string) => variables[name] };
  const options = serve(["app.wsgi", "--env", "DB_PASSWORD", "--env", "EMPTY"], env);
  assert.deepEqual(options.app.environment, { DB_PASSWORD: "s3cret", EMPTY: "" });

  const error = usageError(["app.wsgi", "--env", "API_KEY"], env);
  assert.match(
    error.message,
    /^invalid value for --env: 'API_KEY' \(expected .*API_KEY is not set\)$/,
  );
});

Deno.test("port invalid message exact", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--port", "abc"], fixture.env);

  assert.equal(
    error.message,
    "invalid value for --port: 'abc' (expected an integer from 0 to 65535)",
  );
});

Deno.test("python invalid message lists versions", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--python", "2.7"], fixture.env);

  assert.equal(error.message, "invalid value for --python: '2.7' (expected 3.12 or 3.14)");
});

Deno.test("python-path missing names resolved path", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--python-path", "nope"], fixture.env);

  assert.match(error.message, /expected an existing directory/);
  assert.ok(error.message.includes(`'${join(fixture.dir, "nope")}' does not exist`), error.message);
});

Deno.test("url-alias root URL names mount-point", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--url-alias", "/", "static"], fixture.env);

  assert.match(error.message, /--mount-point/);
});

Deno.test("invalid value with newline stays one line", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--port", "80\n81"], fixture.env);

  assert.equal(error.message.includes("\n"), false);
  assert.match(error.message, /'80\\n81'/);
});

// ---------------------------------------------------------------------------
// Missing values and unknown options

Deno.test("option missing value at end", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--port"], fixture.env);

  assert.equal(error.message, "missing value for --port (expected --port N)");
});

Deno.test("option missing value before option", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--host", "--port", "80"], fixture.env);

  assert.equal(error.message, "missing value for --host (expected --host HOST)");
});

Deno.test("url-alias missing PATH", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--url-alias", "/static"], fixture.env);

  assert.equal(
    error.message,
    "missing PATH for --url-alias '/static' (expected --url-alias URL PATH)",
  );
});

Deno.test("url-alias missing PATH before option", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--url-alias", "/static", "--preload"], fixture.env);

  assert.match(error.message, /^missing PATH for --url-alias '\/static'/);
});

Deno.test("url-alias inline URL missing PATH", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--url-alias=/static"], fixture.env);

  assert.match(error.message, /^missing PATH for --url-alias '\/static'/);
});

Deno.test("url-alias missing URL and PATH", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--url-alias"], fixture.env);

  assert.equal(
    error.message,
    "missing URL and PATH for --url-alias (expected --url-alias URL PATH)",
  );
});

Deno.test("unknown long option", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--foo"], fixture.env);

  assert.equal(error.message, "unknown option '--foo'; run 'wsgirun --help' for the list");
});

Deno.test("unknown option with inline value", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--foo=bar"], fixture.env);

  assert.equal(error.message, "unknown option '--foo'; run 'wsgirun --help' for the list");
});

Deno.test("unknown short option", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "-p", "80"], fixture.env);

  assert.equal(error.message, "unknown option '-p'; run 'wsgirun --help' for the list");
});

// ---------------------------------------------------------------------------
// SCRIPT

Deno.test("SCRIPT missing", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["--port", "80"], fixture.env);

  assert.equal(error.message, "missing SCRIPT: name a WSGI script file or package.module:callable");
});

Deno.test("SCRIPT given twice", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "other.wsgi"], fixture.env);

  assert.match(error.message, /^unexpected argument 'other.wsgi' after SCRIPT 'app.wsgi'/);
});

Deno.test("SCRIPT .wsgi not found", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["x.wsgi"], fixture.env);

  assert.ok(error.message.startsWith("script file not found: 'x.wsgi'"), error.message);
  assert.ok(error.message.includes(`'${join(fixture.dir, "x.wsgi")}'`), error.message);
});

Deno.test("SCRIPT .wsgi not found suggests module", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["mysite.wsgi"], fixture.env);

  assert.match(error.message, /'mysite\.wsgi:application'/);
});

Deno.test("SCRIPT .py not found", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["site/app.py"], fixture.env);

  assert.ok(error.message.startsWith("script file not found: 'site/app.py'"), error.message);
});

Deno.test("SCRIPT path not found", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["./serve-me"], fixture.env);

  assert.ok(error.message.startsWith("script file not found: './serve-me'"), error.message);
});

Deno.test("SCRIPT directory rejected", async () => {
  await using fixture = await makeFixture();
  await Deno.mkdir(join(fixture.dir, "my-site"));
  const error = usageError(["my-site"], fixture.env);

  assert.match(error.message, /^invalid SCRIPT: 'my-site'/);
  assert.match(error.message, /is a directory/);
});

Deno.test("SCRIPT .wsgi directory rejected", async () => {
  await using fixture = await makeFixture();
  await Deno.mkdir(join(fixture.dir, "site.wsgi"));
  const error = usageError(["site.wsgi"], fixture.env);

  assert.match(error.message, /^invalid SCRIPT: 'site.wsgi'/);
});

Deno.test("SCRIPT module with callable", async () => {
  await using fixture = await makeFixture();
  const options = serve(["mysite.wsgi:app"], fixture.env);

  assert.equal(options.app.module, "mysite.wsgi");
  assert.equal(options.app.callable, "app");
  assert.equal(options.app.name, "mysite.wsgi");
  assert.equal(options.app.scriptPath, undefined);
  assert.deepEqual(options.app.pythonPath, [fixture.dir]);
});

Deno.test("SCRIPT module default callable", async () => {
  await using fixture = await makeFixture();
  const options = serve(["hello"], fixture.env);

  assert.equal(options.app.module, "hello");
  assert.equal(options.app.callable, "application");
});

Deno.test("SCRIPT module with callable-object", async () => {
  await using fixture = await makeFixture();
  const options = serve(["pkg.web", "--callable-object", "app"], fixture.env);

  assert.equal(options.app.module, "pkg.web");
  assert.equal(options.app.callable, "app");
});

Deno.test("SCRIPT module callable conflict", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["pkg.web:app", "--callable-object", "main"], fixture.env);

  assert.match(error.message, /'pkg\.web:app'/);
  assert.match(error.message, /--callable-object/);
  assert.match(error.message, /'main'/);
});

Deno.test("SCRIPT module python-path after cwd", async () => {
  await using fixture = await makeFixture();
  const options = serve(["pkg.web:app", "--python-path", "pylib"], fixture.env);

  assert.deepEqual(options.app.pythonPath, [fixture.dir, join(fixture.dir, "pylib")]);
});

Deno.test("SCRIPT package directory is module", async () => {
  await using fixture = await makeFixture();
  await Deno.mkdir(join(fixture.dir, "mysite"));
  const options = serve(["mysite"], fixture.env);

  assert.equal(options.app.module, "mysite");
  assert.equal(options.app.scriptPath, undefined);
});

Deno.test("SCRIPT existing file wins over module", async () => {
  await using fixture = await makeFixture();
  await Deno.writeTextFile(join(fixture.dir, "hello"), "application = None\n");
  const options = serve(["hello"], fixture.env);

  assert.equal(options.app.scriptPath, join(fixture.dir, "hello"));
  assert.equal(options.app.module, undefined);
});

Deno.test("SCRIPT after double dash", async () => {
  await using fixture = await makeFixture();
  await Deno.writeTextFile(join(fixture.dir, "-odd.wsgi"), "application = None\n");
  const options = serve(["--port", "81", "--", "-odd.wsgi"], fixture.env);

  assert.equal(options.app.scriptPath, join(fixture.dir, "-odd.wsgi"));
  assert.equal(options.port, 81);
});

Deno.test("double dash ends options", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["app.wsgi", "--", "--port"], fixture.env);

  assert.match(error.message, /^unexpected argument '--port'/);
});

// ---------------------------------------------------------------------------
// Help and version

Deno.test("help long form", async () => {
  await using fixture = await makeFixture();

  assert.deepEqual(parseCommandLine(["--help"], fixture.env), { kind: "help", text: HELP_TEXT });
});

Deno.test("help short form", async () => {
  await using fixture = await makeFixture();

  assert.deepEqual(parseCommandLine(["-h"], fixture.env), { kind: "help", text: HELP_TEXT });
});

Deno.test("help wins over invalid arguments", async () => {
  await using fixture = await makeFixture();
  const result = parseCommandLine(["x.wsgi", "--port", "abc", "--foo", "--help"], fixture.env);

  assert.equal(result.kind, "help");
});

Deno.test("help after double dash is SCRIPT", async () => {
  await using fixture = await makeFixture();
  const error = usageError(["--", "--help"], fixture.env);

  assert.match(error.message, /^script file not found: '--help'/);
});

Deno.test("version text", async () => {
  await using fixture = await makeFixture();
  const result = parseCommandLine(["--version"], fixture.env);

  assert.deepEqual(result, { kind: "version", text: `wsgirun ${WSGIRUN_VERSION}` });
});

Deno.test("version number", () => {
  assert.equal(WSGIRUN_VERSION, "0.1.0");
});

Deno.test("help text lists every option", () => {
  for (const spec of OPTIONS) {
    assert.ok(spec.help.trim() !== "", `${spec.name} has no help`);
    assert.ok(HELP_TEXT.includes(optionSynopsis(spec)), `help lacks ${optionSynopsis(spec)}`);
  }
});

Deno.test("help text states every default", () => {
  for (const spec of OPTIONS) {
    if (spec.defaultText === undefined) continue;
    assert.ok(
      HELP_TEXT.includes(`Default: ${spec.defaultText}`),
      `help lacks ${spec.name} default`,
    );
  }
});

Deno.test("help text options have defaults", () => {
  // Only repeatable options and the two that end parsing have nothing to default to.
  const withoutDefault = OPTIONS.filter((spec) => spec.defaultText === undefined);

  assert.deepEqual(
    withoutDefault.map((spec) => spec.name),
    ["--python-path", "--url-alias", "--help", "--version"],
  );
});

Deno.test("help text says repeatable once", () => {
  // The help of a repeatable option gets this sentence added, so its own text must not have it.
  for (const spec of OPTIONS) {
    assert.ok(!spec.help.includes("May be given more than once"), `${spec.name} says it twice`);
  }
});

Deno.test("help text fits 80 columns", () => {
  for (const line of HELP_TEXT.split("\n")) {
    assert.ok(line.length <= 80, `${line.length} columns: ${line}`);
  }
});

Deno.test("help text examples", () => {
  const lines = HELP_TEXT.split("\n");

  assert.ok(lines.includes("  wsgirun app.wsgi"));
  assert.ok(lines.includes("  wsgirun app.wsgi --threads 4 --python 3.12 --python-path ./pylib"));
  assert.ok(lines.includes("  wsgirun mysite.wsgi:application --url-alias /static ./static"));
});

Deno.test("help text examples parse", async () => {
  await using fixture = await makeFixture();
  await Deno.writeTextFile(join(fixture.dir, "site.conf"), "script app.wsgi\n");
  const examples = HELP_TEXT.split("\n")
    .filter((line) => line.startsWith("  wsgirun "))
    .map((line) => line.trim().split(" ").slice(1));

  assert.equal(examples.length, 4);
  for (const args of examples) {
    assert.equal(parseCommandLine(args, fixture.env).kind, "serve", args.join(" "));
  }
});

// ---------------------------------------------------------------------------
// Error formatting

Deno.test("formatUsageError prefixes program name", () => {
  const error = new UsageError("missing value for --port (expected --port N)");

  assert.equal(formatUsageError(error), "wsgirun: missing value for --port (expected --port N)");
});

Deno.test("UsageError name", () => {
  assert.equal(new UsageError("x").name, "UsageError");
  assert.ok(new UsageError("x") instanceof Error);
});

/** Writes `text` as conf/site.conf in the fixture and returns its path. */
async function writeConfig(fixture: Fixture, text: string): Promise<string> {
  await Deno.mkdir(join(fixture.dir, "conf"), { recursive: true });
  const path = join(fixture.dir, "conf", "site.conf");
  await Deno.writeTextFile(path, text);
  return path;
}

Deno.test("config file settings", async () => {
  await using fixture = await makeFixture();
  const path = await writeConfig(
    fixture,
    [
      "# The site's settings.",
      "script ../app.wsgi",
      "port 9001",
      "",
      "  threads 3   # a comment after the value",
      "url-alias /static ../static",
      `access-log-format '%h "%r" %>s'`,
      "read-ahead=32K",
      'env GREETING="hello \\"world\\""',
      "mount /other ../app.wsgi",
      "access-log",
    ].join("\n"),
  );
  // Relative paths in the file resolve against its folder, not the working folder.
  const options = serve(["--config", path], { ...fixture.env, cwd: "/" });
  assert.equal(options.port, 9001);
  assert.equal(options.threads, 3);
  assert.equal(options.app.scriptPath, join(fixture.dir, "app.wsgi"));
  assert.deepEqual(options.urlAliases, [{ url: "/static", path: join(fixture.dir, "static") }]);
  assert.equal(options.accessLog, true);
  assert.equal(options.accessLogFormat, '%h "%r" %>s');
  assert.equal(options.readAheadBytes, 32 * 1024);
  assert.deepEqual(options.app.environment, { GREETING: 'hello "world"' });
  assert.equal(options.mounts[0].app.scriptPath, join(fixture.dir, "app.wsgi"));
});

Deno.test("config file and command line", async () => {
  await using fixture = await makeFixture();
  await Deno.writeTextFile(join(fixture.dir, "other.wsgi"), "def application(e, s):\n");
  const path = await writeConfig(fixture, "script ../app.wsgi\nport 9001\nenv A=1\n");
  // The command line comes after the file: it replaces single values and adds to lists.
  const options = serve(
    ["other.wsgi", "--config", path, "--port", "9002", "--env", "B=2"],
    fixture.env,
  );
  assert.equal(options.port, 9002);
  assert.equal(options.app.scriptPath, join(fixture.dir, "other.wsgi"));
  assert.deepEqual(options.app.environment, { A: "1", B: "2" });
});

Deno.test("config file errors", async () => {
  await using fixture = await makeFixture();
  const cases: [string, string][] = [
    ["script ../app.wsgi\ncolour red\n", "line 2: unknown option '--colour'"],
    ["script ../app.wsgi\n\nport x\n", "line 3: invalid value for --port: 'x' (expected"],
    ["script ../app.wsgi\naccess-log yes\n", "line 2: unexpected value 'yes' after access-log"],
    ["script ../app.wsgi\nurl-alias /static\n", "line 2: missing PATH for --url-alias '/static'"],
    ["env A='open\n", "line 1: a single quote is not closed"],
    ['env A="open\n', "line 1: a double quote is not closed"],
    ["config other.conf\n", "line 1: --config works on the command line only"],
    ["script ../app.wsgi\nport 1 2\n", "line 2: unexpected value '2' after port (expected port N;"],
    ["script\n", "line 1: script takes one value, the SCRIPT to serve"],
    ["script ../app.wsgi\nwrite ../missing\n", "line 2: invalid value for --write: '../missing'"],
  ];
  for (const [text, message] of cases) {
    const path = await writeConfig(fixture, text);
    const error = usageError(["--config", path], fixture.env);
    assert.ok(error.message.startsWith(`${path} ${message}`), `${text}: ${error.message}`);
  }

  const noScript = await writeConfig(fixture, "port 9001\n");
  assert.match(
    usageError(["--config", noScript], fixture.env).message,
    /^missing SCRIPT: .* or with a 'script' line in the --config file$/,
  );
  assert.match(
    usageError(["--config", "nope.conf"], fixture.env).message,
    /^invalid value for --config: 'nope\.conf' \(expected an existing file, but '.*nope\.conf' does not exist\)$/,
  );
  const latin1 = await writeConfig(fixture, "script ../app.wsgi\n");
  await Deno.writeFile(latin1, new Uint8Array([...new TextEncoder().encode("env A="), 0xe9, 10]));
  assert.match(
    usageError(["--config", latin1], fixture.env).message,
    /^cannot read --config '.*site\.conf': the file is not UTF-8 text; save it as UTF-8$/,
  );
});

Deno.test("config file encodings and line ends", async () => {
  await using fixture = await makeFixture();
  // A byte order mark, and lines that end with CR alone, as old editors write them.
  const path = await writeConfig(fixture, "\uFEFFscript ../app.wsgi\rport 9003\r\nthreads 2\r");
  const options = serve(["--config", path], fixture.env);
  assert.equal(options.port, 9003);
  assert.equal(options.threads, 2);
  // Of two --config options, the last one counts, as for every option given once.
  const other = join(fixture.dir, "conf", "other.conf");
  await Deno.writeTextFile(other, "script ../app.wsgi\nport 9004\n");
  assert.equal(serve(["--config", path, "--config", other], fixture.env).port, 9004);
  // A quoted value is a value even when it starts with "--".
  await Deno.writeTextFile(other, "script ../app.wsgi\naccess-log-format '--%h'\n");
  assert.equal(serve(["--config", other], fixture.env).accessLogFormat, "--%h");
});

Deno.test("config file and unix socket", async () => {
  await using fixture = await makeFixture();
  const socket = join(fixture.dir, "site.sock");
  // The command line replaces the file's TCP socket with a Unix socket, and the reverse.
  const tcpFile = await writeConfig(fixture, "script ../app.wsgi\nport 9005\n");
  const onSocket = serve(["--config", tcpFile, "--unix-socket", socket], fixture.env);
  assert.equal(onSocket.unixSocket, socket);
  const socketFile = join(fixture.dir, "conf", "socket.conf");
  await Deno.writeTextFile(socketFile, `script ../app.wsgi\nunix-socket ${socket}\n`);
  const onPort = serve(["--config", socketFile, "--port", "9006"], fixture.env);
  assert.equal(onPort.unixSocket, undefined);
  assert.equal(onPort.port, 9006);

  const both = join(fixture.dir, "conf", "both.conf");
  await Deno.writeTextFile(both, `script ../app.wsgi\nport 9007\nunix-socket ${socket}\n`);
  assert.equal(
    usageError(["--config", both], fixture.env).message,
    `${both} line 3: --unix-socket cannot be combined with --port: the server listens on the ` +
      "Unix socket alone",
  );
});

Deno.test("trusted proxy unix without a socket warns", async () => {
  await using fixture = await makeFixture();
  const options = serve(["app.wsgi", "--trusted-proxy", "unix"], fixture.env);
  assert.deepEqual(options.warnings, [
    "--trusted-proxy unix trusts the peers of --unix-socket, which is not given: the server " +
    "listens on TCP, and requests from addresses that no --trusted-proxy names lose their " +
    "X-Forwarded-* headers",
  ]);
  const socket = join(fixture.dir, "site.sock");
  const quiet = serve(
    ["app.wsgi", "--trusted-proxy", "unix", "--unix-socket", socket],
    fixture.env,
  );
  assert.equal(quiet.warnings, undefined);
});
