/**
 * Baselines for the request path: the cost of Deno.serve alone, and of one
 * message round trip to a worker per request (one request in flight per
 * worker, as wsgirun's pool dispatches). Comparing these with wsgirun's
 * hello world shows how much of a request is HTTP, how much is the hop to
 * the isolate, and how much is Python.
 *
 * Usage: deno run --allow-net bench/request_path.ts plain|worker PORT
 */

const [mode, portText] = Deno.args;
const port = Number(portText);
const body = new TextEncoder().encode("Hello, world!\n");

if (mode === "plain") {
  Deno.serve({ hostname: "127.0.0.1", port }, () => new Response(body, { headers: { "content-type": "text/plain" } }));
} else if (mode === "worker") {
  // The worker replies to each message at once, so only the hop is measured.
  const source = "self.onmessage = (e) => self.postMessage(e.data);";
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
      else worker.postMessage({ id, environ: "{}" });
    };
  }
  Deno.serve({ hostname: "127.0.0.1", port }, async () => {
    const id = next++;
    const done = new Promise((resolve) => waiting.set(id, resolve));
    const worker = idle.pop();
    if (worker) worker.postMessage({ id, environ: "{}" });
    else queue.push(id);
    await done;
    return new Response(body, { headers: { "content-type": "text/plain" } });
  });
} else {
  console.error("usage: request_path.ts plain|worker PORT");
  Deno.exit(2);
}
