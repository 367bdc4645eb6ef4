/**
 * The front's handle on one daemon process: it starts the child, sends it
 * requests as frames, streams request bodies after the daemon reports that
 * an isolate runs them, and hands response frames to each request's sink.
 */

import {
  type BackendRequest,
  bodyFailureCause,
  bodyReadFailure,
  isBodyTimeout,
  type RequestHandle,
} from "./backend.ts";
import type { DaemonLaunch } from "./daemon_command.ts";
import {
  BODY_WINDOW,
  DAEMON_FRAMES,
  type DaemonConfig,
  DaemonExit,
  decodeFail,
  decodeStart,
  decodeText,
  decodeUint32,
  DROPPED_BEFORE_RUN,
  encodeJson,
  encodeRequest,
  encodeUint32,
  Frame,
  FrameError,
  FrameWriter,
  MAX_BODY_FRAME,
  readFrames,
} from "./daemon_protocol.ts";
import { type Logger, plural, writeOutput } from "./log.ts";
import { type StopCause, stopCauseCode } from "../wasm/channel.ts";
import { CLIENT_DISCONNECTED } from "../wasm/protocol.ts";

export type DaemonProcessState = "starting" | "ready" | "retiring" | "exited";

/**
 * Maximum response body bytes of one request that may wait for its client.
 * A process sends at most its response window (256 KiB) of chunks, and as
 * much again of a file, beyond what the client took. A START frame and one
 * chunk may each add up to 4 MiB, the adapter's largest message.
 */
const MAX_UNRELEASED_BYTES = 16 * 1024 * 1024;

/** Maximum length of a relayed line of a daemon process's standard error; longer ones are cut. */
const MAX_RELAYED_LINE = 64 * 1024;

/** The ids that a daemon process's own log lines carry. */
const DAEMON_LOG_IDS = new Set(["group", "pid", "isolate", "request"]);

/**
 * Returns whether `line` has the form of the daemon process's own log lines:
 * time, level and ids that name its group and pid, each id once, and no
 * control character, which the process's logger escapes in its messages.
 */
function isOwnLogLine(line: string, group: string, pid: number): boolean {
  // deno-lint-ignore no-control-regex
  if (/[\x00-\x08\x0a-\x1f\x7f]/.test(line)) return false;
  const match = /^\d{4}-\d\d-\d\dT[\d:.]+Z (?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \[([^\]]*)\] /
    .exec(line);
  if (!match) return false;
  const ids = new Map<string, string>();
  for (const pair of match[1].split(" ")) {
    const equals = pair.indexOf("=");
    const key = pair.slice(0, equals);
    if (equals < 0 || !DAEMON_LOG_IDS.has(key) || ids.has(key)) return false;
    ids.set(key, pair.slice(equals + 1));
  }
  return ids.get("group") === group && ids.get("pid") === String(pid);
}

/**
 * Copies a daemon process's standard error to the server's, line by line. A
 * line whose ids name the process's group and pid is one of its own log
 * lines and goes out unchanged. Any other text, such as a crash report of
 * Deno or a line that an application wrote to look like another group's,
 * becomes a WARNING line with the process's real ids.
 */
async function relayStandardError(
  stream: ReadableStream<Uint8Array>,
  group: string,
  pid: number,
  logger: Logger,
): Promise<void> {
  const relayPiece = (line: string) => {
    if (isOwnLogLine(line, group, pid)) writeOutput(Deno.stderr, line + "\n");
    else logger.warning(`daemon process wrote to standard error: ${line}`);
  };
  // A long line goes out in pieces, so that no log line grows without limit.
  const relay = (line: string) => {
    for (let offset = 0; offset === 0 || offset < line.length; offset += MAX_RELAYED_LINE) {
      relayPiece(line.slice(offset, offset + MAX_RELAYED_LINE));
    }
  };
  let pending = "";
  try {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      const lines = (pending + text).split("\n");
      pending = lines.pop()!;
      for (const line of lines) relay(line);
      // A line without end goes out in pieces too, so that it cannot fill the front's memory.
      while (pending.length > MAX_RELAYED_LINE) {
        relayPiece(pending.slice(0, MAX_RELAYED_LINE));
        pending = pending.slice(MAX_RELAYED_LINE);
      }
    }
  } catch {
    // The pipe broke with the process; what arrived is relayed below.
  }
  if (pending !== "") relay(pending);
}

