/**
 * wsgi.file_wrapper in embedded mode: the front sends real files itself, and
 * the adapter must count those bytes instead of reporting a short body.
 */

import assert from "node:assert/strict";
import { rawRequest, repoPath, startServer } from "./helpers/server.ts";

const SCRIPT = repoPath("tests/fixtures/file_wrapper_app.wsgi");

Deno.test("file_wrapper cases", async (t) => {
  const writeDir = await Deno.makeTempDir({ prefix: "wsgirun-file-wrapper-" });
  try {
    await using server = await startServer(SCRIPT, [
      "--threads",
      "1",
      "--write",
      writeDir,
      "--env",
      `WRITE_DIR=${writeDir}`,
    ]);
    const get = async (path: string) => {
      const response = await fetch(server.origin + path);
      return { status: response.status, text: await response.text() };
    };

    await t.step("with content-length", async () => {
      const expected = await Deno.readTextFile(SCRIPT);
      // Two requests on one connection: an aborted first response would close it.
      const request = `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`;
      const replies = await rawRequest(server.port, request + request);

      assert.equal(replies.split("HTTP/1.1 200 OK").length - 1, 2);
      assert.equal(replies.split(expected).length - 1, 2);
      assert.doesNotMatch(server.log(), /Content-Length declared|short body|aborted/);
    });

    await t.step("file in a --write folder", async () => {
      const response = await get("/write-folder");

      assert.equal(response.status, 200);
      assert.equal(response.text, "written by the application\n".repeat(100));
    });

    await t.step("named temporary file", async () => {
      const response = await get("/temporary");

      assert.equal(response.status, 200);
      assert.equal(response.text, "temporary report\n".repeat(1000));
      assert.deepEqual(Array.from(Deno.readDirSync(writeDir), (entry) => entry.name), [
        "written.txt",
      ]);
    });

    await t.step("file short of content-length", async () => {
      const size = (await Deno.stat(SCRIPT)).size;
      await assert.rejects(get("/short"));
      await server.waitForLog(/ended \d+ bytes short/);

      assert.match(
        server.log(),
        new RegExp(
          `ERROR .*wsgi\\.file_wrapper file '${SCRIPT}' ended ${size} bytes short of the Content-Length`,
        ),
      );
      assert.equal((await get("/write-folder")).status, 200);
    });

    await t.step("file opened before os.chdir()", async () => {
      const response = await get("/after-chdir");

      assert.equal(response.status, 200);
      assert.equal(response.text, "the file in first\n");
    });

    await t.step("file replaced after it was opened", async () => {
      const response = await get("/replaced");

      assert.equal(response.status, 200);
      assert.equal(response.text, "the file that was opened\n");
    });
  } finally {
    await Deno.remove(writeDir, { recursive: true });
  }
});

Deno.test("file_wrapper path escaping its folders", async () => {
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-file-wrapper-escape-" });
  const secret = `${folder}/outside/secret.txt`;
  try {
    await Deno.mkdir(`${folder}/app`);
    await Deno.mkdir(`${folder}/outside`);
    await Deno.writeTextFile(secret, "not for the application\n");
    await Deno.copyFile(SCRIPT, `${folder}/app/app.wsgi`);
    await Deno.symlink("../outside", `${folder}/app/leak`);
    await new Deno.Command("mkfifo", { args: [`${folder}/app/fifo`] }).output();
    // A daemon process reads the file as the group's user.
    for (const path of [folder, `${folder}/app`, `${folder}/outside`]) {
      await Deno.chmod(path, 0o755);
    }
    await Deno.chmod(secret, 0o644);
    await Deno.chmod(`${folder}/app/app.wsgi`, 0o644);

    const modes = [["--threads", "1"], ["--daemon", "group=escape,user=nobody,threads=1"]];
    for (const args of modes) {
      await using server = await startServer(`${folder}/app/app.wsgi`, args, {
        waitForReady: false,
      });
      await server.waitForLog(/isolate ready/, 120_000);
      // Both paths start with the application's folder and lead out of it.
      const escapes = [`${folder}/app/../outside/secret.txt`, `${folder}/app/leak/secret.txt`];
      for (const path of escapes) {
        const response = await fetch(`${server.origin}/forged-path?${path}`);
        const body = await response.text().catch((error) => String(error));

        assert.doesNotMatch(body, /not for the application/, args.join(" "));
      }
      const rejections = server.log().match(
        /ERROR .*wsgi\.file_wrapper path '[^']*' is outside the application's folders/g,
      );
      assert.equal(rejections?.length, escapes.length, args.join(" "));

      // A FIFO would block the open until a writer came.
      const fifo = await fetch(`${server.origin}/forged-path?${folder}/app/fifo`, {
        signal: AbortSignal.timeout(10_000),
      });
      await fifo.text().catch(() => undefined);
      await server.waitForLog(/wsgi\.file_wrapper path '[^']*fifo' is not a regular file/, 10_000);
    }
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});

Deno.test("file_wrapper through a linked folder", async () => {
  // The front must accept the real path that the isolate mounts for current/.
  const folder = await Deno.makeTempDir({ prefix: "wsgirun-file-wrapper-link-" });
  try {
    await Deno.mkdir(`${folder}/release`);
    await Deno.mkdir(`${folder}/data-1`);
    await Deno.copyFile(SCRIPT, `${folder}/release/app.wsgi`);
    await Deno.symlink("release", `${folder}/current`);
    // A --write folder behind a link of its own.
    await Deno.symlink("data-1", `${folder}/data`);
    await using server = await startServer(`${folder}/current/app.wsgi`, [
      "--threads",
      "1",
      "--write",
      `${folder}/data`,
      "--env",
      `WRITE_DIR=${folder}/data`,
    ]);
    const response = await fetch(server.origin + "/");
    const written = await fetch(server.origin + "/write-folder");

    assert.equal(response.status, 200);
    assert.equal(await response.text(), await Deno.readTextFile(SCRIPT));
    assert.equal(written.status, 200);
    assert.equal(await written.text(), "written by the application\n".repeat(100));
    assert.ok((await Deno.stat(`${folder}/data-1/written.txt`)).isFile);
    assert.doesNotMatch(server.log(), /outside the application's folders|ERROR/);
  } finally {
    await Deno.remove(folder, { recursive: true });
  }
});
