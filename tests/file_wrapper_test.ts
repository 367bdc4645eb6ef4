/**
 * wsgi.file_wrapper with a Content-Length: the front sends the file, and the
 * adapter must count those bytes instead of reporting a short body.
 */

import assert from "node:assert/strict";
import { rawRequest, repoPath, startServer } from "./helpers/server.ts";

const SCRIPT = repoPath("tests/fixtures/file_wrapper_app.wsgi");

Deno.test("file_wrapper with content-length", async () => {
  await using server = await startServer(SCRIPT, ["--threads", "1"]);
  const expected = await Deno.readTextFile(SCRIPT);

  // Two requests on one connection: an aborted first response would close it.
  const request = `GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n`;
  const replies = await rawRequest(server.port, request + request);

  assert.equal(replies.split("HTTP/1.1 200 OK").length - 1, 2);
  assert.equal(replies.split(expected).length - 1, 2);
  assert.doesNotMatch(server.log(), /Content-Length declared|short body|aborted/);
});
