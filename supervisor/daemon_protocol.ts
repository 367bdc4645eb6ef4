/**
 * The private channel between the front and one daemon process: the child's
 * standard input (front to daemon) and standard output (daemon to front)
 * carry length-prefixed frames that multiplex every request of the process.
 *
 * Frame layout, little-endian: type (u8), request id (u32), payload length
 * (u32), payload. Request id 0 is the process itself.
 *
 * Flow control keeps every buffer bounded. A request body flows front to
 * daemon only after the daemon reports that an isolate runs the request, and
 * at most BODY_WINDOW bytes go unacknowledged (BODY_CREDIT returns them). A
 * response flows daemon to front within the isolate's response window, and
 * CREDIT returns the bytes the client has taken.
 */

import type { AppSpec } from "./app_spec.ts";
import type { LogLevel } from "./log.ts";

/** First argument of a daemon process: the program re-entered as a daemon. */
export const DAEMON_SUBCOMMAND = "__wsgirun_daemon";

/** Exit statuses a daemon process uses to tell the front why it stopped. */
export const DaemonExit = {
  /** Stopped on request (standard input closed, or SIGTERM). */
  OK: 0,
  /** The command line or the configuration frame was invalid. */
  USAGE: 2,
  /** No isolate could start (Pyodide failed to load). */
  BOOT_FAILED: 3,
  /** The application failed to import at start (`--preload`). */
  APP_LOAD_FAILED: 4,
  /** The process found itself running as root and refused to serve. */
  REFUSED_ROOT: 5,
} as const;

/** Frame types; the first group goes front to daemon, the second daemon to front. */
export const Frame = {
  /** JSON DaemonConfig; the first frame a daemon receives. */
  CONFIGURE: 1,
  /** A new request: see encodeRequest. */
  REQUEST: 2,
  /** A piece of the request body. */
  BODY: 3,
  /** The request body is complete. */
  BODY_END: 4,
  /** The body stopped before its end; a one-byte payload is the StopCause's code. */
  BODY_ABORT: 5,
  /** u32: the client has taken this many more response bytes. */
  CREDIT: 6,
  /** The request is over (the client has gone); a one-byte payload is the StopCause's code. */
  CANCEL: 7,
  /**
   * The front retires the process (a reload or a recycle): it returns the
   * requests it has not started, finishes the others and exits.
   */
  DRAIN: 8,
  /**
   * u32: the front requests up to this many requests that have not started
   * back (RETURNED), for a process that has nothing to do.
   */
  WITHDRAW: 9,
  /** The front has received nothing for a while: reply with PONG. */
  PING: 10,

  /** JSON ReadyInfo: the process can serve. */
  READY: 20,
  /**
   * The request was handed to an isolate, which runs it now or right after
   * its current one. Its body may flow now, and if the process dies the
   * request fails instead of going to another process.
   */
  RUNNING: 21,
  /** Status and headers: see encodeStart. */
  START: 22,
  /** A piece of the response body. */
  RESPONSE_BODY: 23,
  /** The response is complete; a UTF-8 payload is the error that cut it short. */
  END: 24,
  /** u16 status, then a UTF-8 reason: the request failed before its response started. */
  FAIL: 25,
  /** u32: the daemon has taken this many more request body bytes. */
  BODY_CREDIT: 26,
  /** The daemon drains (SIGTERM or DRAIN): it finishes its running requests and takes no more. */
  DRAINING: 27,
  /** The daemon gives back a request it has not started (it drains, or WITHDRAW); send it elsewhere. */
  RETURNED: 28,
  /** The reply to PING: the process's main thread is alive. */
  PONG: 29,
  /** UTF-8: why the process cannot serve, sent just before it exits with a failure status. */
  FAILED: 30,
} as const;

/** Request body bytes the front may send before the daemon acknowledges them. */
export const BODY_WINDOW = 256 * 1024;

/** Error text of the END frame for a request that a daemon process dropped because its client left before it ran. */
export const DROPPED_BEFORE_RUN = "the client left before the request ran";
/** Largest piece of a body sent in one frame. */
export const MAX_BODY_FRAME = 64 * 1024;