/** The end of a daemon process, decoded from its exit status. */
export interface ProcessExit {
  code: number;
  signal: Deno.Signal | null;
  /** The cause in words, such as "was killed by signal SIGKILL". */
  reason: string;
  /** Whether the exit status means that the process could not start at all. */
  bootFailure: boolean;
}

export interface DaemonProcessOptions {
  /** Number of the process within its group, for log lines. */
  serial: number;
  launch: DaemonLaunch;
  config: DaemonConfig;
  logger: Logger;
  onReady(process: DaemonProcess): void;
  onExit(process: DaemonProcess, exit: ProcessExit): void;
  onRequestDone(process: DaemonProcess): void;
  /** The process announced that it drains after SIGTERM. */
  onDraining(process: DaemonProcess): void;
  /** The process gave back a request it did not start. */
  onReturned(handle: DaemonRequestHandle): void;
}

/**
 * Decodes a child's exit status into words, using the daemon's named exit
 * codes and the cause that the daemon sent in a FAILED frame, if any.
 */
export function describeExit(
  status: Deno.CommandStatus,
  killedByFront = false,
  failure?: string,
): ProcessExit {
  const { code, signal } = status;
  if (signal) {
    let hint = "";
    if (signal === "SIGKILL") {
      hint = killedByFront ? " (sent by wsgirun)" : " (kill -9, or the system ran out of memory)";
    }
    return { code, signal, reason: `was killed by signal ${signal}${hint}`, bootFailure: false };
  }
  switch (code) {
    case DaemonExit.BOOT_FAILED:
      return {
        code,
        signal,
        reason: `failed to start: ${failure ?? "no isolate could load Pyodide"} (exit code 3)`,
        bootFailure: true,
      };
    case DaemonExit.APP_LOAD_FAILED:
      return {
        code,
        signal,
        reason: `failed to start: ${failure ?? "the application failed to import"} (exit code 4)`,
        bootFailure: true,
      };
    case DaemonExit.REFUSED_ROOT:
      return { code, signal, reason: "refused to run as root (exit code 5)", bootFailure: true };
    case DaemonExit.USAGE:
      return {
        code,
        signal,
        reason: "rejected its configuration (exit code 2)",
        bootFailure: true,
      };
    default:
      return { code, signal, reason: `exited with code ${code}`, bootFailure: false };
  }
}

/**
 * One request routed to a daemon group: queued in the group, then sent to a
 * process, until its response ends.
 */
export class DaemonRequestHandle implements RequestHandle {
  readonly request: BackendRequest;
  readonly queuedAt = performance.now();
  process: DaemonProcess | null = null;
  /** Frame id on the current process. */
  id = 0;
  running = false;
  /** Whether the daemon sent the response's status and headers. */
  responseStarted = false;
  cancelled = false;
  finished = false;
  #onCancelQueued: (handle: DaemonRequestHandle) => void;
  #bodyReader: ReadableStreamDefaultReader<Uint8Array> | null = null;
  #bodyPumped = false;
  #bodyBytesInFlight = 0;
  #wakeBody: (() => void) | null = null;
  /** Response body bytes that the process sent and the client has not taken yet. */
  unreleasedBytes = 0;

  constructor(request: BackendRequest, onCancelQueued: (handle: DaemonRequestHandle) => void) {
    this.request = request;
    this.#onCancelQueued = onCancelQueued;
  }

  released(bytes: number): void {
    this.unreleasedBytes = Math.max(0, this.unreleasedBytes - bytes);
    if (this.process && !this.finished) {
      this.process.send(Frame.CREDIT, this.id, encodeUint32(bytes));
    }
  }

