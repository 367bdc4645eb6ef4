/**
 * The network thread of an isolate: a Web Worker that opens the isolate's
 * TCP connections with `Deno.connect`, upgrades them with `Deno.startTls`,
 * and moves their bytes through shared memory.
 *
 * Python's socket API blocks, but Deno's sockets are asynchronous. So the
 * isolate's thread posts each operation here and waits with `Atomics.wait`
 * (see host_socket.ts), while this thread's event loop does the I/O:
 *
 * - calls (connect, STARTTLS, error details) reply through one
 *   shared call buffer per isolate, as UTF-8 JSON;
 * - received bytes go into one shared ring per socket, read only on demand,
 *   so that no read is pending when the application starts TLS (Deno refuses
 *   `startTls` while a read is in flight);
 * - sent bytes arrive by message and are written in order; the ring header
 *   counts the bytes still in flight, so a slow peer slows the sender down.
 *
 * The whole thread is {@linkcode runNetWorker}, which the isolate turns into
 * the source of a blob-URL worker. It therefore uses no imports and no
 * module-level helpers.
 */

/** Shared-memory layout agreed between the isolate and its network thread. */
export const NET_LAYOUT = {
  /** Int32 indexes of a socket ring's header. */
  ring: {
    /** Total bytes written into the ring, modulo 2^32. */
    written: 0,
    /** Total bytes read out of the ring, modulo 2^32. */
    read: 1,
    /** RING_OPEN, RING_EOF or RING_ERROR. */
    state: 2,
    /** 1 while a read from the connection is in flight. */
    readPending: 3,
    /** Bytes posted for sending that are not written yet. */
    sendInFlight: 4,
    /** Incremented after new bytes, the end of the stream or a failure: the reader waits on it. */
    events: 5,
    headerBytes: 32,
  },
  ringState: { open: 0, eof: 1, error: 2 },
  /** Int32 indexes of the call buffer's header. */
  call: { state: 0, length: 1, headerBytes: 8 },
  callState: { idle: 0, pending: 1, done: 2 },
} as const;

export type NetLayout = typeof NET_LAYOUT;

/** Messages from the isolate to its network thread. */
export type NetRequest =
  | { type: "init"; call: SharedArrayBuffer }
  | {
    type: "connect";
    id: number;
    host: string;
    port: number;
    timeoutMs: number | null;
    ring: SharedArrayBuffer;
  }
  | {
    type: "starttls";
    id: number;
    hostname: string;
    /** PEM certificates trusted in addition to the host's roots. */
    caCerts: string[];
    checkHostname: boolean;
    alpnProtocols: string[];
    timeoutMs: number | null;
  }
  | { type: "send"; id: number; data: Uint8Array<ArrayBuffer> }
  | { type: "read"; id: number }
  | { type: "shutdown"; id: number; write: boolean }
  | { type: "error"; id: number }
  | { type: "close"; id: number };

/** A failed call: `errno` is a Python `errno` name, or "SSL" or "SSL_CERT" for TLS failures. */
export interface NetFailure {
  ok: false;
  errno: string;
  message: string;
}

/**
 * The network thread. Runs as the only code of a worker whose source is
 * `(${runNetWorker})(layout)`, so everything it needs is defined inside.
 */
