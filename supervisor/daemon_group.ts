/**
 * A daemon process group as the front supervises it: the arbiter that keeps
 * `processes` daemon processes running and routes the group's requests to
 * them.
 *
 * Requests wait in the group's queue until a ready process has room. When a
 * process dies, only the requests handed to its isolates fail (502), and the
 * ones it had not started go back to the queue for another process. Each
 * lifecycle step has its own method, run from events and from a periodic
 * tick in a fixed order:
 * - spawn: start one process (with growing delays after crashes)
 * - reap: handle a process's exit: requeue, fail, count, back off
 * - murder: kill processes past startup-timeout or graceful-timeout
 * - recycle: replace processes past maximum-requests or restart-interval
 * - manage: start missing processes and retire replaced ones once their
 *   replacements are ready
 * - reload: replace every process (script touched, SIGHUP)
 * - stop: end every process (server shutdown)
 * A group whose processes fail to start MAX_FAILED_STARTS times in a row is
 * marked failed and answers 503, instead of restarting forever, until its
 * script changes or the server gets SIGHUP.
 */

import { type AppSpec, pinMountRoots } from "./app_spec.ts";
import type { AppBackend, BackendRequest, RequestHandle } from "./backend.ts";
import {
  buildDaemonLaunch,
  type DaemonCache,
  type DaemonIdentity,
  type DaemonLaunch,
  prepareDaemonCache,
  resolveIdentity,
  unreachableFolder,
  unwritablePaths,
} from "./daemon_command.ts";
import { type DaemonConfig, DaemonExit } from "./daemon_protocol.ts";
import { DaemonProcess, DaemonRequestHandle, type ProcessExit } from "./daemon_process.ts";
import { changeReason, reloadFile, ScriptWatcher } from "./script_watch.ts";
import type { DaemonGroupSpec } from "./daemon_spec.ts";
import { type Logger, type LogLevel, plural } from "./log.ts";
import { PoolUnavailableError } from "./pool.ts";
import { currentUmask } from "./isolate.ts";

export interface DaemonGroupOptions {
  /** Logger whose lines name the application and the group. */
  logger: Logger;
  logLevel: LogLevel;
  /** Requests that may wait in the group's queue before new ones get 503. */
  queueLimit: number;
}

/** Delays before restarting after the 1st, 2nd, ... crash in a row. */
const RESTART_DELAYS_MS = [100, 1000, 5000, 15000, 30000];
/** Failed starts in a row after which the group stops trying. */
const MAX_FAILED_STARTS = 3;
/** A process that ran this long before it crashed resets the restart delays. */
const STABLE_MS = 30_000;
/**
 * Shortest time between two WITHDRAW frames to one process. A process whose
 * waiting requests all run already gives nothing back, and is asked again
 * only after this.
 */
const WITHDRAW_INTERVAL_MS = 100;

/** Time a stopping process gets to exit after its input closes, before SIGKILL. */
const KILL_GRACE_MS = 2000;
const TICK_MS = 500;
/**
 * Requests a process may hold beyond its isolates. Measured with hello world,
 * processes=2, threads=1, wrk -t2 -c64 on two shared cores: 1 gave 2700
 * requests/s, 4 gave 3800, 8 gave 4250, and 16 or 32 gave no more.
 */
const PREFETCH_REQUESTS = 8;
/** Response bytes an isolate may have in flight before it waits for the client. */
const RESPONSE_WINDOW = 256 * 1024;

/**
 * Returns the replaced processes to retire now, when `keep` of them may go
 * on serving until fresh ones are ready: those still starting, and the
 * oldest of the ready ones. Under load, each fresh process can reach
 * maximum-requests before its own replacement is ready. Retiring the
 * newest ones instead would keep the oldest process serving without end.
 */
export function replacedToRetire<T extends { state: string; startedAt: number }>(
  replaced: readonly T[],
  keep: number,
): T[] {
  const ready = replaced.filter((p) => p.state === "ready").sort((a, b) =>
    b.startedAt - a.startedAt
  );
  const serving = new Set(ready.slice(0, keep));
  return replaced.filter((p) => !serving.has(p));
}

