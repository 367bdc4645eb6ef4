/**
 * Worker of `request_path.ts inbox`: takes each request from a RequestInbox,
 * as an isolate does, and replies at once with a posted message.
 */

/// <reference lib="deno.worker" />

import { RequestControl, RequestInbox } from "../wasm/channel.ts";

self.onmessage = (event: MessageEvent<{ inbox: SharedArrayBuffer; table: SharedArrayBuffer }>) => {
  const inbox = new RequestInbox(event.data.inbox);
  const table = event.data.table;
  // Each turn returns to the event loop once, so that terminate() ends the worker.
  const serve = () => {
    for (let taken = 0; taken < 10_000; taken++) {
      const entry = inbox.take(1000);
      if (entry === null) break;
      if (entry === "mail") continue;
      // Start and finish the request on its control slot, so the slot returns to use.
      const control = new RequestControl(table, entry.controlSlot);
      if (!control.claim(entry.ticket)) continue;
      control.finish();
      self.postMessage({ id: Number(entry.requestId), body: "Hello, world!\n" });
    }
    setTimeout(serve, 0);
  };
  serve();
};
