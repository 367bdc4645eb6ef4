/**
 * Entry of a daemon process: the same program started again by the front
 * with the DAEMON_SUBCOMMAND argument, usually as another user and with
 * narrowed Deno permissions.
 *
 * The process runs one isolate pool for its group's application. It reads
 * requests from standard input and writes responses to standard output
 * (see daemon_protocol.ts). Its log lines go to standard error, which
 * it shares with the front. It imports nothing of the front.
 *
 * Life cycle: read the CONFIGURE frame, refuse to run as root, start the
 * pool, send READY when the first isolate is ready (and, with preload, has
 * imported the application), and serve until standard input closes. The
 * front closes it once the process has no requests left; the process then
 * stops at once.
 *
 * Signals: the front starts daemons in their own session, so a terminal's
 * Ctrl-C or a signal to the server's process group reaches only the front.
 * SIGTERM sent to a daemon directly (an operator, or a service manager that
 * signals every process of the service) drains it: the process sends
 * DRAINING, takes no more requests, and exits once the ones it has are done.
 * SIGINT and SIGHUP are ignored, because the front decides when daemons
 * stop or reload. The front stops a process that overstays with SIGKILL.
 */

import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { ISOLATE_WORKER_URL } from "./worker_url.ts";
import {
  appReadPaths,
  openFileInside,
  PYODIDE_SPECIFIER,
  type PythonVersion,
  withMountRoots,
} from "./app_spec.ts";
import { type Job, type ResponseSink, useProcessUmask } from "./isolate.ts";
import { closeInspectorOnSigusr1, sigusr1Message } from "./inspector_guard.ts";
import { Logger, plural, tracebackSummary } from "./log.ts";
import { IsolatePool, PoolUnavailableError } from "./pool.ts";
import {
  BODY_WINDOW,
  BodyMode,
  DaemonConfig,
  DaemonExit,
  decodeJson,
  decodeRequest,
  decodeUint32,
  DROPPED_BEFORE_RUN,
  encodeFail,
  encodeJson,
  encodeStart,
  encodeText,
  encodeUint32,
  Frame,
  FrameWriter,
  FRONT_FRAMES,
  readFrames,
  type ReadyInfo,
} from "./daemon_protocol.ts";
import {
  BODY_RING_BYTES,
  BodyRing,
  type RequestControl,
  type StopCause as RequestStopCause,
  stopCauseOf,
} from "../wasm/channel.ts";
import {
  type EndMessage,
  type FileMessage,
  shortFileError,
  startBodyBytes,
  type StartMessage,
} from "../wasm/protocol.ts";

const FILE_PIECE = 64 * 1024;
/** Request body bytes the daemon acknowledges in one BODY_CREDIT frame, at most. */
const BODY_CREDIT_BATCH = BODY_WINDOW / 4;

/** The cause of a stop, as the main flow receives it. */
type StopCause = { kind: "input closed" } | { kind: "drained" } | { kind: "exit"; code: number };

/**
 * One request in this process: it feeds the request body into the isolate's
 * ring and turns the isolate's response into frames for the front.
 */
class DaemonRequest implements ResponseSink {
  readonly id: number;
  readonly job: Job;
  readonly control: RequestControl;
  readonly ring: BodyRing | null;
  #daemon: Daemon;
  #inbound: Uint8Array[] = [];
  #inboundEnd: "open" | "end" | "abort" = "open";
  /** The reason the body was aborted, from the BODY_ABORT frame. */
  #abortCause: RequestStopCause = "client";
  #pumping = false;
  /** Response bytes sent from the isolate's chunks that the client has not taken yet. */
  #chunkBytesInFlight = 0;
  /** Response bytes read from a file here that the client has not taken yet. */
  #fileBytesInFlight = 0;
  #wakeFileSender: (() => void) | null = null;
  /** Set while a wsgi.file_wrapper file is being sent; later messages wait for it. */
  #fileSending: Promise<void> | null = null;
  #finished = false;