export class DaemonGroup implements AppBackend {
  readonly name: string;
  readonly spec: DaemonGroupSpec;
  readonly app: AppSpec;
  readonly identity: DaemonIdentity;
  #options: DaemonGroupOptions;
  #logger: Logger;
  #config: DaemonConfig;
  #processes = new Set<DaemonProcess>();
  #queue: DaemonRequestHandle[] = [];
  #serial = 0;
  #failedStarts = 0;
  #crashes = 0;
  #nextSpawnAt = 0;
  #spawnTimer: ReturnType<typeof setTimeout> | undefined;
  #tick: ReturnType<typeof setInterval> | undefined;
  /** Set when the group cannot serve at all; requests get 503 with it. */
  #failedReason: string | null = null;
  /** Set when a reload failed while older processes still serve: start no more until the next reload. */
  #holdReason: string | null = null;
  /**
   * The reason of a reload that waits for the fresh processes of the one
   * under way: stopping them for every change would let none of them become
   * ready while changes keep coming.
   */
  #pendingReload: string | null = null;
  #stopping = false;
  /** Set once the server is stopping: no process starts after that, for a reload, a recycle or a crash. */
  #reloadsStopped = false;
  #script: ScriptWatcher;
  #cache: DaemonCache | undefined;
  #firstReady = Promise.withResolvers<void>();