const HEADER_BYTES = 9;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Settings the front sends a new daemon process in its CONFIGURE frame. */
export interface DaemonConfig {
  group: string;
  displayName: string;
  app: AppSpec;
  logLevel: LogLevel;
  threads: number;
  /** See PoolOptions.eagerSize: the group's processes share the CPU cores. */
  eagerSize: number;
  /** Requests the process's pool may hold beyond its running isolates. */
  queueLimit: number;
  queueTimeoutMs: number;
  requestTimeoutMs: number;
  inactivityTimeoutMs: number;
  /** See DaemonGroupSpec.memoryLimitBytes. */
  memoryLimitBytes: number;
  /** See DaemonGroupSpec.memoryMaxBytes. */
  memoryMaxBytes: number;
  startupTimeoutMs: number;
  /** Value of `wsgi.multiprocess` for the group's interpreters. */
  multiprocess: boolean;
  /** Response bytes an isolate may have in flight before it waits for the client. */
  responseWindow: number;
  /**
   * The front's umask, which the process inherits but may not read (its
   * Deno permissions do not include it); its isolates apply it.
   */
  umask?: number;
}

/** Contents of a daemon's READY frame. */
export interface ReadyInfo {
  pid: number;
}

/**
 * Payloads of this size or more are written without copying them into a
 * batch. MAX_BODY_FRAME pieces of a large body stay uncopied, while smaller
 * pieces of a body sent in many small reads share writes.
 */
const LARGE_PAYLOAD = 64 * 1024;
/** Size of a FrameWriter's batch buffer, which limits the frame bytes joined into one write. */
const BATCH_BYTES = 256 * 1024;

/** Encodes one frame. */
export function encodeFrame(
  type: number,
  id: number,
  payload?: Uint8Array,
): Uint8Array<ArrayBuffer> {
  const length = payload?.length ?? 0;
  const frame = new Uint8Array(HEADER_BYTES + length);
  const view = new DataView(frame.buffer);
  view.setUint8(0, type);
  view.setUint32(1, id, true);
  view.setUint32(5, length, true);
  if (payload) frame.set(payload, HEADER_BYTES);
  return frame;
}

export function encodeJson(value: unknown): Uint8Array {
  return encoder.encode(JSON.stringify(value));
}

export function decodeJson<T>(payload: Uint8Array): T {
  return JSON.parse(decoder.decode(payload)) as T;
}

export function encodeText(text: string): Uint8Array {
  return encoder.encode(text);
}

export function decodeText(payload: Uint8Array): string {
  return decoder.decode(payload);
}

export function encodeUint32(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value, true);
  return bytes;
}

export function decodeUint32(payload: Uint8Array): number {
  return new DataView(payload.buffer, payload.byteOffset, payload.byteLength).getUint32(0, true);
}

/** Ways a REQUEST frame carries its body. */
export const BodyMode = {
  /** The whole body follows the environ in the REQUEST frame. */
  WHOLE: 0,
  /** BODY frames follow once the daemon sends RUNNING. */
  STREAM: 1,
} as const;

export interface RequestPayload {
  /** The front's id of the request, which the daemon's log lines carry too. */
  requestId: string;
  method: string;
  environ: string;
  bodyMode: number;
  /** The whole body for BodyMode.WHOLE. */
  body: Uint8Array<ArrayBuffer>;
  /** Milliseconds the request waited in the front's queue, which count against queue-timeout. */
  waitedMs: number;
}

/**
 * REQUEST payload: body mode (u8), milliseconds waited in the front (u32),
 * request id length (u8), request id, method length (u8), method, environ
 * length (u32), environ, body.
 */
export function encodeRequest(
  requestId: string,
  method: string,
  environ: string,
  body: Uint8Array | null,
  waitedMs = 0,
): Uint8Array {
  const idBytes = encoder.encode(requestId);
  const methodBytes = encoder.encode(method);
  const environBytes = encoder.encode(environ);
  const bodyLength = body?.length ?? 0;
  const payload = new Uint8Array(
    11 + idBytes.length + methodBytes.length + environBytes.length + bodyLength,
  );
  const view = new DataView(payload.buffer);
  view.setUint8(0, body ? BodyMode.WHOLE : BodyMode.STREAM);
  view.setUint32(1, Math.min(Math.max(0, Math.round(waitedMs)), 0xffffffff), true);
  view.setUint8(5, idBytes.length);
  payload.set(idBytes, 6);
  let offset = 6 + idBytes.length;
  view.setUint8(offset, methodBytes.length);
  payload.set(methodBytes, offset + 1);
  offset += 1 + methodBytes.length;
  view.setUint32(offset, environBytes.length, true);
  offset += 4;
  payload.set(environBytes, offset);
  offset += environBytes.length;
  if (body) payload.set(body, offset);
  return payload;
}

export function decodeRequest(payload: Uint8Array<ArrayBuffer>): RequestPayload {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const bodyMode = view.getUint8(0);
  const waitedMs = view.getUint32(1, true);
  const idLength = view.getUint8(5);
  const requestId = decoder.decode(payload.subarray(6, 6 + idLength));
  let offset = 6 + idLength;
  const methodLength = view.getUint8(offset);
  const method = decoder.decode(payload.subarray(offset + 1, offset + 1 + methodLength));
  offset += 1 + methodLength;
  const environLength = view.getUint32(offset, true);
  offset += 4;
  const environ = decoder.decode(payload.subarray(offset, offset + environLength));
  // A copy of just the body: posting a view to a worker would clone the
  // whole read buffer the view points into.
  const body = payload.slice(offset + environLength);
  return { requestId, method, environ, bodyMode, body, waitedMs };
}