  cancel(cause: StopCause = "client"): void {
    if (this.finished || this.cancelled) return;
    this.cancelled = true;
    if (!this.process) {
      this.#onCancelQueued(this);
      return;
    }
    this.process.send(Frame.CANCEL, this.id, Uint8Array.of(stopCauseCode(cause)));
    this.#stopBody();
  }

  close(): void {
    this.#stopBody();
  }

  /** Whether the front has begun to read the client's body for a daemon process. */
  get bodyStarted(): boolean {
    return this.#bodyPumped;
  }

  /** Marks the request as handed to an isolate and starts streaming its body, if it has one. */
  markRunning(logger: Logger): void {
    // A request handed to one isolate and then moved to a free one is reported twice.
    if (this.running) return;
    this.running = true;
    const body = this.request.body;
    if (body instanceof ReadableStream && this.process) {
      this.#pumpBody(body, this.process, this.id, logger);
    }
  }

  bodyCredit(bytes: number): void {
    this.#bodyBytesInFlight -= bytes;
    this.#wake();
  }

  /** Ends the handle's work because the response has ended or the process is gone. */
  finish(): void {
    this.finished = true;
    this.#stopBody();
    // A request that never ran (a queue timeout in the process) has a body
    // that was never read. Cancelling it lets Deno end the connection at once.
    const body = this.request.body;
    if (!this.#bodyPumped && body instanceof ReadableStream) body.cancel().catch(() => {});
  }

  #wake(): void {
    const wake = this.#wakeBody;
    this.#wakeBody = null;
    wake?.();
  }

