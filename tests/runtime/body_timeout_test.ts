/**
 * withBodyTimeout: request bodies of every kind Deno hands out pass through
 * unchanged, and a body that stops sending fails with BodyTimeoutError.
 */

import assert from "node:assert/strict";
import { BodyTimeoutError, withBodyTimeout } from "../../runtime/body_timeout.ts";

const bodies: [string, () => ReadableStream<Uint8Array>, number][] = [
  ["empty request body", () => new Request("http://x/", { method: "POST", body: "" }).body!, 0],
  [
    "small request body",
    () => new Request("http://x/", { method: "POST", body: "hello" }).body!,
    5,
  ],
  [
    "byte stream",
    () =>
      new ReadableStream<Uint8Array>({
        type: "bytes",
        start(controller) {
          controller.enqueue(new Uint8Array(100_000));
          controller.close();
        },
      }),
    100_000,
  ],
  [
    "default stream with an empty piece",
    () =>
      new ReadableStream<Uint8Array>({
        start(controller) {
          controller.enqueue(new Uint8Array(0));
          controller.enqueue(new Uint8Array(7));
          controller.close();
        },
      }),
    7,
  ],
];

for (const [name, makeBody, length] of bodies) {
  Deno.test(`body timeout passes ${name}`, async () => {
    const body = withBodyTimeout(makeBody(), 10_000, () => assert.fail("timed out"));
    const bytes = await new Response(body).arrayBuffer();

    assert.equal(bytes.byteLength, length);
  });
}

Deno.test("body timeout fails a stalled body", async () => {
  let reported: BodyTimeoutError | undefined;
  const stalled = new ReadableStream<Uint8Array>({
    type: "bytes",
    start(controller) {
      controller.enqueue(new Uint8Array(10));
    },
  });
  const body = withBodyTimeout(stalled, 50, (error) => (reported = error));
  const reader = body.getReader({ mode: "byob" });

  assert.equal((await reader.read(new Uint8Array(64))).value?.length, 10);
  await assert.rejects(reader.read(new Uint8Array(64)), BodyTimeoutError);
  assert.ok(reported instanceof BodyTimeoutError);
  assert.match(reported.message, /no request body data for 0\.05 s \(--body-timeout\)/);
});
