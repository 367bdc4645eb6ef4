/**
 * Shared-memory channels between the front (an async event loop) and an
 * isolate's worker (synchronous Python that must block).
 *
 * A WSGI application reads `wsgi.input` and writes its response
 * synchronously, while the front moves bytes with async streams. Both sides
 * therefore meet in a SharedArrayBuffer: the worker blocks in `Atomics.wait`,
 * the front waits with `Atomics.waitAsync` so its event loop keeps serving
 * other requests. Nothing here buffers a whole body: the body ring contains at
 * most its capacity and the response window bounds the bytes in flight.
 */

/** Indexes into a request's control words. */
const CANCELLED = 0;
const RESPONSE_BYTES_IN_FLIGHT = 1;
/** The isolate id the request is assigned to, or CLAIMED once that isolate started it. */
const OWNER = 2;
const CONTROL_WORDS = 3;
const UNASSIGNED = 0;
const CLAIMED = -1;

/** Indexes into a body ring's header words. */
const WRITTEN = 0; // total bytes written, modulo 2^32
const READ = 1; // total bytes read, modulo 2^32
const STATE = 2;
const READER_GONE = 3;
const RING_HEADER_BYTES = 16;

const STATE_OPEN = 0;
const STATE_END = 1;
const STATE_ABORTED = 2;

/** Capacity of the ring a streamed request body passes through (a power of two). */
export const BODY_RING_BYTES = 256 * 1024;

/** How long one blocking wait lasts before the waiter re-checks its flags. */
const WAIT_SLICE_MS = 1000;

/** Raised in the worker when the front has cancelled the request (client gone). */
export class RequestCancelled extends Error {
  constructor(message = "the client closed the connection") {
    super(message);
    this.name = "RequestCancelled";
  }
}

/**
 * Per-request control words: a cancel flag set by the front, and the count of
 * response bytes the worker has posted that the client has not taken yet.
 */
export class RequestControl {
  readonly buffer: SharedArrayBuffer;
  #words: Int32Array;

  constructor(buffer = new SharedArrayBuffer(CONTROL_WORDS * 4)) {
    this.buffer = buffer;
    this.#words = new Int32Array(buffer);
  }