  #stopBody(): void {
    this.#bodyReader?.cancel().catch(() => {});
    this.#bodyReader = null;
    this.#wake();
  }

  #bodyStopped(process: DaemonProcess): boolean {
    return this.finished || this.cancelled || process.state === "exited" ||
      this.#bodyReader === null;
  }

  /**
   * Sends the client's body in frames, at most BODY_WINDOW bytes ahead of the daemon.
   *
   * NOTE: Deno 2.9.6's HTTP/1.1 server keeps reading a chunked request body
   * into one buffer when the handler reads slower than the client sends.
   * For every chunk the handler takes, it moves the whole unread rest of that
   * buffer (a 70 MB memmove per 16 KiB chunk was seen). A plain Deno.serve
   * handler that yields to a timer every 16 chunks falls to 3-7 MB/s the
   * same way. So a chunked upload in small pieces stays fast and
   * bounded only while the client is slower than this loop (measured: up to
   * about 100 MB/s with 16 KiB pieces on two cores). A faster client makes
   * the front's memory grow and the upload crawl. Bodies with a
   * Content-Length are read without this cost.
   */
  async #pumpBody(
    body: ReadableStream<Uint8Array>,
    process: DaemonProcess,
    id: number,
    logger: Logger,
  ) {
    const reader = body.getReader();
    this.#bodyReader = reader;
    this.#bodyPumped = true;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (this.#bodyStopped(process)) return;
        if (done) {
          process.send(Frame.BODY_END, id);
          return;
        }
        for (let offset = 0; offset < value.length; offset += MAX_BODY_FRAME) {
          const piece = value.subarray(offset, offset + MAX_BODY_FRAME);
          while (
            this.#bodyBytesInFlight > 0 && this.#bodyBytesInFlight + piece.length > BODY_WINDOW
          ) {
            await new Promise<void>((resolve) => (this.#wakeBody = resolve));
            if (this.#bodyStopped(process)) return;
          }
          this.#bodyBytesInFlight += piece.length;
          process.send(Frame.BODY, id, piece);
        }
      }
    } catch (error) {
      if (this.#bodyStopped(process)) return;
      if (this.request.sink.finished) {
        // See pumpBody in embedded_backend.ts.
        logger.debug(`request body read stopped after the response: ${error}`, {
          request: this.request.requestId,
        });
      } else if (!isBodyTimeout(error)) {
        logger.info(bodyReadFailure(error), { request: this.request.requestId });
      }
      process.send(Frame.BODY_ABORT, id, Uint8Array.of(stopCauseCode(bodyFailureCause(error))));
    }
  }
}

export class DaemonProcess {
  readonly serial: number;
  readonly pid: number;
  readonly startedAt = performance.now();
  readyAt: number | undefined;
  state: DaemonProcessState = "starting";
  /** Set when a newer process should take this one's place (reload or recycling). */
  replaced = false;
  /** Requests finished on this process. */
  served = 0;
  /** performance.now() by which a retiring process must have finished its requests. */
  retireDeadline = 0;
  /** Whether the front has sent SIGKILL. */
  killed = false;
  /** The cause the process sent in a FAILED frame before it exited. */
  failure: string | undefined;
  /** The front's reason for stopping the process on purpose, for the requests that fail with it. */
  stopReason: string | undefined;
  /** Whether that stop is part of normal operation (shutdown, reload, drain), not a failure. */
  stopPlanned = false;
  /** HTTP status of the requests still running when the process exits: 502 unless the server stops it. */
  runningFailStatus = 502;
  /** Resolves when the child has exited and its requests have been settled. */
  readonly exited: Promise<ProcessExit>;
  #child: Deno.ChildProcess;
  #writer: FrameWriter;
  #requests = new Map<number, DaemonRequestHandle>();
  #nextId = 1;
  #options: DaemonProcessOptions;
  #logger: Logger;

  /** Starts the child. Throws when the executable cannot be started at all. */
  constructor(options: DaemonProcessOptions) {
    this.serial = options.serial;
    this.#options = options;
    const { launch } = options;
    const command = new Deno.Command(launch.command, {
      args: launch.args,
      cwd: launch.cwd,
      env: launch.env,
      clearEnv: true,
      uid: launch.uid,
      gid: launch.gid,
      stdin: "piped",
      stdout: "piped",
      // The daemon's log lines reach the server's standard error through
      // relayStandardError, which checks whose they are.
      stderr: "piped",
      // Its own session: a terminal's Ctrl-C or a signal to the server's
      // process group reaches the front only, which stops the daemons in order.
      detached: true,
    });
    this.#child = command.spawn();
    this.pid = this.#child.pid;
    this.#logger = options.logger.child({ process: this.pid });
    this.#writer = new FrameWriter(this.#child.stdin, (error) => {
      this.#logger.debug(`channel to the daemon process closed: ${error}`);
    });
    this.#writer.send(Frame.CONFIGURE, 0, encodeJson(options.config));
    const frames = readFrames(this.#child.stdout, DAEMON_FRAMES, (type, id, payload) => {
      try {
        this.#receive(type, id, payload);
      } catch (error) {
        if (error instanceof FrameError) throw error;
        // A payload that does not decode comes from a process that cannot be trusted either.
        throw new FrameError(`invalid frame payload (type ${type}: ${error})`);
      }
    })
      .catch((error) => this.#onChannelError(error));
    const relayed = relayStandardError(
      this.#child.stderr,
      options.config.group,
      this.pid,
      this.#logger,
    );
    // The exit is logged after the process's last lines, such as a crash report.
    this.exited = Promise.all([this.#child.status, frames, relayed]).then(([status]) =>
      this.#onExit(status)
    );
  }

  /** Requests sent to this process that have not finished. */
  get outstanding(): number {
    return this.#requests.size;
  }

  get logger(): Logger {
    return this.#logger;
  }

  send(type: number, id: number, payload?: Uint8Array): void {
    this.#writer.send(type, id, payload);
  }

  /** Sends a request to the process. */
  dispatch(handle: DaemonRequestHandle): void {
    const id = this.#nextId++;
    handle.process = this;
    handle.id = id;
    this.#requests.set(id, handle);
    const { request } = handle;
    const whole = request.body instanceof ReadableStream ? null : request.body ?? new Uint8Array(0);
    this.send(
      Frame.REQUEST,
      id,
      encodeRequest(
        request.requestId,
        request.method,
        request.environ,
        whole,
        performance.now() - handle.queuedAt,
      ),
    );
  }

  /**
   * Stops giving the process new requests; it exits once its requests are
   * done, and is stopped if they take longer than `gracefulMs`.
   */
  retire(gracefulMs: number): void {
    if (this.state === "retiring" || this.state === "exited") return;
    this.state = "retiring";
    this.retireDeadline = performance.now() + gracefulMs;
    if (this.outstanding === 0) {
      this.closeInput();
      return;
    }
    // The requests it has not started come back (RETURNED) for a fresh process.
    this.send(Frame.DRAIN, 0);
  }

  /** performance.now() of the last frame from the process. */
  heardAt = performance.now();
  /** performance.now() of the PING that the process has not replied to yet. */
  pingedAt: number | undefined;

  /** PINGs sent that no PONG has matched yet. A PONG beyond them is a protocol error. */
  #unansweredPings = 0;

  /** Sends PING, which a live process replies to with PONG, to tell a silent process from a hung one. */
  ping(): void {
    this.pingedAt = performance.now();
    this.#unansweredPings += 1;
    this.send(Frame.PING, 0);
  }

  /** performance.now() of the last WITHDRAW sent to this process. */
  withdrawSentAt = -Infinity;

  /** Asks the process to give back up to `count` requests it has not started. */
  withdraw(count: number): void {
    this.withdrawSentAt = performance.now();
    this.send(Frame.WITHDRAW, 0, encodeUint32(count));
  }

  /** Closes the channel; the daemon stops when it reads the end of its input. */
  closeInput(): void {
    this.#writer.close();
  }

  /** Sends a signal; a process that has already exited is left alone. */
  kill(signal: Deno.Signal): void {
    if (signal === "SIGKILL") this.killed = true;
    try {
      this.#child.kill(signal);
    } catch {
      // The process has already exited; its exit is being handled.
    }
  }

  /** Takes back the requests that have not started running, for another process. */
  takeWaiting(): DaemonRequestHandle[] {
    const waiting: DaemonRequestHandle[] = [];
    for (const [id, handle] of this.#requests) {
      if (handle.running || handle.cancelled) continue;
      this.#requests.delete(id);
      handle.process = null;
      waiting.push(handle);
    }
    return waiting;
  }

  #receive(type: number, id: number, payload: Uint8Array<ArrayBuffer>): void {
    this.heardAt = performance.now();
    this.pingedAt = undefined;
    if (type === Frame.PONG) {
      // A flood of PONG frames would keep the front busy with nothing else.
      if (this.#unansweredPings === 0) {
        throw new FrameError("unexpected PONG frame (no PING was sent)");
      }
      this.#unansweredPings -= 1;
      return;
    }
    if (type === Frame.FAILED) {
      this.failure = decodeText(payload);
      return;
    }
    if (type === Frame.READY) {
      this.#onReady();
      return;
    }
    if (type === Frame.DRAINING) {
      this.#onDraining();
      return;
    }
    if (type === Frame.RETURNED) {
      this.#onReturned(id);
      return;
    }
    const handle = this.#requests.get(id);
    if (!handle) return;
    const sink = handle.request.sink;
    const requestId = handle.request.requestId;
    switch (type) {
      case Frame.RUNNING:
        handle.markRunning(this.#logger);
        return;
      case Frame.START: {
        const start = decodeStart(payload);
        handle.responseStarted = true;
        if (!start.complete) this.#countUnreleased(handle, start.body?.length ?? 0);
        sink.start({ type: "start", requestId, ...start });
        if (start.complete) this.#finish(id, handle);
        return;
      }
      case Frame.RESPONSE_BODY:
        this.#countUnreleased(handle, payload.length);
        sink.body(payload);
        return;
      case Frame.END: {
        const error = payload.length ? decodeText(payload) : undefined;
        this.#finish(id, handle);
        // A client that left before the response started is no failure of the process.
        if (handle.responseStarted || (handle.cancelled && error === CLIENT_DISCONNECTED)) {
          sink.end({ type: "end", requestId, error });
        } else if (handle.cancelled && error === DROPPED_BEFORE_RUN) {
          sink.abandon();
        } else {
          // The isolate failed before the application started its response.
          sink.fail(
            502,
            `daemon process ${this.pid}: ${error ?? "the response ended before it started"}`,
          );
        }
        return;
      }
      case Frame.FAIL: {
        const { status, reason } = decodeFail(payload);
        this.#finish(id, handle);
        sink.fail(status, `daemon process ${this.pid}: ${reason}`);
        return;
      }
      case Frame.BODY_CREDIT:
        handle.bodyCredit(decodeUint32(payload));
        return;
    }
  }

  /**
   * Counts response bytes that wait for the client. A process keeps within
   * its response window, so far more than that is a process that ignores
   * the window, which would fill the front's memory.
   */
  #countUnreleased(handle: DaemonRequestHandle, bytes: number): void {
    handle.unreleasedBytes += bytes;
    if (handle.unreleasedBytes > MAX_UNRELEASED_BYTES) {
      throw new FrameError(
        `oversized response body (${handle.unreleasedBytes} bytes that the client has not ` +
          "taken, far beyond the response window)",
      );
    }
  }

  #onReady(): void {
    if (this.state !== "starting") return;
    this.state = "ready";
    this.readyAt = performance.now();
    this.#options.onReady(this);
  }

  /**
   * Kills a process whose output is no longer a frame stream; nothing more
   * from it can be trusted. A channel that closes because the process
   * exited only needs a debug line.
   */
  #onChannelError(error: unknown): void {
    if (!(error instanceof FrameError)) {
      this.#logger.debug(`channel from the daemon process closed: ${error}`);
      return;
    }
    this.#logger.error(`daemon process wrote an ${error.message} to its channel; killing it`);
    this.stopReason = `was killed after it wrote an ${error.message}`;
    this.stopPlanned = false;
    this.kill("SIGKILL");
  }

  /**
   * The daemon gave back a request it did not start, which may have been
   * reported RUNNING while it waited behind another. Another process takes
   * it, unless the front already sent part of its body here.
   */
  #onReturned(id: number): void {
    const handle = this.#requests.get(id);
    if (!handle || handle.responseStarted) return;
    this.#requests.delete(id);
    handle.process = null;
    if (handle.bodyStarted) {
      const reason = `daemon process ${this.pid} stopped before it ran the request, ` +
        "and part of the request body had already gone to it";
      handle.finish();
      handle.request.sink.fail(502, reason);
      return;
    }
    handle.running = false;
    this.#options.onReturned(handle);
  }

  /** The daemon got SIGTERM from outside the front: send it nothing more, let it finish. */
  #onDraining(): void {
    if (this.state === "exited" || this.state === "retiring") return;
    // Only the process can tell which of its requests have started, and it logs how many it finishes.
    this.#logger.warning(
      `daemon process received SIGTERM (${plural(this.outstanding, "request")} sent to it): ` +
        "it finishes those that have started, gives back the others and stops",
    );
    this.stopReason = "stopped after SIGTERM";
    this.stopPlanned = true;
    this.state = "retiring";
    this.#options.onDraining(this);
  }

  #finish(id: number, handle: DaemonRequestHandle): void {
    this.#requests.delete(id);
    handle.finish();
    this.served += 1;
    if (this.state === "retiring" && this.outstanding === 0) this.closeInput();
    this.#options.onRequestDone(this);
  }

  /** Fails the requests that were running; the group requeues the others first. */
  #onExit(status: Deno.CommandStatus): ProcessExit {
    // A kill the front sent itself needs no guess at its cause.
    const exit = describeExit(status, this.killed, this.failure);
    if (this.stopReason) exit.reason = `${this.stopReason} (it ${exit.reason})`;
    this.state = "exited";
    this.#options.onExit(this, exit);
    for (const [id, handle] of this.#requests) {
      this.#requests.delete(id);
      handle.finish();
      handle.request.sink.fail(this.runningFailStatus, `daemon process ${this.pid} ${exit.reason}`);
    }
    return exit;
  }
}