  /** @throws {DaemonConfigError} When the group's user cannot be used. */
  constructor(spec: DaemonGroupSpec, app: AppSpec, options: DaemonGroupOptions) {
    this.name = spec.name;
    this.spec = spec;
    this.app = app;
    this.#options = options;
    this.#logger = options.logger;
    this.#script = new ScriptWatcher(reloadFile(app), () => this.reload(changeReason(app)));
    this.identity = resolveIdentity(spec);
    this.#config = {
      group: spec.name,
      displayName: spec.displayName,
      app,
      logLevel: options.logLevel,
      threads: spec.threads,
      eagerSize: Math.max(2, Math.ceil(navigator.hardwareConcurrency / spec.processes)),
      queueLimit: this.#capacity,
      queueTimeoutMs: spec.queueTimeoutMs,
      requestTimeoutMs: spec.requestTimeoutMs,
      inactivityTimeoutMs: spec.inactivityTimeoutMs,
      memoryLimitBytes: spec.memoryLimitBytes,
      memoryMaxBytes: spec.memoryMaxBytes,
      startupTimeoutMs: spec.startupTimeoutMs,
      // Every isolate is its own interpreter, so one application object is
      // never called by two threads (wsgi.multithread stays False), while
      // several interpreters run side by side like processes.
      multiprocess: spec.processes * spec.threads > 1,
      responseWindow: RESPONSE_WINDOW,
      umask: currentUmask(),
    };
    this.#firstReady.promise.catch(() => {});
  }

  /**
   * Requests one process may hold: one per isolate, plus at least
   * PREFETCH_REQUESTS in its own queue. An isolate that finishes then starts
   * the next request without a round trip to the front, and frames travel in
   * batches. A process that dies hands back the requests it had not started.
   */
  get #capacity(): number {
    return this.spec.threads + Math.max(PREFETCH_REQUESTS, this.spec.threads);
  }

  async start(): Promise<void> {
    this.#cache = await prepareDaemonCache(this.identity);
    const blocked = await unreachableFolder(this.app, this.identity);
    if (blocked) {
      this.#logger.warning(
        `${this.identity.description} cannot enter ${blocked.folder} (mode ${
          blocked.mode.toString(8)
        }), ` +
          "so its daemon processes will likely fail to start: let that user enter the folders " +
          "of wsgirun and of the application (chmod o+x, or run from another folder)",
      );
    }
    const unwritable = await unwritablePaths(this.app, this.identity);
    for (const { path, mode } of unwritable.folders) {
      this.#logger.warning(
        `${this.identity.description} cannot write ${path} (mode ${mode.toString(8)}), ` +
          "so the application gets PermissionError for every write there although it is an " +
          "allow-write folder: give that user write access (chown or chmod)",
      );
    }
    for (const [folder, files] of unwritable.files) {
      const named = files.slice(0, 3).map(({ path, mode, owner }) =>
        `${path.slice(folder.length + 1)} (mode ${mode.toString(8)}, owner uid ${owner})`
      ).join(", ");
      const more = files.length > 3 ? ` and ${files.length - 3} more` : "";
      this.#logger.warning(
        `${this.identity.description} cannot write ${plural(files.length, "file")} in the ` +
          `allow-write folder ${folder}: ${named}${more}. Writes to them fail (SQLite reports ` +
          "'attempt to write a readonly database'): give that user write access (chown or chmod)",
      );
    }
    if (Deno.build.standalone) {
      this.#logger.warning(
        "a compiled binary cannot narrow the Deno permissions of its daemon processes; " +
          "only their isolates are narrowed",
      );
    }
    await this.#script.start();
    this.#tick = setInterval(() => this.#maintain(), TICK_MS);
    this.#logger.info(
      `starting ${this.spec.processes} daemon process${this.spec.processes === 1 ? "" : "es"} ` +
        `as ${this.identity.description}, each with up to ${plural(this.spec.threads, "isolate")}`,
    );
    this.#manage();
    return this.#firstReady.promise;
  }

  submit(request: BackendRequest): RequestHandle {
    if (this.#failedReason) {
      throw new PoolUnavailableError(
        `group '${this.name}' is unavailable: ${this.#failedReason}`,
        30,
      );
    }
    if (this.#stopping) throw new PoolUnavailableError("the server is shutting down", 5);
    if (this.#queue.length >= this.#options.queueLimit && !this.#pickProcess()) {
      throw new PoolUnavailableError(
        `the queue of group '${this.name}' is full (${this.#options.queueLimit} waiting); ` +
          "raise --queue-limit, processes or threads",
        1,
      );
    }
    const handle = new DaemonRequestHandle(request, (cancelled) => this.#dequeue(cancelled));
    this.#queue.push(handle);
    this.#dispatch();
    return handle;
  }

  reload(reason: string): void {
    if (this.#stopping) return;
    if (this.#reloadsStopped) {
      this.#logger.info(`reload ignored (${reason}): the server is stopping`);
      return;
    }
    if (this.#freshStarting() && this.#failedStarts === 0 && !this.#failedReason) {
      if (this.#pendingReload === null) {
        this.#logger.info(
          `reload queued (${reason}): the fresh processes of the last reload or start are ` +
            "still starting, and the reload follows once they are ready",
        );
      }
      this.#pendingReload = reason;
      return;
    }
    this.#pendingReload = null;
    const current = [...this.#processes].filter((p) =>
      p.state === "starting" || p.state === "ready"
    );
    const serving = current.filter((p) => p.state === "ready").length;
    const starting = current.length - serving;
    // A process that is still starting has no requests, and #manage stops it at once.
    const finishing = serving > 0
      ? `, and ${plural(serving, "current process")} ${
        serving === 1 ? "finishes its" : "finish their"
      } requests within graceful-timeout (${this.spec.gracefulTimeoutMs / 1000} s)`
      : "";
    const stopping = starting > 0
      ? `; ${plural(starting, "process")} still starting ${starting === 1 ? "stops" : "stop"}`
      : "";
    this.#logger.info(
      `reloading: ${reason}; starting ${
        plural(this.spec.processes, "fresh process")
      }${finishing}${stopping}`,
    );
    this.#failedReason = null;
    this.#holdReason = null;
    this.#failedStarts = 0;
    this.#crashes = 0;
    this.#nextSpawnAt = 0;
    for (const process of current) process.replaced = true;
    this.#manage();
  }

  /** Whether a process that no reload has replaced yet is still starting. */
  #freshStarting(): boolean {
    return [...this.#processes].some((p) => !p.replaced && p.state === "starting");
  }

  /** Runs the queued reload once no fresh process is starting any more. */
  #runPendingReload(): void {
    if (this.#pendingReload === null || this.#freshStarting()) return;
    const reason = this.#pendingReload;
    this.#pendingReload = null;
    this.reload(reason);
  }

  stopReloads(): void {
    this.#reloadsStopped = true;
    this.#pendingReload = null;
    clearTimeout(this.#spawnTimer);
    // Processes of a reload under way that are not ready yet would never
    // serve, so they stop; the ones that serve go on until stop().
    for (const process of this.#processes) {
      if (process.state !== "starting") continue;
      process.stopReason = "was stopped before it was ready because the server is stopping";
      process.stopPlanned = true;
      process.closeInput();
    }
  }

  async stop(): Promise<void> {
    this.#stopping = true;
    clearInterval(this.#tick);
    clearTimeout(this.#spawnTimer);
    for (const handle of this.#queue.splice(0)) {
      handle.request.sink.fail(503, "the server is shutting down");
    }

    const processes = [...this.#processes];
    for (const process of processes) {
      process.stopReason = "was stopped because the server is shutting down";
      process.stopPlanned = true;
      process.runningFailStatus = 503;
      process.retire(0);
      process.closeInput();
    }
    const exited = Promise.all(processes.map((process) => process.exited));
    if (await settlesWithin(exited, KILL_GRACE_MS)) return;
    for (const process of processes) process.kill("SIGKILL");
    await settlesWithin(exited, KILL_GRACE_MS);
  }

  // ---------------------------------------------------------------------------
  // Routing

  #dispatch(): void {
    // A request past queue-timeout fails here rather than at the next tick.
    if (this.#queue.length > 0) this.#expireQueue();
    while (this.#queue.length > 0) {
      const process = this.#pickProcess();
      if (!process) return;
      const handle = this.#queue.shift()!;
      if (handle.cancelled) continue;
      process.dispatch(handle);
    }
    this.#rebalance();
  }

  /**
   * Moves requests that wait in a busy process to a process that has
   * nothing to do. A daemon process queues what it was handed and runs it in
   * turn, so without this a request could wait behind a long one while
   * another process is idle. The busy process gives back (RETURNED) up
   * to half of the difference, which the queue then dispatches again.
   */
  #rebalance(): void {
    if (this.#queue.length > 0 || this.#stopping) return;
    const now = performance.now();
    for (const idle of this.#processes) {
      if (idle.state !== "ready" || idle.outstanding > 0) continue;
      let busiest: DaemonProcess | undefined;
      for (const process of this.#processes) {
        if (process.state !== "ready" || process.outstanding < 2) continue;
        if (now - process.withdrawSentAt < WITHDRAW_INTERVAL_MS) continue;
        if (!busiest || process.outstanding > busiest.outstanding) busiest = process;
      }
      if (!busiest) return;
      busiest.withdraw(Math.floor(busiest.outstanding / 2));
    }
  }

  /** The ready process with room and the fewest requests, preferring ones not being replaced. */
  #pickProcess(): DaemonProcess | undefined {
    let best: DaemonProcess | undefined;
    for (const process of this.#processes) {
      if (process.state !== "ready" || process.outstanding >= this.#capacity) continue;
      if (
        !best || (best.replaced && !process.replaced) ||
        (best.replaced === process.replaced && process.outstanding < best.outstanding)
      ) {
        best = process;
      }
    }
    return best;
  }

  #dequeue(handle: DaemonRequestHandle): void {
    const index = this.#queue.indexOf(handle);
    if (index >= 0) this.#queue.splice(index, 1);
  }

  // ---------------------------------------------------------------------------
  // Lifecycle steps

  #spawn(): void {
    const serial = ++this.#serial;
    let process: DaemonProcess;
    let launch: DaemonLaunch | undefined;
    try {
      // The process mounts the folders' real paths as they are now, and its
      // permissions are fixed to them.
      const app = pinMountRoots(this.app);
      launch = buildDaemonLaunch(this.spec, app, this.identity, this.#cache!);
      process = new DaemonProcess({
        serial,
        launch,
        config: { ...this.#config, app },
        logger: this.#logger,
        onReady: (ready) => this.#onReady(ready),
        onExit: (exited, exit) => this.#reap(exited, exit),
        onRequestDone: (done) => this.#onRequestDone(done),
        onDraining: (draining) => this.#onDraining(draining),
        onReturned: (handle) => {
          if (this.#stopping) {
            // stop() has emptied the queue already, and no process takes more.
            handle.finish();
            handle.request.sink.fail(503, "the server is shutting down");
            return;
          }
          this.#requeue(handle);
          this.#dispatch();
        },
      });
    } catch (error) {
      // Deno names the program when the working folder is the part that cannot be entered.
      const hint = error instanceof Deno.errors.PermissionDenied && launch
        ? ` (${this.identity.description} must be able to run ${launch.command} and to enter its working folder ${launch.cwd})`
        : "";
      this.#logger.error(`failed to start a daemon process: ${error}${hint}`);
      this.#countFailedStart(`it could not be started: ${error}${hint}`);
      return;
    }
    this.#processes.add(process);
    process.logger.debug(`daemon process started (display name ${this.spec.displayName})`);
  }

  #onReady(process: DaemonProcess): void {
    const ms = Math.round(performance.now() - process.startedAt);
    process.logger.info(`daemon process ready in ${ms} ms`);
    this.#failedStarts = 0;
    this.#firstReady.resolve();
    this.#manage();
    this.#dispatch();
    this.#runPendingReload();
  }

  #onRequestDone(process: DaemonProcess): void {
    const maximum = this.spec.maximumRequests;
    if (
      maximum > 0 && process.served >= maximum && !process.replaced && process.state === "ready" &&
      !this.#reloadsStopped
    ) {
      this.#replace(process, `it served ${process.served} requests (maximum-requests ${maximum})`);
    }
    this.#dispatch();
  }

  /** Puts a request back into the queue in the order of its arrival. */
  #requeue(handle: DaemonRequestHandle): void {
    const later = this.#queue.findIndex((queued) => queued.queuedAt > handle.queuedAt);
    this.#queue.splice(later < 0 ? this.#queue.length : later, 0, handle);
  }

  /** A process drains after an outside SIGTERM; it returns its waiting requests itself. */
  #onDraining(process: DaemonProcess): void {
    process.retireDeadline = performance.now() + this.spec.gracefulTimeoutMs;
    this.#manage();
  }

  /** Handles a process's exit: its waiting requests go back to the queue, then the group recovers. */
  #reap(process: DaemonProcess, exit: ProcessExit): void {
    this.#processes.delete(process);
    const waiting = process.takeWaiting();
    const running = process.outstanding;
    const planned = process.replaced || process.stopPlanned ||
      (process.state === "retiring" && exit.code === 0 && !exit.signal);

    if (this.#stopping) {
      for (const handle of waiting) handle.request.sink.fail(503, "the server is shutting down");
      process.logger.info(`daemon process ${exit.reason}`);
      return;
    }
    // They go before the requests that arrived after them, not before all.
    for (const handle of waiting) this.#requeue(handle);
    this.#logExit(process, exit, running, waiting.length, planned);

    if (!planned && !this.#failedReason) this.#countCrash(process, exit);
    // A fresh process that failed to start may have loaded what the queued
    // reload is for, such as the fixed script: the reload runs at once.
    if (this.#pendingReload !== null && !process.replaced && process.readyAt === undefined) {
      const reason = this.#pendingReload;
      this.#pendingReload = null;
      this.reload(reason);
    }
    this.#manage();
    this.#dispatch();
  }

  #logExit(
    process: DaemonProcess,
    exit: ProcessExit,
    running: number,
    waiting: number,
    planned: boolean,
  ) {
    const parts = [
      `daemon process ${exit.reason} after serving ${plural(process.served, "request")}`,
    ];
    if (running > 0) {
      // Handed to an isolate means running or posted behind a running one.
      parts.push(
        `${plural(running, "request")} handed to its isolates ${
          running === 1 ? "fails" : "fail"
        } (502, or a response cut off where it had started)`,
      );
    }
    if (waiting > 0) {
      parts.push(
        `${plural(waiting, "request")} not yet running ${
          waiting === 1 ? "goes" : "go"
        } to another process`,
      );
    }
    const message = parts.join("; ");
    if (planned && running === 0) process.logger.info(message);
    else if (exit.signal === "SIGTERM" || planned) process.logger.warning(message);
    else process.logger.error(message);
  }

  #countCrash(process: DaemonProcess, exit: ProcessExit): void {
    if (exit.code === DaemonExit.REFUSED_ROOT && !exit.signal) {
      this.#markFailed(`a daemon process ${exit.reason}`);
      return;
    }
    if (process.readyAt === undefined || exit.bootFailure) {
      this.#countFailedStart(`the last one ${exit.reason}`);
      return;
    }
    const uptime = performance.now() - process.readyAt;
    this.#crashes = uptime > STABLE_MS ? 1 : this.#crashes + 1;
    this.#scheduleRestart();
  }

  #countFailedStart(reason: string): void {
    this.#failedStarts += 1;
    this.#crashes += 1;
    if (this.#failedStarts < MAX_FAILED_STARTS) {
      this.#scheduleRestart();
      return;
    }
    const summary = `${this.#failedStarts} daemon processes in a row failed to start; ${reason}`;
    const serving = [...this.#processes].filter((p) => p.state === "ready");
    if (serving.length === 0) {
      this.#markFailed(summary);
      return;
    }
    // A reload that fails leaves the processes started before it serving.
    // A process of the reload that was still starting may fail after the
    // first report; the reload has failed already, so it adds no line.
    if (this.#holdReason) return;
    this.#holdReason = summary;
    for (const process of serving) process.replaced = false;
    this.#logger.critical(
      `reload failed: ${summary}; ${plural(serving.length, "process")} started before the reload ${
        serving.length === 1 ? "keeps" : "keep"
      } serving. ` +
        "Fix the application, then touch its script or send SIGHUP to try again",
    );
  }

  #scheduleRestart(): void {
    if (this.#reloadsStopped) {
      this.#logger.info("not restarting the daemon process: the server is stopping");
      return;
    }
    const base = RESTART_DELAYS_MS[Math.min(this.#crashes - 1, RESTART_DELAYS_MS.length - 1)];
    // Up to 20% jitter, so that processes of several groups do not restart in step.
    const delay = Math.round(base * (1 + Math.random() * 0.2));
    this.#nextSpawnAt = performance.now() + delay;
    this.#logger.info(`restarting a daemon process in ${delay} ms`);
    // A process that could not be spawned leaves no exit to wake #manage().
    clearTimeout(this.#spawnTimer);
    this.#spawnTimer = setTimeout(() => this.#manage(), delay);
  }

  #markFailed(reason: string): void {
    // The other processes of a failing group fail too; the first failure is the one reported.
    if (this.#failedReason) return;
    this.#failedReason = reason;
    this.#logger.critical(
      `group marked failed: ${reason}. Requests get 503 until the script changes or the server gets SIGHUP`,
    );
    this.#firstReady.reject(new Error(`group '${this.name}' failed: ${reason}`));
    for (const handle of this.#queue.splice(0)) {
      handle.request.sink.fail(503, `group '${this.name}' is unavailable: ${reason}`);
    }
  }

  /** Marks a process for replacement; it keeps serving until a fresh one is ready. */
  #replace(process: DaemonProcess, why: string): void {
    process.replaced = true;
    process.logger.info(`replacing the daemon process: ${why}`);
    this.#manage();
  }

  /** Starts missing processes and retires replaced ones as fresh ones become ready. */
  #manage(): void {
    // Once the server stops, no process starts and none is retired for a reload.
    if (this.#stopping || this.#reloadsStopped) return;
    const all = [...this.#processes];
    const fresh = all.filter((p) => !p.replaced && (p.state === "starting" || p.state === "ready"));
    const freshReady = fresh.filter((p) => p.state === "ready").length;

    const replaced = all.filter((p) =>
      p.replaced && (p.state === "starting" || p.state === "ready")
    );
    const keep = Math.max(0, this.spec.processes - freshReady);
    for (const process of replacedToRetire(replaced, keep)) this.#retire(process);

    if (this.#failedReason || this.#holdReason) return;
    const missing = this.spec.processes - fresh.length;
    if (missing <= 0) return;
    const wait = this.#nextSpawnAt - performance.now();
    if (wait > 0) {
      clearTimeout(this.#spawnTimer);
      this.#spawnTimer = setTimeout(() => this.#manage(), wait);
      return;
    }
    for (let i = 0; i < missing; i++) this.#spawn();
  }

  #retire(process: DaemonProcess): void {
    const graceful = this.spec.gracefulTimeoutMs;
    // Only the process can tell which of its requests have started, and it logs how many it finishes.
    process.logger.info(
      process.outstanding > 0
        ? `retiring the daemon process (${
          plural(process.outstanding, "request")
        } sent to it): it finishes those that have started within graceful-timeout ` +
          `(${graceful / 1000} s) and gives back the others`
        : "retiring the daemon process",
    );
    process.retire(graceful);
  }

  /** Runs every TICK_MS: queue timeouts, overdue processes, recycling, script changes. */
  #maintain(): void {
    this.#expireQueue();
    this.#murder();
    this.#recycle();
    if (!this.#stopping && !this.#reloadsStopped) this.#script.check();
  }

  #expireQueue(): void {
    const timeout = this.spec.queueTimeoutMs;
    if (timeout <= 0) return;
    const now = performance.now();
    while (this.#queue.length > 0 && now - this.#queue[0].queuedAt >= timeout) {
      const handle = this.#queue.shift()!;
      if (handle.cancelled) continue;
      const readyCount = [...this.#processes].filter((p) => p.state === "ready").length;
      const state = readyCount === 0
        ? "; no daemon process was ready (the group is restarting)"
        : "";
      handle.request.sink.fail(
        503,
        `queue timed out: the request waited ${Math.round(now - handle.queuedAt)} ms in the ` +
          `queue of group '${this.name}' (queue-timeout ${timeout / 1000} s)${state}`,
      );
    }
  }

  /** Kills processes past startup-timeout, and retiring processes past graceful-timeout. */
  #murder(): void {
    const now = performance.now();
    for (const process of this.#processes) {
      if (process.killed) continue;
      if (
        process.state === "starting" && !process.replaced &&
        now - process.startedAt > this.spec.startupTimeoutMs
      ) {
        const seconds = this.spec.startupTimeoutMs / 1000;
        process.logger.error(
          `daemon process did not become ready within startup-timeout (${seconds} s); killing it`,
        );
        process.stopReason = `was killed: startup timed out after ${seconds} s`;
        process.kill("SIGKILL");
        continue;
      }
      if (this.#isHung(process, now)) continue;
      if (process.state === "retiring" && now > process.retireDeadline) {
        const seconds = this.spec.gracefulTimeoutMs / 1000;
        process.logger.warning(
          `daemon process still runs ${
            plural(process.outstanding, "request")
          } after graceful-timeout (${seconds} s); killing it`,
        );
        process.stopReason = `was killed after graceful-timeout (${seconds} s)`;
        process.stopPlanned = true;
        process.kill("SIGKILL");
      }
    }
  }

  /**
   * Pings a process that has requests but has sent nothing for half of
   * socket-timeout, and kills it when the other half passes without a
   * reply: it was stopped (SIGSTOP) or its main thread is blocked, so
   * neither its requests nor its own timeouts would ever end. Returns
   * whether it killed the process.
   */
  #isHung(process: DaemonProcess, now: number): boolean {
    const timeout = this.spec.socketTimeoutMs;
    if (timeout <= 0 || process.state === "starting" || process.outstanding === 0) return false;
    if (process.pingedAt === undefined) {
      if (now - process.heardAt >= timeout / 2) process.ping();
      return false;
    }
    if (now - process.pingedAt < timeout / 2) return false;
    const seconds = timeout / 1000;
    process.logger.error(
      `daemon process sent nothing for ${Math.round((now - process.heardAt) / 1000)} s ` +
        `and did not answer a ping (socket-timeout ${seconds} s) with ${
          plural(process.outstanding, "request")
        } outstanding; it is stopped or blocked, killing it`,
    );
    process.stopReason = `was killed: it stopped answering (socket-timeout ${seconds} s)`;
    process.kill("SIGKILL");
    return true;
  }

  #recycle(): void {
    const interval = this.spec.restartIntervalMs;
    if (interval <= 0) return;
    const now = performance.now();
    for (const process of this.#processes) {
      if (process.state !== "ready" || process.replaced || process.readyAt === undefined) continue;
      if (now - process.readyAt >= interval) {
        this.#replace(
          process,
          `it ran for ${Math.round((now - process.readyAt) / 1000)} s (restart-interval ${
            interval / 1000
          } s)`,
        );
      }
    }
  }
}

/** Resolves true when `promise` settles within `ms`, false otherwise. */
async function settlesWithin(promise: Promise<unknown>, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<false>((resolve) => (timer = setTimeout(resolve, ms, false)));
  try {
    return await Promise.race([promise.then(() => true, () => true), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