  /** Pool side: assign the request to `isolateId` before posting it there. */
  assign(isolateId: number): void {
    Atomics.store(this.#words, OWNER, isolateId);
  }

  /**
   * Pool side: take the request back from `isolateId` if that isolate has not
   * started it. Returns whether it was taken back.
   */
  withdraw(isolateId: number): boolean {
    return Atomics.compareExchange(this.#words, OWNER, isolateId, UNASSIGNED) === isolateId;
  }

  /** Worker side: start the request if it is still assigned to `isolateId`. */
  claim(isolateId: number): boolean {
    return Atomics.compareExchange(this.#words, OWNER, isolateId, CLAIMED) === isolateId;
  }

  get cancelled(): boolean {
    return Atomics.load(this.#words, CANCELLED) !== 0;
  }

  /** Front side: mark the request cancelled and wake a worker blocked on the window. */
  cancel(): void {
    Atomics.store(this.#words, CANCELLED, 1);
    Atomics.notify(this.#words, RESPONSE_BYTES_IN_FLIGHT);
  }

  /** Front side: the client has taken `bytes` more of the response. */
  released(bytes: number): void {
    Atomics.sub(this.#words, RESPONSE_BYTES_IN_FLIGHT, bytes);
    Atomics.notify(this.#words, RESPONSE_BYTES_IN_FLIGHT);
  }

  /**
   * Worker side: account for `bytes` about to be posted, then block while
   * more than `window` bytes are in flight. Throws RequestCancelled once the
   * front cancels, so Python's iteration stops and `close()` still runs.
   */
  reserve(bytes: number, window: number): void {
    Atomics.add(this.#words, RESPONSE_BYTES_IN_FLIGHT, bytes);
    for (;;) {
      if (this.cancelled) throw new RequestCancelled();
      const inFlight = Atomics.load(this.#words, RESPONSE_BYTES_IN_FLIGHT);
      if (inFlight <= window) return;
      Atomics.wait(this.#words, RESPONSE_BYTES_IN_FLIGHT, inFlight, WAIT_SLICE_MS);
    }
  }
}

/**
 * A single-producer, single-consumer byte ring for one request body.
 * The front writes (async, with backpressure); the worker reads (blocking).
 */
export class BodyRing {
  readonly buffer: SharedArrayBuffer;
  #header: Int32Array;
  #data: Uint8Array;
  #capacity: number;

  /** `capacity` must be a power of two so positions stay valid when the 32-bit counters wrap. */
  static create(capacity: number): BodyRing {
    if (capacity <= 0 || (capacity & (capacity - 1)) !== 0) {
      throw new RangeError(`Body ring capacity must be a power of two, got ${capacity}`);
    }
    return new BodyRing(new SharedArrayBuffer(RING_HEADER_BYTES + capacity));
  }

  constructor(buffer: SharedArrayBuffer) {
    this.buffer = buffer;
    this.#header = new Int32Array(buffer, 0, RING_HEADER_BYTES / 4);
    this.#data = new Uint8Array(buffer, RING_HEADER_BYTES);
    this.#capacity = this.#data.length;
  }

  #available(): number {
    return (Atomics.load(this.#header, WRITTEN) - Atomics.load(this.#header, READ)) | 0;
  }

  // ---- front side ----

  /**
   * Copies `chunk` into the ring, waiting (without blocking the event loop)
   * while the ring is full. Returns false when the reader has gone, so the
   * caller stops pulling the client's body.
   */
  async write(chunk: Uint8Array): Promise<boolean> {
    let offset = 0;
    while (offset < chunk.length) {
      if (Atomics.load(this.#header, READER_GONE) !== 0) return false;
      const read = Atomics.load(this.#header, READ);
      const written = Atomics.load(this.#header, WRITTEN);
      const space = this.#capacity - ((written - read) | 0);
      if (space === 0) {
        const wait = Atomics.waitAsync(this.#header, READ, read, WAIT_SLICE_MS);
        if (wait.async) await wait.value;
        continue;
      }
      const count = Math.min(space, chunk.length - offset);
      this.#copyIn(chunk.subarray(offset, offset + count), written >>> 0);
      Atomics.store(this.#header, WRITTEN, (written + count) | 0);
      Atomics.notify(this.#header, WRITTEN);
      offset += count;
    }
    return true;
  }

  #copyIn(bytes: Uint8Array, position: number): void {
    const start = position & (this.#capacity - 1);
    const first = Math.min(bytes.length, this.#capacity - start);
    this.#data.set(bytes.subarray(0, first), start);
    if (first < bytes.length) this.#data.set(bytes.subarray(first), 0);
  }

  /** Marks the end of the body. */
  end(): void {
    this.#setState(STATE_END);
  }

  /** Marks the body as failed (client gone or invalid framing); the reader raises. */
  abort(): void {
    this.#setState(STATE_ABORTED);
  }

  /** Tells a waiting writer that no reader remains (the request is over). */
  closeReader(): void {
    Atomics.store(this.#header, READER_GONE, 1);
    Atomics.notify(this.#header, READ);
  }

  #setState(state: number): void {
    Atomics.compareExchange(this.#header, STATE, STATE_OPEN, state);
    Atomics.notify(this.#header, WRITTEN);
  }

  // ---- worker side ----

  /**
   * Blocks until at least one byte is available and returns up to `max`
   * bytes, or returns undefined at the end of the body. Throws
   * RequestCancelled if the front aborted the body or `control` was cancelled.
   */
  readSync(max: number, control?: RequestControl): Uint8Array | undefined {
    for (;;) {
      const available = this.#available();
      if (available > 0) return this.#take(Math.min(available, max));

      const state = Atomics.load(this.#header, STATE);
      if (state === STATE_END) {
        // The writer stores its last bytes before the end mark: look once more.
        if (this.#available() > 0) continue;
        return undefined;
      }
      if (state === STATE_ABORTED || control?.cancelled) {
        throw new RequestCancelled("the client stopped sending the request body");
      }
      const written = Atomics.load(this.#header, WRITTEN);
      if (((written - Atomics.load(this.#header, READ)) | 0) === 0) {
        Atomics.wait(this.#header, WRITTEN, written, WAIT_SLICE_MS);
      }
    }
  }

  #take(count: number): Uint8Array {
    const read = Atomics.load(this.#header, READ);
    const start = (read >>> 0) & (this.#capacity - 1);
    const out = new Uint8Array(count);
    const first = Math.min(count, this.#capacity - start);
    out.set(this.#data.subarray(start, start + first));
    if (first < count) out.set(this.#data.subarray(0, count - first), first);
    Atomics.store(this.#header, READ, (read + count) | 0);
    Atomics.notify(this.#header, READ);
    return out;
  }
}