export function runNetWorker(layout: NetLayout): void {
  const { ring: RING, ringState: RING_STATE, call: CALL, callState: CALL_STATE } = layout;
  const encoder = new TextEncoder();

  interface Ring {
    header: Int32Array;
    data: Uint8Array;
    capacity: number;
  }
  interface Connection {
    conn: Deno.Conn;
    ring: Ring;
    readBuffer: Uint8Array;
    /** Resolves when every write posted so far has finished. */
    writes: Promise<void>;
    failure?: NetFailure;
    closed: boolean;
  }

  let callHeader: Int32Array;
  let callData: Uint8Array;
  const connections = new Map<number, Connection>();

  function reply(result: object): void {
    const bytes = encoder.encode(JSON.stringify(result));
    if (bytes.length > callData.length) {
      return reply({ ok: false, errno: "EMSGSIZE", message: "the reply is too large" });
    }
    callData.set(bytes);
    Atomics.store(callHeader, CALL.length, bytes.length);
    Atomics.store(callHeader, CALL.state, CALL_STATE.done);
    Atomics.notify(callHeader, CALL.state);
  }

  /** Maps a Deno error to a Python errno name, so Python raises the matching OSError subclass. */
  function failure(error: unknown): NetFailure {
    const name = error instanceof Error ? error.name : "Error";
    const message = error instanceof Error ? error.message : String(error);
    const errnoByName: Record<string, string> = {
      ConnectionRefused: "ECONNREFUSED",
      ConnectionReset: "ECONNRESET",
      ConnectionAborted: "ECONNABORTED",
      BrokenPipe: "EPIPE",
      TimedOut: "ETIMEDOUT",
      NotConnected: "ENOTCONN",
      AddrNotAvailable: "EADDRNOTAVAIL",
      AddrInUse: "EADDRINUSE",
      NetworkUnreachable: "ENETUNREACH",
      NotCapable: "EACCES",
      PermissionDenied: "EACCES",
      UnexpectedEof: "ECONNRESET",
      Interrupted: "EINTR",
      BadResource: "EBADF",
    };
    let errno = errnoByName[name] ?? "EIO";
    if (/no route to host/i.test(message)) errno = "EHOSTUNREACH";
    // Deno resolves the host name while it connects.
    if (/lookup address|name or service not known|no address associated/i.test(message)) {
      errno = "EAI_NONAME";
    }
    if (name === "InvalidData" || /tls|certificate|handshake/i.test(message)) {
      errno = /certificate/i.test(message) ? "SSL_CERT" : "SSL";
    }
    return { ok: false, errno, message };
  }

  function withTimeout<T>(
    promise: Promise<T>,
    timeoutMs: number | null,
    onLate: (value: T) => void,
  ) {
    if (timeoutMs === null) return promise;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        promise.then(onLate, () => {});
        reject(Object.assign(new Error("timed out"), { name: "TimedOut" }));
      }, timeoutMs);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  }

  /** Wakes the isolate if it waits for this ring. */
  function signal(header: Int32Array): void {
    Atomics.add(header, RING.events, 1);
    Atomics.notify(header, RING.events);
  }

  function openRing(buffer: SharedArrayBuffer): Ring {
    const data = new Uint8Array(buffer, RING.headerBytes);
    return { header: new Int32Array(buffer, 0, RING.headerBytes / 4), data, capacity: data.length };
  }

  function markFailed(connection: Connection, error: unknown): void {
    connection.failure ??= failure(error);
    const header = connection.ring.header;
    Atomics.store(header, RING.state, RING_STATE.error);
    Atomics.store(header, RING.readPending, 0);
    signal(header);
    Atomics.notify(header, RING.sendInFlight);
  }

  async function connect(request: Extract<NetRequest, { type: "connect" }>): Promise<void> {
    try {
      const conn = await withTimeout(
        Deno.connect({ hostname: request.host, port: request.port }),
        request.timeoutMs,
        (late) => late.close(),
      );
      // Drivers send one message per write and wait for the answer, so Nagle's
      // algorithm would only add delay.
      conn.setNoDelay(true);
      const ring = openRing(request.ring);
      connections.set(request.id, {
        conn,
        ring,
        readBuffer: new Uint8Array(ring.capacity),
        writes: Promise.resolve(),
        closed: false,
      });
      const local = conn.localAddr as Deno.NetAddr;
      const remote = conn.remoteAddr as Deno.NetAddr;
      reply({
        ok: true,
        local: [local.hostname, local.port],
        peer: [remote.hostname, remote.port],
      });
    } catch (error) {
      reply(failure(error));
    }
  }

  /** Reads once from the connection into the ring's free space. */
  async function read(connection: Connection): Promise<void> {
    const header = connection.ring.header;
    const used = (Atomics.load(header, RING.written) - Atomics.load(header, RING.read)) | 0;
    const free = connection.ring.capacity - used;
    try {
      const count = free === 0
        ? 0
        : await connection.conn.read(connection.readBuffer.subarray(0, free));
      if (count === null) {
        Atomics.store(header, RING.state, RING_STATE.eof);
      } else if (count > 0) {
        copyIntoRing(connection.ring, connection.readBuffer.subarray(0, count));
      }
      Atomics.store(header, RING.readPending, 0);
      signal(header);
    } catch (error) {
      // Closing the socket ends its pending read with an error nobody waits for.
      if (!connection.closed) markFailed(connection, error);
    }
  }

  function copyIntoRing(ring: Ring, bytes: Uint8Array): void {
    const written = Atomics.load(ring.header, RING.written);
    const start = (written >>> 0) % ring.capacity;
    const first = Math.min(bytes.length, ring.capacity - start);
    ring.data.set(bytes.subarray(0, first), start);
    if (first < bytes.length) ring.data.set(bytes.subarray(first), 0);
    Atomics.store(ring.header, RING.written, (written + bytes.length) | 0);
  }

  function send(connection: Connection, data: Uint8Array): void {
    connection.writes = connection.writes.then(async () => {
      try {
        if (connection.failure) return;
        let offset = 0;
        while (offset < data.length) offset += await connection.conn.write(data.subarray(offset));
      } catch (error) {
        markFailed(connection, error);
      } finally {
        Atomics.sub(connection.ring.header, RING.sendInFlight, data.length);
        Atomics.notify(connection.ring.header, RING.sendInFlight);
      }
    });
  }

  async function startTls(request: Extract<NetRequest, { type: "starttls" }>): Promise<void> {
    const connection = connections.get(request.id);
    if (!connection) return reply({ ok: false, errno: "EBADF", message: "the socket is closed" });
    await connection.writes;
    if (Atomics.load(connection.ring.header, RING.readPending) !== 0) {
      return reply({
        ok: false,
        errno: "SSL",
        message: "cannot start TLS while a receive is waiting for the server; start TLS " +
          "before calling recv() without data expected",
      });
    }
    try {
      const tls = await Deno.startTls(connection.conn as Deno.TcpConn, {
        hostname: request.hostname,
        caCerts: request.caCerts,
        alpnProtocols: request.alpnProtocols,
        unsafelyDisableHostnameVerification: !request.checkHostname,
      });
      const handshake = await withTimeout(tls.handshake(), request.timeoutMs, () => {});
      connection.conn = tls;
      reply({ ok: true, alpn: handshake.alpnProtocol ?? null });
    } catch (error) {
      markFailed(connection, error);
      reply(failure(error));
    }
  }

  async function shutdown(connection: Connection): Promise<void> {
    await connection.writes;
    try {
      await connection.conn.closeWrite();
    } catch {
      // Shutting down a connection that the peer already closed is not an error in Python.
    }
  }

  function close(id: number): void {
    const connection = connections.get(id);
    connections.delete(id);
    if (!connection) return;
    connection.closed = true;
    // Let posted writes finish first, as closing a kernel socket would.
    connection.writes.finally(() => {
      try {
        connection.conn.close();
      } catch {
        // Already closed by a failed read or write.
      }
    });
  }

  // The worker's global scope; typed here because this module is also part of programs
  // whose global is a window.
  const scope = globalThis as unknown as { onmessage: (event: MessageEvent<NetRequest>) => void };
  scope.onmessage = (event: MessageEvent<NetRequest>) => {
    const request = event.data;
    if (request.type === "init") {
      callHeader = new Int32Array(request.call, 0, CALL.headerBytes / 4);
      callData = new Uint8Array(request.call, CALL.headerBytes);
      return;
    }
    if (request.type === "connect") return void connect(request);
    if (request.type === "starttls") return void startTls(request);
    if (request.type === "close") return close(request.id);

    const connection = connections.get(request.id);
    if (request.type === "error") {
      return reply(
        connection?.failure ?? { ok: false, errno: "EBADF", message: "the socket is closed" },
      );
    }
    if (!connection) return;
    if (request.type === "send") return send(connection, request.data);
    if (request.type === "read") return void read(connection);
    if (request.type === "shutdown") return void shutdown(connection);
  };
}
