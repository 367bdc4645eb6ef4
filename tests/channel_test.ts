/**
 * The shared-memory path from the pool to an isolate: requests written to a
 * RequestInbox and read by a real worker thread, and the reuse rules of
 * ControlTable slots.
 */

import assert from "node:assert/strict";
import {
  ControlTable,
  INBOX_ENTRIES,
  INBOX_ENTRY_BYTES,
  type InboxRequest,
  nextTicket,
  RequestControl,
  RequestInbox,
} from "../wasm/channel.ts";

type Echo = { kind: "mail" } | ({ kind: "request"; claimed: boolean } & InboxRequest);

/** Starts the test worker and returns a function that waits for its next message. */
function startReader(inbox: RequestInbox, table: ControlTable) {
  const worker = new Worker(new URL("./fixtures/inbox_worker.ts", import.meta.url), {
    type: "module",
  });
  const received: Echo[] = [];
  const waiters: ((echo: Echo) => void)[] = [];
  worker.onmessage = (event: MessageEvent<Echo>) => {
    const waiter = waiters.shift();
    if (waiter) waiter(event.data);
    else received.push(event.data);
  };
  worker.postMessage({ inbox: inbox.buffer, table: table.buffer });
  const next = (): Promise<Echo> => {
    const ready = received.shift();
    if (ready) return Promise.resolve(ready);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error("the worker sent nothing within 10 s")),
        10_000,
      );
      waiters.push((echo) => {
        clearTimeout(timer);
        resolve(echo);
      });
    });
  };
  return { next, stop: () => worker.terminate() };
}

function request(control: RequestControl, fields: Partial<InboxRequest> = {}): InboxRequest {
  const ticket = nextTicket();
  control.assign(ticket);
  return {
    ticket,
    controlSlot: control.slot,
    requestId: "r-1",
    method: "GET",
    environ: "{}",
    body: new Uint8Array(0),
    ...fields,
  };
}

Deno.test("inbox carries a request to a worker", async () => {
  const inbox = new RequestInbox();
  const table = new ControlTable(4);
  const reader = startReader(inbox, table);
  try {
    const control = table.allocate();
    const sent = request(control, {
      requestId: "r-ü",
      method: "POST",
      environ: JSON.stringify({ PATH_INFO: "/café/日本", HTTP_X: "\u00e9" }),
      body: new Uint8Array([0, 1, 2, 255]),
    });
    assert.ok(inbox.postRequest(sent));
    const echo = await reader.next();
    assert.equal(echo.kind, "request");
    if (echo.kind !== "request") return;
    assert.equal(echo.claimed, true);
    assert.equal(echo.requestId, "r-ü");
    assert.equal(echo.method, "POST");
    assert.deepEqual(JSON.parse(echo.environ), { PATH_INFO: "/café/日本", HTTP_X: "é" });
    assert.deepEqual([...echo.body!], [0, 1, 2, 255]);
    assert.equal(echo.controlSlot, control.slot);
    assert.equal(control.settled, true);
  } finally {
    reader.stop();
  }
});

Deno.test("inbox keeps a null body apart from an empty one", async () => {
  const inbox = new RequestInbox();
  const table = new ControlTable(4);
  const reader = startReader(inbox, table);
  try {
    assert.ok(inbox.postRequest(request(table.allocate(), { body: null })));
    assert.ok(inbox.postRequest(request(table.allocate(), { body: new Uint8Array(0) })));
    const first = await reader.next();
    const second = await reader.next();
    assert.equal(first.kind === "request" && first.body, null);
    assert.equal(second.kind === "request" && second.body?.length, 0);
  } finally {
    reader.stop();
  }
});

Deno.test("inbox mail keeps its place in order", async () => {
  const inbox = new RequestInbox();
  const table = new ControlTable(4);
  const reader = startReader(inbox, table);
  try {
    assert.ok(inbox.postRequest(request(table.allocate(), { requestId: "a" })));
    inbox.postMail();
    assert.ok(inbox.postRequest(request(table.allocate(), { requestId: "b" })));
    const kinds = [];
    for (let i = 0; i < 3; i++) {
      const echo = await reader.next();
      kinds.push(echo.kind === "request" ? echo.requestId : echo.kind);
    }
    assert.deepEqual(kinds, ["a", "mail", "b"]);
  } finally {
    reader.stop();
  }
});

Deno.test("inbox refuses a request larger than an entry", () => {
  const inbox = new RequestInbox();
  const table = new ControlTable(4);
  const big = "x".repeat(INBOX_ENTRY_BYTES);
  assert.equal(inbox.postRequest(request(table.allocate(), { environ: big })), false);
  const body = new Uint8Array(INBOX_ENTRY_BYTES);
  assert.equal(inbox.postRequest(request(table.allocate(), { body })), false);
  // Nothing was written: the whole ring is still free.
  for (let i = 0; i < INBOX_ENTRIES; i++) assert.ok(inbox.postRequest(request(table.allocate())));
});

Deno.test("full inbox refuses and reports no room", () => {
  const inbox = new RequestInbox();
  const table = new ControlTable(INBOX_ENTRIES + 1);
  for (let i = 0; i < INBOX_ENTRIES; i++) assert.ok(inbox.postRequest(request(table.allocate())));
  assert.equal(inbox.hasRoom, false);
  assert.equal(inbox.postRequest(request(table.allocate())), false);
});

Deno.test("withdrawn posting cannot start", () => {
  const table = new ControlTable(1);
  const control = table.allocate();
  const first = nextTicket();
  control.assign(first);
  assert.equal(control.withdraw(first), true);
  const second = nextTicket();
  control.assign(second);
  // The worker finds the first posting later: the ticket no longer holds.
  const worker = new RequestControl(table.buffer, control.slot);
  assert.equal(worker.claim(first), false);
  assert.equal(worker.claim(second), true);
  assert.equal(control.withdraw(second), false);
});

Deno.test("control slot waits for its worker", () => {
  const table = new ControlTable(1);
  const control = table.allocate();
  assert.notEqual(control.slot, -1);
  const ticket = nextTicket();
  control.assign(ticket);
  const worker = new RequestControl(table.buffer, control.slot);
  assert.ok(worker.claim(ticket));

  // The front is done while the worker still runs. The slot stays taken, and
  // the request is cancelled for the worker because the front reads no more of it.
  control.release();
  assert.equal(worker.cancelled, true);
  const meanwhile = table.allocate();
  assert.equal(meanwhile.slot, -1);

  worker.finish();
  const reused = table.allocate();
  assert.equal(reused.slot, control.slot);
  assert.equal(worker.cancelled, false);
});

Deno.test("released control ignores late calls", () => {
  const table = new ControlTable(1);
  const control = table.allocate();
  const ticket = nextTicket();
  control.assign(ticket);
  const worker = new RequestControl(table.buffer, control.slot);
  assert.ok(worker.claim(ticket));
  worker.finish();
  control.release();

  const next = table.allocate();
  assert.equal(next.slot, control.slot);
  // A cancel that Deno delivers after the response ended must not reach the slot's new request.
  control.cancel();
  control.released(100);
  assert.equal(next.cancelled, false);
  next.reserve(10, 10);
});

Deno.test("slot of a never started request returns", () => {
  const table = new ControlTable(1);
  const control = table.allocate();
  control.release();
  assert.equal(table.allocate().slot, control.slot);
  assert.equal(table.inUse, 1);
});