  constructor(
    id: number,
    daemon: Daemon,
    frontRequestId: string,
    method: string,
    environ: string,
    body: Uint8Array<ArrayBuffer> | null,
  ) {
    this.id = id;
    this.#daemon = daemon;
    this.control = daemon.pool.newControl();
    this.ring = body === null ? BodyRing.create(BODY_RING_BYTES) : null;
    this.job = {
      // The front's id, so that its lines and this process's match, and the
      // pid of the process, which the front's lines about the request do not show.
      requestId: `${frontRequestId}@${Deno.pid}`,
      method,
      environ,
      body,
      bodyRing: this.ring,
      control: this.control,
      sink: this,
      onRunning: () => daemon.send(Frame.RUNNING, id),
    };
  }

  // ---- request body, front to isolate ----

  receiveBody(chunk: Uint8Array): void {
    this.#inbound.push(chunk);
    if (!this.#pumping) this.#pump();
  }

  endBody(ending: "end" | "abort", cause: RequestStopCause = "client"): void {
    this.#inboundEnd = ending;
    this.#abortCause = cause;
    if (!this.#pumping) this.#pump();
  }

  async #pump(): Promise<void> {
    const ring = this.ring;
    if (!ring) return;
    this.#pumping = true;
    let credit = 0;
    while (this.#inbound.length > 0) {
      const chunk = this.#inbound.shift()!;
      if (!(await ring.write(chunk))) {
        // The application finished without reading the whole body.
        this.#inbound = [];
        break;
      }
      credit += chunk.length;
      // Credit goes back in batches, and whenever no received bytes wait here,
      // so the front never waits for credit that this loop holds back.
      if (credit >= BODY_CREDIT_BATCH || this.#inbound.length === 0) {
        this.#daemon.send(Frame.BODY_CREDIT, this.id, encodeUint32(credit));
        credit = 0;
      }
    }
    if (credit > 0) this.#daemon.send(Frame.BODY_CREDIT, this.id, encodeUint32(credit));
    this.#pumping = false;
    if (this.#inbound.length > 0) return this.#pump();
    if (this.#inboundEnd === "end") ring.end();
    if (this.#inboundEnd === "abort") ring.abort(this.#abortCause);
  }

  // ---- response, isolate to front ----

  start(message: StartMessage): void {
    this.#whenFileSent(() => {
      this.#daemon.send(
        Frame.START,
        this.id,
        encodeStart(
          message.status,
          message.headers,
          message.complete === true,
          message.body === undefined ? undefined : startBodyBytes(message.body),
        ),
      );
      if (message.complete) this.#finish();
    });
  }

  body(chunk: Uint8Array): void {
    this.#whenFileSent(() => {
      this.#chunkBytesInFlight += chunk.length;
      this.#daemon.send(Frame.RESPONSE_BODY, this.id, chunk);
    });
  }

  file(message: FileMessage): void {
    this.#whenFileSent(() => {
      this.#fileSending = this.#sendFile(message).finally(() => (this.#fileSending = null));
    });
  }

  end(message: EndMessage): void {
    this.#whenFileSent(() => {
      this.#daemon.send(Frame.END, this.id, message.error ? encodeText(message.error) : undefined);
      this.#finish();
    });
  }

  fail(status: number, reason: string): void {
    this.#whenFileSent(() => {
      this.#daemon.send(Frame.FAIL, this.id, encodeFail(status, reason));
      this.#finish();
    });
  }

  /** Releases `bytes` of the response window, which the client has taken. */
  credit(bytes: number): void {
    const chunkShare = Math.min(bytes, this.#chunkBytesInFlight);
    this.#chunkBytesInFlight -= chunkShare;
    if (chunkShare > 0) this.control.released(chunkShare);
    this.#fileBytesInFlight -= bytes - chunkShare;
    const wake = this.#wakeFileSender;
    this.#wakeFileSender = null;
    wake?.();
  }

  /** Stops the application for `cause` (the client has gone), or drops the request if it has not run. */
  cancel(cause: RequestStopCause = "client"): void {
    this.control.cancel(cause);
    this.ring?.abort(cause);
    this.#wakeFileSender?.();
    this.#daemon.pool.abandon(this.job);
    if (!this.job.running) this.abandon();
  }

  abandon(): void {
    this.end({ type: "end", requestId: this.job.requestId, error: DROPPED_BEFORE_RUN });
  }

  #whenFileSent(action: () => void): void {
    if (this.#finished) return;
    if (this.#fileSending) {
      this.#fileSending.then(() => this.#whenFileSent(action));
      return;
    }
    action();
  }

  /**
   * Sends a file region that the application passed to wsgi.file_wrapper.
   * This process reads it with its own user and permissions, so a file the
   * application may not read never leaves through the front.
   */
  async #sendFile(message: FileMessage): Promise<void> {
    const app = this.#daemon.config.app;
    const folders = withMountRoots(app, appReadPaths(app));
    let file: Deno.FsFile | undefined;
    try {
      const opened = await openFileInside(message.path, folders);
      if (typeof opened === "string") {
        this.#abortResponse(opened);
        return;
      }
      file = opened;
      await file.seek(message.offset, Deno.SeekMode.Start);
      let remaining = message.length < 0 ? Infinity : message.length;
      const window = this.#daemon.config.responseWindow;
      while (remaining > 0 && !this.control.cancelled) {
        while (this.#fileBytesInFlight > window && !this.control.cancelled) {
          await new Promise<void>((resolve) => (this.#wakeFileSender = resolve));
        }
        const piece = new Uint8Array(Math.min(FILE_PIECE, remaining));
        const count = await file.read(piece);
        if (count === null || count === 0) break;
        remaining -= count;
        this.#fileBytesInFlight += count;
        this.#daemon.send(Frame.RESPONSE_BODY, this.id, piece.subarray(0, count));
      }
      if (remaining > 0 && remaining !== Infinity && !this.control.cancelled) {
        // The body falls short of its Content-Length, so it must end in error.
        this.#abortResponse(shortFileError(message.path, remaining));
      }
    } catch (error) {
      this.#abortResponse(`cannot send file '${message.path}': ${error}`);
    } finally {
      file?.close();
    }
  }

  #abortResponse(error: string): void {
    this.#daemon.logger.error(error, { request: this.job.requestId });
    this.#daemon.send(Frame.END, this.id, encodeText(error));
    this.#finish();
  }

  /** Ends the request here without a frame to the front, which takes it back (drain). */
  finishWithoutReply(): void {
    this.#finish();
  }

  #finish(): void {
    if (this.#finished) return;
    this.#finished = true;
    this.ring?.closeReader();
    this.control.release();
    this.#daemon.forget(this.id);
  }
}

