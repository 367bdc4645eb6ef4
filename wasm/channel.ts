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
/**
 * The ticket the request is assigned under, CLAIMED once the worker started
 * it, DONE once the worker has finished with it, or UNASSIGNED.
 */
const OWNER = 2;
const CONTROL_WORDS = 3;
const UNASSIGNED = 0;
const CLAIMED = -1;
const DONE = -2;

/** Indexes into a body ring's header words. */
const WRITTEN = 0; // total bytes written, modulo 2^32
const READ = 1; // total bytes read, modulo 2^32
const STATE = 2;
const READER_GONE = 3;
const RING_HEADER_BYTES = 16;

const STATE_OPEN = 0;
const STATE_END = 1;
/** The first of the aborted states: the state is STATE_ABORTED - 1 + the StopCause's code. */
const STATE_ABORTED = 2;

/** The reason the front stopped a request or its body. */
export type StopCause = "client" | "body-timeout" | "server-stop" | "bad-body" | "send-timeout";

const STOP_CAUSES: StopCause[] = [
  "client",
  "body-timeout",
  "server-stop",
  "bad-body",
  "send-timeout",
];

/** Messages for the application and the log when a request stops, by cause. */
const REQUEST_STOPPED: Record<StopCause, string> = {
  client: "the client closed the connection",
  "body-timeout": "the client sent no request body data within --body-timeout",
  "server-stop": "the server is stopping",
  "bad-body": "the client sent a malformed request body (invalid chunked transfer coding)",
  "send-timeout": "the client's socket took no more response bytes within --send-timeout",
};

/** Messages of the error that a read of `wsgi.input` raises when the body stops, by cause. */
const BODY_STOPPED: Record<StopCause, string> = {
  client: "the client stopped sending the request body",
  "body-timeout": REQUEST_STOPPED["body-timeout"],
  "server-stop": "the server is stopping and no longer reads the request body",
  "bad-body": REQUEST_STOPPED["bad-body"],
  "send-timeout": REQUEST_STOPPED["send-timeout"],
};

/** Returns the number that stands for `cause` in shared memory and frames (1 and up). */
export function stopCauseCode(cause: StopCause): number {
  return STOP_CAUSES.indexOf(cause) + 1;
}

/** Returns the cause that `code` stands for; an unknown code counts as "client". */
export function stopCauseOf(code: number): StopCause {
  return STOP_CAUSES[code - 1] ?? "client";
}

/** Returns the message that gives the reason a request stopped. */
export function stopText(cause: StopCause): string {
  return REQUEST_STOPPED[cause];
}

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

let lastTicket = 0;

/**
 * Returns a number that names one posting of a request to one isolate. A
 * request taken back and posted elsewhere gets a new ticket, so a worker that
 * finds the old posting later cannot start it.
 */
export function nextTicket(): number {
  lastTicket = lastTicket >= 0x7fffffff ? 1 : lastTicket + 1;
  return lastTicket;
}

/**
 * Per-request control words: a cancel flag set by the front, the count of
 * response bytes the worker has posted that the client has not taken yet, and
 * the owner word that decides which isolate starts the request.
 *
 * The words live either in a buffer of their own or in a slot of a
 * ControlTable that every isolate of a pool received at start. Only the
 * second kind can travel through an isolate's RequestInbox, because a
 * buffer can reach a worker only inside a posted message.
 */
export class RequestControl {
  readonly buffer: SharedArrayBuffer;
  /** The slot in `table`, or -1 for words in a buffer of their own. */
  readonly slot: number;
  #words: Int32Array;
  #table: ControlTable | null;
  #released = false;

  constructor(
    buffer = new SharedArrayBuffer(CONTROL_WORDS * 4),
    slot = -1,
    table: ControlTable | null = null,
  ) {
    this.buffer = buffer;
    this.slot = slot;
    this.#table = table;
    this.#words = new Int32Array(buffer, Math.max(slot, 0) * CONTROL_WORDS * 4, CONTROL_WORDS);
  }