export interface StartPayload {
  status: number;
  headers: string[];
  complete: boolean;
  body: Uint8Array<ArrayBuffer>;
}

/** START payload: status (u16), complete (u8), headers JSON length (u32), headers JSON, body. */
export function encodeStart(
  status: number,
  headers: string[],
  complete: boolean,
  body?: Uint8Array,
): Uint8Array {
  const headerBytes = encoder.encode(JSON.stringify(headers));
  const bodyLength = body?.length ?? 0;
  const payload = new Uint8Array(7 + headerBytes.length + bodyLength);
  const view = new DataView(payload.buffer);
  view.setUint16(0, status, true);
  view.setUint8(2, complete ? 1 : 0);
  view.setUint32(3, headerBytes.length, true);
  payload.set(headerBytes, 7);
  if (body) payload.set(body, 7 + headerBytes.length);
  return payload;
}

export function decodeStart(payload: Uint8Array<ArrayBuffer>): StartPayload {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const headerLength = view.getUint32(3, true);
  return {
    status: view.getUint16(0, true),
    complete: view.getUint8(2) === 1,
    headers: JSON.parse(decoder.decode(payload.subarray(7, 7 + headerLength))) as string[],
    body: payload.subarray(7 + headerLength),
  };
}

export function encodeFail(status: number, reason: string): Uint8Array {
  const reasonBytes = encoder.encode(reason);
  const payload = new Uint8Array(2 + reasonBytes.length);
  new DataView(payload.buffer).setUint16(0, status, true);
  payload.set(reasonBytes, 2);
  return payload;
}

export function decodeFail(payload: Uint8Array): { status: number; reason: string } {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  return { status: view.getUint16(0, true), reason: decoder.decode(payload.subarray(2)) };
}

export type FrameHandler = (type: number, id: number, payload: Uint8Array<ArrayBuffer>) => void;

/**
 * The largest payload of a valid frame, with room to spare. A REQUEST frame
 * carries a body of up to 16 MiB (the largest --read-ahead) and its environ.
 * A START frame carries headers of up to 1 MiB and at most 4 MiB of body,
 * because the adapter sends larger bodies in pieces. The reader allocates a
 * payload whole, so a forged header cannot make the front allocate more.
 */
const MAX_PAYLOAD_BYTES = 32 * 1024 * 1024;
const FRAME_TYPES = new Set<number>(Object.values(Frame));

/** The frame types that the front sends, which only a daemon process reads. */
export const FRONT_FRAMES: ReadonlySet<number> = new Set(
  [...FRAME_TYPES].filter((type) => type < Frame.READY),
);

/** The frame types that a daemon process sends, which only the front reads. */
export const DAEMON_FRAMES: ReadonlySet<number> = new Set(
  [...FRAME_TYPES].filter((type) => type >= Frame.READY),
);

/** A frame header that no wsgirun process writes: the stream carries something else. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FrameError";
  }
}

/**
 * Reads frames from `stream` and calls `onFrame` for each, in order, until
 * the stream ends. A payload that arrived in one read is a view of that
 * read's buffer, which the stream never reuses.
 *
 * @throws {FrameError} A header has a type outside `types` (FRONT_FRAMES or
 *   DAEMON_FRAMES, the frames the other side sends) or an impossible length,
 *   for example because something else wrote to the daemon's standard output.
 */
export async function readFrames(
  stream: ReadableStream<Uint8Array<ArrayBuffer>>,
  types: ReadonlySet<number>,
  onFrame: FrameHandler,
): Promise<void> {
  const header = new Uint8Array(HEADER_BYTES);
  const headerView = new DataView(header.buffer);
  let headerFill = 0;
  let payload: Uint8Array<ArrayBuffer> | null = null;
  let payloadFill = 0;
  let type = 0;
  let id = 0;

  for await (const chunk of stream) {
    let offset = 0;
    while (offset < chunk.length) {
      if (payload === null) {
        const take = Math.min(HEADER_BYTES - headerFill, chunk.length - offset);
        header.set(chunk.subarray(offset, offset + take), headerFill);
        headerFill += take;
        offset += take;
        if (headerFill < HEADER_BYTES) break;

        headerFill = 0;
        type = headerView.getUint8(0);
        id = headerView.getUint32(1, true);
        const length = headerView.getUint32(5, true);
        if (!types.has(type) || length > MAX_PAYLOAD_BYTES) {
          throw new FrameError(`invalid frame header (type ${type}, ${length} bytes)`);
        }
        if (chunk.length - offset >= length) {
          // The whole payload is in this read: hand out a view, no copy.
          onFrame(type, id, chunk.subarray(offset, offset + length));
          offset += length;
          continue;
        }
        payload = new Uint8Array(length);
        payloadFill = 0;
      }
      const take = Math.min(payload.length - payloadFill, chunk.length - offset);
      payload.set(chunk.subarray(offset, offset + take), payloadFill);
      payloadFill += take;
      offset += take;
      if (payloadFill === payload.length) {
        const complete = payload;
        payload = null;
        onFrame(type, id, complete);
      }
    }
  }
}