/** The daemon process: its pool, its channel to the front and its requests. */
class Daemon {
  readonly config: DaemonConfig;
  readonly logger: Logger;
  readonly pool: IsolatePool;
  #writer: FrameWriter;
  #requests = new Map<number, DaemonRequest>();
  #stop: (cause: StopCause) => void;
  #readySent = false;
  #draining = false;

  constructor(config: DaemonConfig, writer: FrameWriter, stop: (cause: StopCause) => void) {
    this.config = config;
    this.#writer = writer;
    this.#stop = stop;
    this.logger = new Logger(config.logLevel, { group: config.group, pid: Deno.pid });
    this.pool = new IsolatePool(config.app, {
      size: config.threads,
      minSize: 1,
      eagerSize: config.eagerSize,
      idleTimeoutMs: config.inactivityTimeoutMs,
      memoryLimitBytes: config.memoryLimitBytes,
      memoryLimitSetting: "the group's memory-limit key",
      memoryMaxBytes: config.memoryMaxBytes,
      requestTimeoutMs: config.requestTimeoutMs,
      queueLimit: config.queueLimit,
      queueTimeoutMs: config.queueTimeoutMs,
      // The front kills a process that is not ready within startup-timeout.
      // The pool gives up on a stuck isolate before that, so that it can drop
      // an application snapshot that does not restore (see IsolatePool).
      startupTimeoutMs: Math.ceil(config.startupTimeoutMs * 0.75),
      responseWindow: config.responseWindow,
      multiprocess: config.multiprocess,
      logger: this.logger,
      onApplicationLoaded: (error) => this.#onApplicationLoaded(error),
    });
  }

