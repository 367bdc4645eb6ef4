/**
 * Blocking TCP for Python inside an isolate: the `_wsgirun_net` module that
 * wasm/python/_wsgirun_socket.py builds `socket.socket` on.
 *
 * Every function here runs on the isolate's thread while Python waits for
 * it. The I/O itself happens on the isolate's network thread
 * (net_worker.ts); this side posts operations to it and blocks in
 * `Atomics.wait` until the reply or the bytes arrive, as `wsgi.input` does.
 * The network thread starts with the isolate when the application may
 * connect anywhere at all; applications without `--allow-net` get none.
 *
 * Before anything reaches the network thread, the application's
 * `--allow-net` list is checked here. A denied connection is logged and
 * returned as EACCES, which Python raises as PermissionError. The network
 * thread's Deno permission lists the same hosts and ports, as a second fence.
 */

import { NET_LAYOUT, type NetRequest, runNetWorker } from "./net_worker.ts";
import { formatNetAddress, isIpAddress, NetPolicy } from "./net_policy.ts";
import { waitBlocked } from "./channel.ts";

/** Bytes each socket can buffer from the peer before the network thread stops reading. */
const RING_CAPACITY = 256 * 1024;
/** Bytes an application may have posted for sending before `send` waits. */
const SEND_WINDOW = 1024 * 1024;
/** Size of the call buffer for replies (addresses, errors), which are small. */
const CALL_BUFFER_BYTES = 64 * 1024;
/** Maximum length of one `Atomics.wait`, so that a wait without a timeout still wakes up now and then. */
const WAIT_SLICE_MS = 1000;

/** Return codes of `send` and `recv_into` besides byte counts. */
const TIMED_OUT = -1;
const FAILED = -2;
const WOULD_BLOCK = -3;

const { ring: RING, ringState: RING_STATE, call: CALL, callState: CALL_STATE } = NET_LAYOUT;

/** A Python bytes-like object as Pyodide hands it to JavaScript. */
export interface PyBuffer {
  getBuffer(type?: string): { data: Uint8Array; release(): void };
}

/** Logs one line in the server's error log, tagged with the current request. */
export type LogFunction = (level: "debug" | "info" | "warning" | "error", message: string) => void;

/** Settings of the network module: the application's name, allow list and log. */
export interface NetModuleOptions {
  /** Application name for messages. */
  appName: string;
  /** `--allow-net` values of the application or its daemon group. */
  allowNet: readonly string[];
  log: LogFunction;
}

/** TLS settings from Python's SSLContext. */
interface TlsOptions {
  caCerts: string[];
  checkHostname: boolean;
  alpnProtocols: string[];
}

interface Socket {
  header: Int32Array;
  data: Uint8Array;
  /** Host name the connection was opened with; the TLS certificate is checked against it. */
  hostname: string;
}

/** Converts Python's timeout in seconds (None for blocking) to a deadline in performance.now() time. */
function deadlineOf(timeout: number | undefined | null): number {
  if (timeout === undefined || timeout === null) return Infinity;
  return performance.now() + timeout * 1000;
}

/**
 * The `_wsgirun_net` module of one isolate. Its methods return plain values
 * (numbers, or JSON text for structured answers) that the Python side turns
 * into the right exceptions.
 */
export class NetModule {
  #options: NetModuleOptions;
  #policy: NetPolicy;
  #worker: Worker | undefined;
  #callHeader: Int32Array | undefined;
  #callData: Uint8Array | undefined;
  #sockets = new Map<number, Socket>();
  #nextId = 1;
  #decoder = new TextDecoder();

  constructor(options: NetModuleOptions) {
    this.#options = options;
    this.#policy = new NetPolicy(options.allowNet);
    // A worker started while this thread blocks in Atomics.wait took about a second to
    // boot (Deno 2.9.6), so it starts now, while the isolate still returns to its event loop.
    if (this.#policy.entries.length > 0) this.#startWorker();
  }

  /**
   * Returns JSON `{ok, addresses: [[family, address], ...]}` for `host`, or
   * a failure. Names are not resolved here: the worker's net permission
   * lists hosts with their ports, and a lookup would need the bare name. So
   * an allowed name is its own address, and the host resolves it when it
   * connects; a name that does not resolve fails there with EAI_NONAME.
   */
  resolve(host: string): string {
    if (isIpAddress(host)) {
      return JSON.stringify({ ok: true, addresses: [[host.includes(":") ? 6 : 4, host]] });
    }
    if (!this.#policy.allowsHost(host)) {
      return this.#deny(`resolving '${host}'`, `${formatNetAddress(host)}:PORT`);
    }
    return JSON.stringify({ ok: true, addresses: [[4, host]] });
  }

  /** Opens a connection; returns JSON `{ok, id, local, peer}` or a failure. */
  connect(host: string, port: number, timeout?: number | null): string {
    const address = formatNetAddress(host, port);
    if (!this.#policy.allows(host, port)) return this.#deny(`connection to ${address}`, address);

    const id = this.#nextId++;
    const ring = new SharedArrayBuffer(RING.headerBytes + RING_CAPACITY);
    const timeoutMs = timeout === undefined || timeout === null ? null : timeout * 1000;
    const result = this.#call({ type: "connect", id, host, port, timeoutMs, ring });
    if (!result.ok) return JSON.stringify(result);

    this.#sockets.set(id, {
      header: new Int32Array(ring, 0, RING.headerBytes / 4),
      data: new Uint8Array(ring, RING.headerBytes),
      hostname: host,
    });
    return JSON.stringify({ ...result, id });
  }