  /** Pool side: assign the request under `ticket` before posting it to an isolate. */
  assign(ticket: number): void {
    Atomics.store(this.#words, OWNER, ticket);
  }

  /**
   * Pool side: take the request back from the posting under `ticket` if its
   * isolate has not started it. Returns whether it was taken back.
   */
  withdraw(ticket: number): boolean {
    return Atomics.compareExchange(this.#words, OWNER, ticket, UNASSIGNED) === ticket;
  }

  /** Worker side: start the request if it is still assigned under `ticket`. */
  claim(ticket: number): boolean {
    return Atomics.compareExchange(this.#words, OWNER, ticket, CLAIMED) === ticket;
  }

  /** Worker side: the request has finished here, so its slot may serve another request. */
  finish(): void {
    Atomics.store(this.#words, OWNER, DONE);
  }

  get cancelled(): boolean {
    return Atomics.load(this.#words, CANCELLED) !== 0;
  }

  /** The reason the request was cancelled, or undefined while it is not. */
  get cancelCause(): StopCause | undefined {
    const code = Atomics.load(this.#words, CANCELLED);
    return code === 0 ? undefined : stopCauseOf(code);
  }

  /**
   * Front side: mark the request cancelled and wake a worker blocked on the
   * window. The first cause stays: a client that leaves after its body timed
   * out does not change why the request stopped.
   */
  cancel(cause: StopCause = "client"): void {
    if (this.#released) return;
    Atomics.compareExchange(this.#words, CANCELLED, 0, stopCauseCode(cause));
    Atomics.notify(this.#words, RESPONSE_BYTES_IN_FLIGHT);
  }

  /** Front side: the client has taken `bytes` more of the response. */
  released(bytes: number): void {
    if (this.#released) return;
    Atomics.sub(this.#words, RESPONSE_BYTES_IN_FLIGHT, bytes);
    Atomics.notify(this.#words, RESPONSE_BYTES_IN_FLIGHT);
  }

  /**
   * Front side: the front is done with the request. Later calls to cancel()
   * and released() do nothing, so a table slot can go to another request
   * once the worker has finished with it too.
   */
  release(): void {
    if (this.#released) return;
    // A worker still running the request (an iterable's close() that sends
    // more) must not wait for window credit that will never come.
    if (Atomics.load(this.#words, OWNER) === CLAIMED) this.cancel();
    this.#released = true;
    this.#table?.returnSlot(this);
  }

  /** Front side: whether the worker can no longer touch these words. */
  get settled(): boolean {
    const owner = Atomics.load(this.#words, OWNER);
    return owner === UNASSIGNED || owner === DONE;
  }

  /** Front side: clear the words for the next request of a reused slot. */
  reset(): void {
    Atomics.store(this.#words, CANCELLED, 0);
    Atomics.store(this.#words, RESPONSE_BYTES_IN_FLIGHT, 0);
    Atomics.store(this.#words, OWNER, UNASSIGNED);
  }

  /**
   * Worker side: block until `bytes` more fit into `window` beside the bytes
   * in flight, then account for them before they are posted. A chunk larger
   * than the window goes once nothing else is in flight: waiting for room
   * that only its own delivery could make would never end. Throws
   * RequestCancelled once the front cancels, so Python's iteration stops and
   * `close()` still runs.
   */
  reserve(bytes: number, window: number): void {
    for (;;) {
      const cause = this.cancelCause;
      if (cause) throw new RequestCancelled(REQUEST_STOPPED[cause]);
      const inFlight = Atomics.load(this.#words, RESPONSE_BYTES_IN_FLIGHT);
      if (inFlight <= 0 || inFlight + bytes <= window) break;
      waitBlocked(this.#words, RESPONSE_BYTES_IN_FLIGHT, inFlight, WAIT_SLICE_MS);
    }
    Atomics.add(this.#words, RESPONSE_BYTES_IN_FLIGHT, bytes);
  }
}

/**
 * Worker side: a word that is 1 while the isolate's thread waits, in the
 * middle of a request, for something outside the interpreter: the client,
 * a socket, a file lock or a sleep. The pool reads it to tell requests that
 * block from requests that use the CPU, since only the former gain from
 * more isolates than cores.
 */
let blockedWord: Int32Array | null = null;

/** Worker side: sets the word that waitBlocked() keeps up to date. */
export function useBlockedWord(buffer: SharedArrayBuffer): void {
  blockedWord = new Int32Array(buffer);
}

/** Worker side: runs `wait`, a call that blocks the thread, with the blocked word set meanwhile. */
export function blockedDuring<T>(wait: () => T): T {
  if (blockedWord) Atomics.store(blockedWord, 0, 1);
  try {
    return wait();
  } finally {
    if (blockedWord) Atomics.store(blockedWord, 0, 0);
  }
}

/** Worker side: Atomics.wait, with the blocked word set meanwhile. */
export function waitBlocked(
  words: Int32Array,
  index: number,
  value: number,
  timeoutMs: number,
): void {
  if (blockedWord) Atomics.store(blockedWord, 0, 1);
  Atomics.wait(words, index, value, timeoutMs);
  if (blockedWord) Atomics.store(blockedWord, 0, 0);
}

/** Number of slots in a pool's ControlTable. Requests beyond it get control words of their own. */
export const CONTROL_TABLE_SLOTS = 1024;

/**
 * Control words for many requests in one buffer, shared with every isolate of
 * a pool at its start. A slot returns to use when the front has released its
 * request and the worker has finished with it (or never started it). A slot
 * whose worker died while running stays out of use for good, because the
 * dying thread might still write to it.
 */
export class ControlTable {
  readonly buffer: SharedArrayBuffer;
  #free: number[] = [];
  /** Slots the front has released, kept until their worker is done with them. */
  #returned: RequestControl[] = [];

  constructor(slots = CONTROL_TABLE_SLOTS) {
    this.buffer = new SharedArrayBuffer(slots * CONTROL_WORDS * 4);
    for (let slot = slots - 1; slot >= 0; slot--) this.#free.push(slot);
  }

  /** Returns control words in a free slot, or in a buffer of their own when every slot is taken. */
  allocate(): RequestControl {
    if (this.#free.length === 0) this.#collect();
    const slot = this.#free.pop();
    if (slot === undefined) return new RequestControl();
    const control = new RequestControl(this.buffer, slot, this);
    control.reset();
    return control;
  }

  /** Slots given out and not yet released by the front. */
  get inUse(): number {
    return this.buffer.byteLength / (CONTROL_WORDS * 4) - this.#free.length - this.#returned.length;
  }

  /** Keeps a released control until its worker is done with the slot. */
  returnSlot(control: RequestControl): void {
    this.#returned.push(control);
  }

  #collect(): void {
    const waiting: RequestControl[] = [];
    for (const control of this.#returned) {
      if (control.settled) this.#free.push(control.slot);
      else waiting.push(control);
    }
    this.#returned = waiting;
  }
}

/** Kinds of RequestInbox entries. */
const ENTRY_REQUEST = 1;
/** The next request of this isolate came as a posted message: return to the event loop for it. */
const ENTRY_MAIL = 2;

/** Indexes into an inbox's header words. */
const INBOX_WRITTEN = 0; // entries written, modulo 2^32
const INBOX_READ = 1; // entries read, modulo 2^32
const INBOX_HEADER_BYTES = 8;
/** Words at the start of an entry, by index: kind, ticket, control slot, then byte lengths. */
const ENTRY_KIND = 0;
const ENTRY_TICKET = 1;
const ENTRY_SLOT = 2;
/** Byte lengths of the request id, the method and the environ, in this order. */
const ENTRY_TEXT_LENGTHS = 3;
/** Byte length of the body, or -1 for none. */
const ENTRY_BODY_LENGTH = 6;
const ENTRY_WORDS = 7;

/** Number of entries in an inbox (a power of two). */
export const INBOX_ENTRIES = 16;
/** Bytes of one inbox entry. A request that does not fit travels as a posted message. */
export const INBOX_ENTRY_BYTES = 16 * 1024;

/** A request as it comes out of an inbox. */
export interface InboxRequest {
  ticket: number;
  controlSlot: number;
  requestId: string;
  method: string;
  environ: string;
  body: Uint8Array<ArrayBuffer> | null;
}

/**
 * A ring of requests from the pool to one isolate in shared memory.
 *
 * In CPU profiles of the front under wrk (Deno 2.9.6, 2 cores), posting a
 * message to a worker took 12 to 30 µs of the main thread per request, the
 * largest part of its JavaScript time on a hello-world request. Writing an
 * entry here and waking the worker takes about 10 µs, most of it the wake-up.
 *
 * The worker blocks on the ring between requests instead of in its event
 * loop. A request that needs a posted message (its body streams through a
 * ring of its own, or it does not fit an entry) is therefore announced here
 * by a mail entry, in order with the others.
 */
export class RequestInbox {
  readonly buffer: SharedArrayBuffer;
  /** The whole buffer as words: the header, then the words of each entry. */
  #words: Int32Array;
  #bytes: Uint8Array;
  #encoder = new TextEncoder();
  #decoder = new TextDecoder();

  constructor(
    buffer = new SharedArrayBuffer(INBOX_HEADER_BYTES + INBOX_ENTRIES * INBOX_ENTRY_BYTES),
  ) {
    this.buffer = buffer;
    this.#words = new Int32Array(buffer);
    this.#bytes = new Uint8Array(buffer, INBOX_HEADER_BYTES);
  }

  /** Returns the byte offset in #bytes of the entry at ring position `position`. */
  #entryStart(position: number): number {
    return ((position >>> 0) & (INBOX_ENTRIES - 1)) * INBOX_ENTRY_BYTES;
  }

  /** Returns the index in #words of the first word of the entry at byte offset `start`. */
  #entryWord(start: number): number {
    return (INBOX_HEADER_BYTES + start) / 4;
  }

  // ---- pool side ----

  /** Whether another entry fits now. */
  get hasRoom(): boolean {
    const used =
      (Atomics.load(this.#words, INBOX_WRITTEN) - Atomics.load(this.#words, INBOX_READ)) | 0;
    return used < INBOX_ENTRIES;
  }

  /**
   * Writes a request and wakes the worker. Returns false, writing nothing,
   * when the ring is full or the request does not fit an entry.
   */
  postRequest(request: InboxRequest): boolean {
    if (!this.hasRoom) return false;
    const written = Atomics.load(this.#words, INBOX_WRITTEN);
    const start = this.#entryStart(written);
    const word = this.#entryWord(start);
    const entry = this.#bytes.subarray(start, start + INBOX_ENTRY_BYTES);
    let offset = ENTRY_WORDS * 4;
    const texts = [request.requestId, request.method, request.environ];
    for (let i = 0; i < texts.length; i++) {
      const { read, written: count } = this.#encoder.encodeInto(texts[i], entry.subarray(offset));
      if (read !== texts[i].length) return false;
      this.#words[word + ENTRY_TEXT_LENGTHS + i] = count;
      offset += count;
    }
    const body = request.body ?? EMPTY;
    if (body.length > entry.length - offset) return false;
    entry.set(body, offset);
    this.#words[word + ENTRY_KIND] = ENTRY_REQUEST;
    this.#words[word + ENTRY_TICKET] = request.ticket;
    this.#words[word + ENTRY_SLOT] = request.controlSlot;
    this.#words[word + ENTRY_BODY_LENGTH] = request.body === null ? -1 : body.length;
    this.#publish(written);
    return true;
  }

  /** Tells the worker that its next request comes as a posted message. */
  postMail(): void {
    const written = Atomics.load(this.#words, INBOX_WRITTEN);
    this.#words[this.#entryWord(this.#entryStart(written)) + ENTRY_KIND] = ENTRY_MAIL;
    this.#publish(written);
  }

  #publish(written: number): void {
    Atomics.store(this.#words, INBOX_WRITTEN, (written + 1) | 0);
    Atomics.notify(this.#words, INBOX_WRITTEN);
  }

  // ---- worker side ----

  /**
   * Waits up to `timeoutMs` for the next entry. Returns the request, "mail"
   * when the next request is a posted message, or null when the time ran out.
   */
  take(timeoutMs: number): InboxRequest | "mail" | null {
    const read = Atomics.load(this.#words, INBOX_READ);
    let written = Atomics.load(this.#words, INBOX_WRITTEN);
    if (written === read) {
      Atomics.wait(this.#words, INBOX_WRITTEN, written, timeoutMs);
      written = Atomics.load(this.#words, INBOX_WRITTEN);
      if (written === read) return null;
    }
    const start = this.#entryStart(read);
    const word = this.#entryWord(start);
    let request: InboxRequest | "mail" = "mail";
    if (this.#words[word + ENTRY_KIND] === ENTRY_REQUEST) {
      // TextDecoder does not read shared memory, so each part is copied out first.
      let offset = start + ENTRY_WORDS * 4;
      const texts: string[] = [];
      for (let i = 0; i < 3; i++) {
        const length = this.#words[word + ENTRY_TEXT_LENGTHS + i];
        texts.push(this.#decoder.decode(this.#bytes.slice(offset, offset + length)));
        offset += length;
      }
      const bodyLength = this.#words[word + ENTRY_BODY_LENGTH];
      request = {
        ticket: this.#words[word + ENTRY_TICKET],
        controlSlot: this.#words[word + ENTRY_SLOT],
        requestId: texts[0],
        method: texts[1],
        environ: texts[2],
        body: bodyLength < 0 ? null : this.#bytes.slice(offset, offset + bodyLength),
      };
    }
    Atomics.store(this.#words, INBOX_READ, (read + 1) | 0);
    return request;
  }
}

const EMPTY = new Uint8Array(0);

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

  /** Marks the body as failed for `cause`; the reader raises. */
  abort(cause: StopCause = "client"): void {
    this.#setState(STATE_ABORTED - 1 + stopCauseCode(cause));
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
   * With `target`, the bytes land at its start and a view of them is
   * returned, valid until the next read into the same target.
   */
  readSync(max: number, control?: RequestControl, target?: Uint8Array): Uint8Array | undefined {
    for (;;) {
      const available = this.#available();
      if (available > 0) {
        const count = Math.min(available, max, target?.length ?? max);
        return this.#take(target ? target.subarray(0, count) : new Uint8Array(count));
      }

      const state = Atomics.load(this.#header, STATE);
      if (state === STATE_END) {
        // The writer stores its last bytes before the end mark: look once more.
        if (this.#available() > 0) continue;
        return undefined;
      }
      const cause = state >= STATE_ABORTED
        ? stopCauseOf(state - STATE_ABORTED + 1)
        : control?.cancelCause;
      if (cause) throw new RequestCancelled(BODY_STOPPED[cause]);
      const written = Atomics.load(this.#header, WRITTEN);
      if (((written - Atomics.load(this.#header, READ)) | 0) === 0) {
        waitBlocked(this.#header, WRITTEN, written, WAIT_SLICE_MS);
      }
    }
  }

  #take(out: Uint8Array): Uint8Array {
    const count = out.length;
    const read = Atomics.load(this.#header, READ);
    const start = (read >>> 0) & (this.#capacity - 1);
    const first = Math.min(count, this.#capacity - start);
    out.set(this.#data.subarray(start, start + first));
    if (first < count) out.set(this.#data.subarray(0, count - first), first);
    Atomics.store(this.#header, READ, (read + count) | 0);
    Atomics.notify(this.#header, READ);
    return out;
  }
}