  start(): void {
    this.pool.start().then(
      () => {
        if (!this.config.app.preload) this.#sendReady();
      },
      (error) => {
        const cause = `no isolate could start: ${error instanceof Error ? error.message : error}`;
        this.logger.critical(cause);
        this.#writer.send(Frame.FAILED, 0, encodeText(cause));
        this.#stop({ kind: "exit", code: DaemonExit.BOOT_FAILED });
      },
    );
  }

  #onApplicationLoaded(error: string | undefined): void {
    if (this.#readySent) return;
    if (error !== undefined) {
      // The isolate has logged the traceback, so this line names only the exception.
      const summary = tracebackSummary(error);
      this.#writer.send(
        Frame.FAILED,
        0,
        encodeText(`the application failed to import (${summary || error.split("\n")[0]})`),
      );
      this.logger.critical(
        `the application failed to import at start (${
          summary ? `${summary}; traceback above` : error
        }); ` +
          "the process exits",
      );
      this.#stop({ kind: "exit", code: DaemonExit.APP_LOAD_FAILED });
      return;
    }
    this.#sendReady();
  }

  #sendReady(): void {
    if (this.#readySent) return;
    this.#readySent = true;
    const info: ReadyInfo = { pid: Deno.pid };
    this.send(Frame.READY, 0, encodeJson(info));
  }

  send(type: number, id: number, payload?: Uint8Array): void {
    this.#writer.send(type, id, payload);
  }

  forget(id: number): void {
    this.#requests.delete(id);
  }

  onFrame(type: number, id: number, payload: Uint8Array<ArrayBuffer>): void {
    if (type === Frame.REQUEST) {
      this.#startRequest(id, payload);
      return;
    }
    if (type === Frame.DRAIN) {
      this.onDrainRequest?.();
      return;
    }
    if (type === Frame.PING) {
      this.send(Frame.PONG, 0);
      return;
    }
    if (type === Frame.WITHDRAW) {
      if (!this.#draining) this.#giveBack(this.pool.withdrawWaiting(decodeUint32(payload)));
      return;
    }
    const request = this.#requests.get(id);
    if (!request) return; // The request has finished; late credit or cancels are harmless.
    switch (type) {
      case Frame.BODY:
        request.receiveBody(payload);
        return;
      case Frame.BODY_END:
        request.endBody("end");
        return;
      case Frame.BODY_ABORT:
        request.endBody("abort", decodeStopCause(payload));
        return;
      case Frame.CREDIT:
        request.credit(decodeUint32(payload));
        return;
      case Frame.CANCEL:
        request.cancel(decodeStopCause(payload));
        return;
      default:
        this.logger.warning(`ignored a frame of unknown type ${type}`);
    }
  }

  #startRequest(id: number, payload: Uint8Array<ArrayBuffer>): void {
    if (this.#draining) {
      this.send(Frame.RETURNED, id);
      return;
    }
    const decoded = decodeRequest(payload);
    const body = decoded.bodyMode === BodyMode.WHOLE ? decoded.body : null;
    const request = new DaemonRequest(
      id,
      this,
      decoded.requestId,
      decoded.method,
      decoded.environ,
      body,
    );
    this.#requests.set(id, request);
    // Queue-timeout counts from the request's arrival at the front.
    request.job.queuedAt = performance.now() - decoded.waitedMs;
    try {
      this.pool.submit(request.job);
    } catch (error) {
      if (!(error instanceof PoolUnavailableError)) throw error;
      request.fail(503, error.message);
    }
  }

  /** Number of requests this process holds: running, or waiting in its pool. */
  get requestCount(): number {
    return this.#requests.size;
  }

  /** Stops the pool; requests still running fail with 503. */
  stop(): void {
    this.pool.stop();
  }

  /** Returns requests that have not started to the front (RETURNED), which sends them elsewhere. */
  #giveBack(jobs: Job[]): void {
    for (const job of jobs) {
      for (const [id, request] of this.#requests) {
        if (request.job !== job) continue;
        request.finishWithoutReply();
        this.send(Frame.RETURNED, id);
      }
    }
  }

  /** Called for the front's DRAIN frame. */
  onDrainRequest?: () => void;

  /**
   * Returns to the front (RETURNED) every request the pool has not started:
   * queued ones, ones posted behind a running request, and ones a failed
   * isolate gives back later. Sends DRAINING so that the front sends no
   * more, and resolves when the running ones are done. The front stops the
   * process if they take longer than its graceful-timeout.
   */
  async drain(cause: string): Promise<void> {
    this.#draining = true;
    const poolDrained = this.pool.drain(Number.MAX_SAFE_INTEGER, (jobs) => this.#giveBack(jobs));
    this.send(Frame.DRAINING, 0);
    this.logger.info(
      `${cause}: finishing ${plural(this.#requests.size, "running request")}, then stopping`,
    );
    await poolDrained;
    while (this.#requests.size > 0) await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * Standard output as a stream of synchronous writes. An asynchronous write
 * to standard output goes through Deno's thread pool, which delayed small
 * frames by milliseconds on a busy two-core machine. The front reads the
 * pipe continuously, so a synchronous write blocks only while a large frame
 * drains.
 */
function synchronousStdout(): WritableStream<Uint8Array> {
  return new WritableStream<Uint8Array>({
    write(bytes) {
      let offset = 0;
      while (offset < bytes.length) offset += Deno.stdout.writeSync(bytes.subarray(offset));
    },
  });
}

/**
 * Ignores the signals the front handles for the whole server, which a
 * terminal or a service manager may send to every process of the group.
 */
function ignoreForwardedSignals(): void {
  const signals = ["SIGINT", "SIGHUP", "SIGUSR1", "SIGQUIT", "SIGTTIN", "SIGUSR2"] as const;
  for (const signal of signals) {
    Deno.addSignalListener(signal, () => {});
  }
}

/**
 * Returns why Pyodide's npm package cannot be found, or undefined when it can.
 * Without a node_modules folder the package comes from Deno's npm cache,
 * and a daemon running as another user has a cache of its own.
 */
function missingPyodide(python: PythonVersion): string | undefined {
  const specifier = PYODIDE_SPECIFIER[python];
  if (import.meta.resolve(specifier).startsWith("file:")) return undefined;
  const reason = `${specifier} is not in a node_modules folder or Deno cache this process can read`;
  if (!Deno.mainModule.startsWith("file:")) return reason;
  const entry = fileURLToPath(Deno.mainModule);
  const worker = fileURLToPath(ISOLATE_WORKER_URL);
  return `${reason}; put a deno.json that sets nodeModulesDir in ${dirname(entry)} or a ` +
    `folder above it, run \`deno install --entrypoint ${entry} ${worker}\` there, ` +
    "and let the group's user read that folder";
}

/** Reads the CONFIGURE frame, which the front sends before anything else. */
function readConfig(
  stream: ReadableStream<Uint8Array<ArrayBuffer>>,
  onFrame: (type: number, id: number, payload: Uint8Array<ArrayBuffer>) => void,
) {
  const { promise, resolve } = Promise.withResolvers<DaemonConfig | undefined>();
  let configured = false;
  const done = readFrames(stream, FRONT_FRAMES, (type, id, payload) => {
    if (configured) {
      onFrame(type, id, payload);
      return;
    }
    configured = true;
    resolve(type === Frame.CONFIGURE ? decodeJson<DaemonConfig>(payload) : undefined);
  }).finally(() => resolve(undefined));
  return { config: promise, done };
}

/** Reads the StopCause of a CANCEL or BODY_ABORT frame; one without a payload is "client". */
function decodeStopCause(payload: Uint8Array): RequestStopCause {
  return stopCauseOf(payload.length > 0 ? payload[0] : 1);
}

/** Runs the daemon process until its input closes or it has drained; returns the exit status. */
export async function runDaemon(): Promise<number> {
  ignoreForwardedSignals();
  const stopped = Promise.withResolvers<StopCause>();
  // The signal handler only records the signal; the main flow below acts on it.
  const terminated = Promise.withResolvers<void>();
  Deno.addSignalListener("SIGTERM", () => terminated.resolve());

  const writer = new FrameWriter(
    synchronousStdout(),
    () => stopped.resolve({ kind: "input closed" }),
  );
  // Frames after CONFIGURE go to the daemon, which exists once the configuration is checked.
  const receiver: { daemon?: Daemon } = {};
  const input = readConfig(
    Deno.stdin.readable,
    (type, id, payload) => receiver.daemon?.onFrame(type, id, payload),
  );
  input.done.then(() => stopped.resolve({ kind: "input closed" }));

  const config = await input.config;
  if (config?.umask !== undefined) useProcessUmask(config.umask);
  if (!config) {
    new Logger("info", { pid: Deno.pid }).critical(
      "daemon process received no configuration; it is started by wsgirun only",
    );
    return DaemonExit.USAGE;
  }
  const logger = new Logger(config.logLevel, { group: config.group, pid: Deno.pid });
  closeInspectorOnSigusr1((url, openMs) => logger.warning(sigusr1Message(url, openMs)));
  if (Deno.uid() === 0) {
    logger.critical(
      "daemon process stopped: it runs as root, which a daemon never does; give the group user=NAME",
    );
    return DaemonExit.REFUSED_ROOT;
  }

  const missing = missingPyodide(config.app.python);
  if (missing) {
    logger.critical(`cannot start: ${missing}`);
    writer.send(Frame.FAILED, 0, encodeText(missing));
    await writer.flushed();
    return DaemonExit.BOOT_FAILED;
  }

  const running = new Daemon(config, writer, (cause) => stopped.resolve(cause));
  receiver.daemon = running;
  running.start();
  logger.debug(`daemon process started for ${config.app.name}`);
  // SIGTERM from outside and the front's DRAIN frame end the process the same way.
  const drain = Promise.withResolvers<string>();
  terminated.promise.then(() => drain.resolve("SIGTERM"));
  running.onDrainRequest = () => drain.resolve("the front retires this process");
  drain.promise.then((cause) => running.drain(cause)).then(() =>
    stopped.resolve({ kind: "drained" })
  );

  const cause = await stopped.promise;
  // A drain that the front cut short (its graceful or shutdown timeout) ends here.
  if (cause.kind === "input closed" && running.requestCount > 0) {
    logger.warning(
      `the front closed the channel: stopping ${
        plural(running.requestCount, "unfinished request")
      }`,
    );
  }
  running.stop();
  // Frames may still wait in the writer's batch, such as the END of the last
  // requests of a drain or the FAILED frame that names an exit's cause.
  // Without them the front would fail requests that got their response.
  await writer.flushed();
  if (cause.kind === "exit") return cause.code;
  logger.debug(
    cause.kind === "drained" ? "stopping: drained" : "stopping: the front closed the channel",
  );
  return DaemonExit.OK;
}
