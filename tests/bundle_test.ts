/**
 * Tests of `deno task bundle` (build/bundle.ts) and of the command line of
 * `deno task compile`.
 *
 * The bundle runs from a temporary folder with no deno.json, as it does once
 * copied elsewhere. That covers what a compiled binary also depends on: the
 * isolate worker found next to the entry file, wasm/adapter.py embedded as
 * text, Pyodide resolved through its npm: specifiers instead of the
 * repository's node_modules folder, and a daemon process started as the
 * same program again through `Deno.execPath()`.
 */

import assert from "node:assert/strict";
import { repoPath } from "./helpers/server.ts";
import { DAEMON_SUBCOMMAND } from "../supervisor/daemon_protocol.ts";

const decoder = new TextDecoder();
const REPOSITORY_ROOT = repoPath("").replace(/\/$/, "");

/**
 * Unstable features the server needs at run time. deno.json turns them on
 * inside the repository, so a bundle run anywhere else must name them.
 */
const UNSTABLE_FLAGS = ["--unstable-worker-options", "--unstable-no-legacy-abort"];

/** Runs build/bundle.ts from the repository root with `outdir` as its output folder. */
async function buildBundle(outdir: string): Promise<void> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-all", "build/bundle.ts", outdir],
    cwd: REPOSITORY_ROOT,
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
  }).output();
  assert.ok(
    output.success,
    `build/bundle.ts failed with exit code ${output.code}:\n${decoder.decode(output.stderr)}`,
  );
}

/** A server process started from the bundle, with its standard error collected as the log. */
interface BundleServer {
  origin: string;
  log(): string;
  /** Sends SIGTERM and returns the exit status. */
  stop(): Promise<Deno.CommandStatus>;
  /** Sends `signal` to the server process. */
  kill(signal: Deno.Signal): void;
  /** Waits for a log line that matches `pattern`. */
  waitForLog(pattern: RegExp): Promise<RegExpMatchArray>;
}

/**
 * Starts `dist/wsgirun.js` from `bundleDir`, with `bundleDir` as working
 * folder, and waits until a log line matches `ready` (an isolate is ready).
 * Without `withConfig` it ignores any configuration file.
 */
async function startBundleServer(
  bundleDir: string,
  args: string[],
  withConfig = false,
  ready = /isolate ready/,
): Promise<BundleServer> {
  const process = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      ...(withConfig ? [] : ["--no-config"]),
      "--allow-all",
      ...UNSTABLE_FLAGS,
      `${bundleDir}/wsgirun.js`,
      ...args,
    ],
    cwd: bundleDir,
    stdout: "null",
    stderr: "piped",
    stdin: "null",
  }).spawn();
  let log = "";
  const logDone = (async () => {
    for await (const chunk of process.stderr) log += decoder.decode(chunk, { stream: true });
  })();
  const stop = async () => {
    try {
      process.kill("SIGTERM");
    } catch {
      // The process has already exited.
    }
    const [status] = await Promise.all([process.status, logDone]);
    return status;
  };

  try {
    const port = await waitForPort(() => log, process.status);
    await waitForLog(() => log, ready, process.status);
    return {
      origin: `http://127.0.0.1:${port}`,
      log: () => log,
      stop,
      kill: (signal) => process.kill(signal),
      waitForLog: (pattern) => waitForLog(() => log, pattern, process.status),
    };
  } catch (error) {
    await stop();
    throw error;
  }
}

const START_TIMEOUT_MS = 60_000;

/** Returns the command line of every process, its arguments joined by spaces. */
function processCommandLines(): string[] {
  const lines: string[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      lines.push(Deno.readTextFileSync(`/proc/${entry.name}/cmdline`).split("\0").join(" "));
    } catch {
      // The process exited while the folder was read.
    }
  }
  return lines;
}