  /**
   * Posts `data` for sending and returns its length, or TIMED_OUT, FAILED or
   * WOULD_BLOCK when more than the send window is still in flight.
   */
  send(id: number, data: PyBuffer, timeout?: number | null): number {
    const socket = this.#sockets.get(id);
    if (!socket || this.#failed(socket)) return FAILED;
    const deadline = deadlineOf(timeout);
    for (;;) {
      const inFlight = Atomics.load(socket.header, RING.sendInFlight);
      if (inFlight <= SEND_WINDOW) break;
      if (this.#failed(socket)) return FAILED;
      const remaining = deadline - performance.now();
      if (timeout === 0) return WOULD_BLOCK;
      if (remaining <= 0) return TIMED_OUT;
      waitBlocked(socket.header, RING.sendInFlight, inFlight, Math.min(remaining, WAIT_SLICE_MS));
    }

    const buffer = data.getBuffer("u8");
    let bytes: Uint8Array<ArrayBuffer>;
    try {
      bytes = new Uint8Array(buffer.data);
    } finally {
      buffer.release();
    }
    // Transferring the buffer detaches it, so its length must be read first.
    const length = bytes.length;
    Atomics.add(socket.header, RING.sendInFlight, length);
    this.#post({ type: "send", id, data: bytes }, [bytes.buffer]);
    return length;
  }

  /**
   * Copies up to `size` received bytes into `target` (a writable Python
   * buffer) and returns the count, 0 at the end of the stream, or
   * TIMED_OUT, FAILED or WOULD_BLOCK.
   */
  recv_into(id: number, target: PyBuffer, size: number, timeout?: number | null): number {
    const socket = this.#sockets.get(id);
    if (!socket) return FAILED;
    const deadline = deadlineOf(timeout);
    for (;;) {
      const events = Atomics.load(socket.header, RING.events);
      const available = this.#available(socket);
      if (available > 0) return this.#take(socket, target, Math.min(available, size));

      const state = Atomics.load(socket.header, RING.state);
      if (state === RING_STATE.eof) return 0;
      if (state === RING_STATE.error) return FAILED;
      this.#demand(id, socket);
      if (timeout === 0) return WOULD_BLOCK;
      const remaining = deadline - performance.now();
      if (remaining <= 0) return TIMED_OUT;
      waitBlocked(socket.header, RING.events, events, Math.min(remaining, WAIT_SLICE_MS));
    }
  }

  /** Bytes received and not read yet. */
  pending(id: number): number {
    const socket = this.#sockets.get(id);
    return socket ? this.#available(socket) : 0;
  }

  /** Returns JSON `{ok: false, errno, message}` describing why the socket failed. */
  error(id: number): string {
    if (!this.#sockets.has(id)) {
      return JSON.stringify({ ok: false, errno: "EBADF", message: "Bad file descriptor" });
    }
    return JSON.stringify(this.#call({ type: "error", id }));
  }

  /**
   * Upgrades the connection to TLS in place and returns JSON `{ok, alpn}` or
   * a failure. `optionsJson` holds `caCerts` (PEM texts trusted besides the
   * host's roots), `checkHostname` and `alpnProtocols`. The certificate is
   * checked against `hostname`, or the connection's own host name when empty.
   */
  starttls(id: number, hostname: string, optionsJson: string, timeout?: number | null): string {
    const socket = this.#sockets.get(id);
    if (!socket) {
      return JSON.stringify({ ok: false, errno: "EBADF", message: "Bad file descriptor" });
    }
    const options = JSON.parse(optionsJson) as TlsOptions;
    const timeoutMs = timeout === undefined || timeout === null ? null : timeout * 1000;
    return JSON.stringify(this.#call({
      type: "starttls",
      id,
      hostname: hostname || socket.hostname,
      caCerts: options.caCerts,
      checkHostname: options.checkHostname,
      alpnProtocols: options.alpnProtocols,
      timeoutMs,
    }));
  }

  /** Closes the sending side once the posted bytes are written (SHUT_WR or SHUT_RDWR). */
  shutdown(id: number): void {
    if (this.#sockets.has(id)) this.#post({ type: "shutdown", id, write: true });
  }

  close(id: number): void {
    if (!this.#sockets.delete(id)) return;
    this.#post({ type: "close", id });
  }

  /** Stops the network thread, which closes every connection. */
  terminate(): void {
    this.#worker?.terminate();
    this.#worker = undefined;
    this.#sockets.clear();
  }

  #deny(action: string, suggestion: string): string {
    const allowed = this.#policy.entries.length === 0
      ? "none is allowed"
      : `allowed: ${this.#policy.entries.map((e) => formatNetAddress(e.host, e.port)).join(", ")}`;
    const message = `${action} is not allowed for the application '${this.#options.appName}' ` +
      `(${allowed}); add --allow-net ${suggestion} to the application, or ` +
      `allow-net=${suggestion} to its daemon group`;
    this.#options.log("warning", message);
    return JSON.stringify({ ok: false, errno: "EACCES", message });
  }

  #available(socket: Socket): number {
    return (Atomics.load(socket.header, RING.written) - Atomics.load(socket.header, RING.read)) | 0;
  }

  #failed(socket: Socket): boolean {
    return Atomics.load(socket.header, RING.state) === RING_STATE.error;
  }

