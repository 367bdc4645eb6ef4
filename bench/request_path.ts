/**
 * Baselines for the request path: the cost of Deno.serve alone, and of one
 * message round trip to a worker per request (one request in flight per
 * worker). The request carries an environ, and in the worker mode a control
 * buffer of its own, as a request that wsgirun posts as a message does. Comparing these with wsgirun's
 * hello world shows how much of a request is HTTP, how much is the hop to
 * the isolate, and how much is Python.
 *
 * The inbox mode sends each request through a RequestInbox in shared memory,
 * as wsgirun's pool does, and the worker replies with a posted message.
 *
 * Usage: deno run --allow-net --allow-read bench/request_path.ts plain|worker|inbox PORT
 */

import { ControlTable, nextTicket, RequestInbox } from "../wasm/channel.ts";

const [mode, portText] = Deno.args;
const port = Number(portText);
const body = new TextEncoder().encode("Hello, world!\n");
/** An environ like the one wsgirun sends for a wrk request (about 300 bytes of JSON). */
const environ = JSON.stringify({
  REQUEST_METHOD: "GET",
  SCRIPT_NAME: "",
  PATH_INFO: "/",
  QUERY_STRING: "",
  REQUEST_URI: "/",
  SERVER_PROTOCOL: "HTTP/1.1",
  SERVER_NAME: "127.0.0.1",
  SERVER_PORT: String(port),
  REMOTE_ADDR: "127.0.0.1",
  REMOTE_PORT: "51234",
  "wsgi.url_scheme": "http",
  HTTP_HOST: `127.0.0.1:${port}`,
  HTTP_USER_AGENT: "wrk",
  HTTP_ACCEPT: "*/*",
});

if (mode === "plain") {
  Deno.serve(
    { hostname: "127.0.0.1", port },
    () => new Response(body, { headers: { "content-type": "text/plain" } }),
  );
} else if (mode === "worker") {
  // The worker replies to each message at once, so only the hop is measured.
  const source =
    'self.onmessage = (e) => self.postMessage({ id: e.data.id, body: "Hello, world!\\n" });';
  const url = URL.createObjectURL(new Blob([source], { type: "text/javascript" }));
  const workers = [new Worker(url, { type: "module" }), new Worker(url, { type: "module" })];
  const waiting = new Map<number, (value: unknown) => void>();
  const idle: Worker[] = [...workers];
  const queue: number[] = [];
  let next = 0;
  for (const worker of workers) {
    worker.onmessage = (event) => {
      waiting.get(event.data.id)?.(event.data);
      waiting.delete(event.data.id);
      const id = queue.shift();
      if (id === undefined) idle.push(worker);
      else worker.postMessage({ id, environ, control: new SharedArrayBuffer(12) });
    };
  }
  Deno.serve({ hostname: "127.0.0.1", port }, async () => {
    const id = next++;
    const done = new Promise((resolve) => waiting.set(id, resolve));
    const worker = idle.pop();
    if (worker) worker.postMessage({ id, environ, control: new SharedArrayBuffer(12) });
    else queue.push(id);
    await done;
    return new Response(body, { headers: { "content-type": "text/plain" } });
  });
} else if (mode === "inbox") {
  const controls = new ControlTable();
  const workers = [0, 1].map(() => {
    const worker = new Worker(new URL("./request_path_worker.ts", import.meta.url), {
      type: "module",
    });
    const inbox = new RequestInbox();
    worker.postMessage({ inbox: inbox.buffer, table: controls.buffer });
    return { worker, inbox };
  });
  const waiting = new Map<number, (value: unknown) => void>();
  const idle = [...workers];
  const queue: number[] = [];
  let next = 0;
  const post = (target: (typeof workers)[number], id: number) => {
    const control = controls.allocate();
    const ticket = nextTicket();
    control.assign(ticket);
    const request = {
      ticket,
      controlSlot: control.slot,
      requestId: String(id),
      method: "GET",
      environ,
      body: null,
    };
    target.inbox.postRequest(request);
    control.release();
  };
  for (const target of workers) {
    target.worker.onmessage = (event) => {
      waiting.get(event.data.id)?.(event.data);
      waiting.delete(event.data.id);
      const id = queue.shift();
      if (id === undefined) idle.push(target);
      else post(target, id);
    };
  }
  Deno.serve({ hostname: "127.0.0.1", port }, async () => {
    const id = next++;
    const done = new Promise((resolve) => waiting.set(id, resolve));
    const target = idle.pop();
    if (target) post(target, id);
    else queue.push(id);
    await done;
    return new Response(body, { headers: { "content-type": "text/plain" } });
  });
} else {
  console.error("usage: request_path.ts plain|worker|inbox PORT");
  Deno.exit(2);
}