/** A frame waiting in a FrameWriter. Its header is written into the batch buffer at flush time. */
interface PendingFrame {
  type: number;
  id: number;
  payload: Uint8Array | undefined;
}

/**
 * Writes frames to a stream, joining the frames of one event loop turn into
 * one write so that a busy channel makes few system calls.
 *
 * Headers and payloads below LARGE_PAYLOAD are copied into one batch buffer
 * that is reused after each write, so a body sent in many small pieces costs
 * one write per batch and leaves no garbage per frame. A larger payload goes
 * out as its own write, without a copy. Payloads must not change after send().
 */
export class FrameWriter {
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #pending: PendingFrame[] = [];
  #pendingBytes = 0;
  #batch = new Uint8Array(BATCH_BYTES);
  #batchView = new DataView(this.#batch.buffer);
  #batchFill = 0;
  #writing = false;
  #flushDone: Promise<void> = Promise.resolve();
  #closed = false;
  #onError: (error: unknown) => void;

  constructor(stream: WritableStream<Uint8Array>, onError: (error: unknown) => void) {
    this.#writer = stream.getWriter();
    this.#onError = onError;
  }

  /** Bytes waiting for the pipe. */
  get pendingBytes(): number {
    return this.#pendingBytes;
  }

  send(type: number, id: number, payload?: Uint8Array): void {
    if (this.#closed) return;
    this.#pending.push({ type, id, payload });
    this.#pendingBytes += HEADER_BYTES + (payload?.length ?? 0);
    if (!this.#writing) {
      this.#writing = true;
      this.#flushDone = Promise.resolve().then(() => this.#flush());
    }
  }

  /** Resolves once every frame sent so far is written, or the channel has failed. */
  async flushed(): Promise<void> {
    while (this.#writing) await this.#flushDone;
  }

  async #flush(): Promise<void> {
    try {
      while (this.#pending.length > 0 && !this.#closed) {
        const frames = this.#pending;
        this.#pending = [];
        this.#pendingBytes = 0;
        for (const frame of frames) await this.#writeFrame(frame);
        await this.#writeBatch();
      }
    } catch (error) {
      this.#closed = true;
      this.#pending = [];
      this.#pendingBytes = 0;
      this.#onError(error);
    } finally {
      this.#batchFill = 0;
      this.#writing = false;
    }
  }

  /** Adds a frame to the batch, and writes the batch first when the frame does not fit. */
  async #writeFrame({ type, id, payload }: PendingFrame): Promise<void> {
    const length = payload?.length ?? 0;
    const large = length >= LARGE_PAYLOAD;
    const copied = large ? HEADER_BYTES : HEADER_BYTES + length;
    if (this.#batchFill + copied > this.#batch.length) await this.#writeBatch();

    const view = this.#batchView;
    const offset = this.#batchFill;
    view.setUint8(offset, type);
    view.setUint32(offset + 1, id, true);
    view.setUint32(offset + 5, length, true);
    this.#batchFill += HEADER_BYTES;
    if (!payload) return;
    if (!large) {
      this.#batch.set(payload, this.#batchFill);
      this.#batchFill += length;
      return;
    }
    await this.#writeBatch();
    await this.#writer.write(payload);
  }

  /** Writes the batch and waits for the write, after which the buffer may be reused. */
  async #writeBatch(): Promise<void> {
    if (this.#batchFill === 0) return;
    const bytes = this.#batch.subarray(0, this.#batchFill);
    this.#batchFill = 0;
    await this.#writer.write(bytes);
  }

  /** Closes the stream after the frames already sent; later frames are dropped. */
  async close(): Promise<void> {
    if (this.#closed) return;
    while (this.#writing) await new Promise((resolve) => setTimeout(resolve, 1));
    this.#closed = true;
    try {
      await this.#writer.close();
    } catch {
      // The reader has already gone; nothing is left to close.
    }
  }
}