  /** Asks the network thread for more bytes unless a read is already in flight. */
  #demand(id: number, socket: Socket): void {
    if (Atomics.compareExchange(socket.header, RING.readPending, 0, 1) === 0) {
      this.#post({ type: "read", id });
    }
  }

  #take(socket: Socket, target: PyBuffer, count: number): number {
    const buffer = target.getBuffer("u8");
    try {
      const read = Atomics.load(socket.header, RING.read);
      const start = (read >>> 0) % RING_CAPACITY;
      const first = Math.min(count, RING_CAPACITY - start);
      buffer.data.set(socket.data.subarray(start, start + first));
      if (first < count) buffer.data.set(socket.data.subarray(0, count - first), first);
      Atomics.store(socket.header, RING.read, (read + count) | 0);
      return count;
    } finally {
      buffer.release();
    }
  }

  /** Posts a call to the network thread and blocks until it answers. */
  #call(request: NetRequest): { ok: boolean; [key: string]: unknown } {
    this.#startWorker();
    const header = this.#callHeader!;
    Atomics.store(header, CALL.state, CALL_STATE.pending);
    this.#post(request);
    // NOTE: if the network thread died, this waits until the request timeout replaces the
    // isolate; its handlers catch every error of Deno's socket calls, so it should not die.
    while (Atomics.load(header, CALL.state) === CALL_STATE.pending) {
      waitBlocked(header, CALL.state, CALL_STATE.pending, WAIT_SLICE_MS);
    }
    const length = Atomics.load(header, CALL.length);
    const text = this.#decoder.decode(this.#callData!.slice(0, length));
    Atomics.store(header, CALL.state, CALL_STATE.idle);
    return JSON.parse(text);
  }

  #post(request: NetRequest, transfer: Transferable[] = []): void {
    this.#startWorker();
    this.#worker!.postMessage(request, transfer);
  }

  #startWorker(): void {
    if (this.#worker) return;
    const source = `(${runNetWorker.toString()})(${JSON.stringify(NET_LAYOUT)});`;
    const url = URL.createObjectURL(new Blob([source], { type: "application/javascript" }));
    this.#worker = new Worker(url, {
      type: "module",
      name: `net ${this.#options.appName}`,
      deno: {
        permissions: {
          // The isolate's own permission, which supervisor/isolate.ts sets from the same list.
          net: this.#options.allowNet.length > 0 ? [...this.#options.allowNet] : false,
          read: false,
          write: false,
          run: false,
          env: false,
          ffi: false,
          sys: false,
          import: false,
        },
      },
    });
    const call = new SharedArrayBuffer(CALL.headerBytes + CALL_BUFFER_BYTES);
    this.#callHeader = new Int32Array(call, 0, CALL.headerBytes / 4);
    this.#callData = new Uint8Array(call, CALL.headerBytes);
    this.#worker.postMessage({ type: "init", call } satisfies NetRequest);
  }
}