/** Polls the log until `pattern` matches. Throws when the process exits first or the time runs out. */
async function waitForLog(
  log: () => string,
  pattern: RegExp,
  exited: Promise<Deno.CommandStatus>,
): Promise<RegExpMatchArray> {
  let exitCode: number | undefined;
  exited.then((status) => (exitCode = status.code));
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    const match = log().match(pattern);
    if (match) return match;
    if (exitCode !== undefined) {
      throw new Error(
        `the bundle exited with code ${exitCode} before logging ${pattern}; log:\n${log()}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`no log line matching ${pattern} within ${START_TIMEOUT_MS} ms; log:\n${log()}`);
}

async function waitForPort(
  log: () => string,
  exited: Promise<Deno.CommandStatus>,
): Promise<number> {
  const match = await waitForLog(log, /listening on http:\/\/127\.0\.0\.1:(\d+)\//, exited);
  return Number(match[1]);
}

Deno.test({
  name: "bundle",
  // The bundle servers' log readers start new reads while the steps run.
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async (t) => {
    const bundleDir = await Deno.realPath(
      await Deno.makeTempDir({ prefix: "wsgirun_bundle_test_" }),
    );
    try {
      await buildBundle(bundleDir);
      const entry = await Deno.readTextFile(`${bundleDir}/wsgirun.js`);
      const worker = await Deno.readTextFile(`${bundleDir}/isolate_worker.js`);

      await t.step("entry loads worker next to it", () => {
        assert.ok(entry.includes('new URL("./isolate_worker.js", import.meta.url)'));
        assert.ok(
          !entry.includes("isolate_worker.ts"),
          "the entry still points at the TypeScript worker",
        );
      });

      await t.step("worker embeds adapter.py", async () => {
        const adapter = await Deno.readTextFile(repoPath("wasm/adapter.py"));
        const firstFunction = adapter.match(/^def \w+\(/m)?.[0];
        assert.ok(firstFunction, "wasm/adapter.py defines no function");
        assert.ok(
          worker.includes(firstFunction),
          `the worker bundle lacks ${firstFunction} of adapter.py`,
        );
      });

      await t.step("no absolute paths of this machine", () => {
        for (const [name, text] of [["wsgirun.js", entry], ["isolate_worker.js", worker]]) {
          assert.ok(
            !text.includes(REPOSITORY_ROOT),
            `${name} contains the repository path ${REPOSITORY_ROOT}`,
          );
          assert.ok(!text.includes(bundleDir), `${name} contains its output folder ${bundleDir}`);
        }
      });

      // Both Python versions at once: each resolves its own Pyodide package.
      const versions = ["3.12", "3.14"];
      const started = await Promise.allSettled(
        versions.map((python) =>
          startBundleServer(bundleDir, [
            repoPath("examples/hello/app.wsgi"),
            "--port",
            "0",
            "--threads",
            "1",
            "--python",
            python,
          ])
        ),
      );
      const servers = started.flatMap((result) =>
        result.status === "fulfilled" ? [result.value] : []
      );
      try {
        for (const [i, python] of versions.entries()) {
          await t.step(`serves hello on Python ${python} without deno.json`, async () => {
            const result = started[i];
            if (result.status === "rejected") throw result.reason;
            const server = result.value;
            const response = await fetch(server.origin + "/");
            const body = await response.text();

            assert.equal(response.status, 200, `body: ${body}\nlog:\n${server.log()}`);
            assert.equal(body, "Hello, world!\n");
            assert.match(
              server.log(),
              new RegExp(`isolate ready: Python ${python.replace(".", "\\.")}\\.`),
            );
          });
        }
      } finally {
        const statuses = await Promise.all(servers.map((server) => server.stop()));
        await t.step("SIGTERM exits with status 0", () => {
          for (const [i, status] of statuses.entries()) {
            assert.equal(status.code, 0, `exit status ${status.code}, log:\n${servers[i].log()}`);
          }
        });
      }

      await t.step("missing unstable flag stops before listening", async () => {
        const output = await new Deno.Command(Deno.execPath(), {
          args: [
            "run",
            "--no-config",
            "--allow-all",
            `${bundleDir}/wsgirun.js`,
            repoPath("examples/hello/app.wsgi"),
            "--port",
            "0",
          ],
          cwd: bundleDir,
          stdin: "null",
        }).output();
        const log = decoder.decode(output.stderr) + decoder.decode(output.stdout);

        // Deno exits with its own message; the server must not have claimed to listen.
        assert.notEqual(output.code, 0);
        assert.match(log, /--unstable-worker-options/);
        assert.doesNotMatch(log, /listening on/);
      });

      await t.step("daemon group re-enters the bundle", async () => {
        // The daemon runs as the user nobody, which cannot read root's Deno
        // cache, so it needs the node_modules folder that `deno install` makes
        // beside a deployed bundle. Without it the group fails; once it is
        // there, SIGHUP starts the group. A link to the repository's folder
        // stands in for it.
        await Deno.chmod(bundleDir, 0o755);
        const server = await startBundleServer(
          bundleDir,
          [
            repoPath("examples/hello/app.wsgi"),
            "--port",
            "0",
            "--daemon",
            "group=bundled,processes=1,threads=1,user=nobody",
          ],
          true,
          /group marked failed/,
        );
        try {
          // The group's last line carries the cause that the daemon process sent.
          assert.match(
            server.log(),
            /CRITICAL .*group marked failed: .*failed to start: npm:pyodide@\S+ is not in a node_modules folder .*put a deno\.json that sets nodeModulesDir in /,
          );
          await Deno.writeTextFile(`${bundleDir}/deno.json`, '{ "nodeModulesDir": "manual" }\n');
          await Deno.symlink(repoPath("node_modules"), `${bundleDir}/node_modules`);
          server.kill("SIGHUP");
          await server.waitForLog(/daemon process ready/);
          const response = await fetch(server.origin + "/");
          const body = await response.text();
          const daemons = processCommandLines().filter((line) => line.includes(DAEMON_SUBCOMMAND));

          assert.equal(response.status, 200, `body: ${body}\nlog:\n${server.log()}`);
          assert.equal(body, "Hello, world!\n");
          assert.match(
            server.log(),
            /\[app=app\.wsgi group=bundled process=\d+\] daemon process ready/,
          );
          assert.ok(
            daemons.some((line) => line.includes(`${bundleDir}/wsgirun.js`)),
            `no daemon process runs ${bundleDir}/wsgirun.js; daemons:\n${daemons.join("\n")}`,
          );
        } finally {
          const status = await server.stop();
          assert.equal(status.code, 0, `exit status ${status.code}, log:\n${server.log()}`);
        }
      });
    } finally {
      await Deno.remove(bundleDir, { recursive: true });
    }
  },
});

// `deno compile` cannot run in this test, because it downloads Deno's runtime
// binary from the internet the first time. This test checks its command line
// instead. The worker is loaded through a URL computed at run time, so compile
// embeds it only when --include names it. The task names every unstable
// feature of deno.json as a flag, so the binary turns them on without relying
// on compile reading deno.json.
Deno.test("compile task includes worker and unstable flags", async () => {
  const config = JSON.parse(await Deno.readTextFile(repoPath("deno.json")));
  const compile: string = config.tasks.compile;
  const args = compile.split(/\s+/);

  assert.ok(compile.includes("--include wasm/isolate_worker.ts"), `compile task: ${compile}`);
  for (const flag of UNSTABLE_FLAGS) {
    assert.ok(args.includes(flag), `the compile task lacks ${flag}: ${compile}`);
  }
  for (const feature of config.unstable) {
    assert.ok(
      args.includes(`--unstable-${feature}`),
      `the compile task lacks --unstable-${feature}: ${compile}`,
    );
  }
});
