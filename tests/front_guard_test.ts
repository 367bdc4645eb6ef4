/**
 * The front rejects invalid response headers itself. A control byte in a
 * header value makes Deno's HTTP server panic and exit, so an isolate that
 * gets past the adapter's checks must not be able to take the server down.
 */

import assert from "node:assert/strict";
import { repoPath, startServer } from "./helpers/server.ts";

Deno.test("front rejects control byte header", async () => {
  await using server = await startServer(repoPath("tests/fixtures/front_guard_app.wsgi"), [
    "--threads",
    "1",
  ]);

  const bad = await fetch(server.origin + "/bypass");
  await bad.body?.cancel();
  assert.equal(bad.status, 500);
  assert.equal(bad.headers.get("x-bad"), null);

  const good = await fetch(server.origin + "/");
  assert.equal(good.status, 200);
  assert.equal(await good.text(), "still serving");
  assert.match(server.log(), /invalid value for header X-Bad/);
});
