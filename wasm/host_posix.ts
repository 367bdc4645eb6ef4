/**
 * POSIX services that Pyodide's browser build lacks, backed by the host: the
 * `_wsgirun_posix` module that wasm/python/fcntl.py and resource.py use.
 *
 * File locks are real host locks (`flock(2)` through `Deno.FsFile.lock`), so
 * they exclude other isolates, daemon processes and host programs that lock
 * the same file. Emscripten's own `flock` succeeds without locking anything.
 */

import { fstatSync } from "node:fs";
import { blockedDuring } from "./channel.ts";

/** The parts of Emscripten's file system this module uses. */
export interface EmscriptenFs {
  getStream(fd: number): EmscriptenStream | null;
  close(stream: EmscriptenStream): void;
  filesystems: { NODEFS: unknown };
}

export interface EmscriptenStream {
  path: string;
  flags: number;
  /** The host file descriptor (node:fs) of a file on a host mount. */
  nfd?: number;
  node: { mount: { type: unknown; mountpoint: string; opts: { root?: string } } };
}

/** Result codes of `lock` and `unlock`, which fcntl.py turns into exceptions. */
const LOCKED = 0;
const WOULD_BLOCK = 1;
const BAD_DESCRIPTOR = 2;

/** Marks Emscripten's `FS.close` as already wrapped, so a second install does not wrap it twice. */
const CLOSE_HOOK = Symbol.for("wsgirun.closeHook");

/** Flags of an open file that F_SETFL may change (O_APPEND and O_NONBLOCK), as in Linux. */
const SETTABLE_FLAGS = 0o2000 | 0o4000;

type CloseHook = (stream: EmscriptenStream) => void;

/** Maps a path inside the isolate to the host file behind it, or undefined for in-memory files. */
export function hostPathOf(fs: EmscriptenFs, stream: EmscriptenStream): string | undefined {
  const mount = stream.node?.mount;
  if (!mount || mount.type !== fs.filesystems.NODEFS || !mount.opts.root) return undefined;
  return mount.opts.root + stream.path.slice(mount.mountpoint.length);
}

/**
 * Returns the host path of the file open as `fd` while that path still leads
 * to the same file, else undefined: for a file in memory, and for one that
 * was renamed or replaced after the application opened it. The front opens
 * the file again by this path to send it.
 *
 * NOTE: a replacement between this check and the front's open still goes out
 * as the new file, or as a short body when the new file is smaller.
 */
export function openFileHostPath(fs: EmscriptenFs, fd: number): string | undefined {
  const stream = fs.getStream(fd);
  if (!stream || stream.nfd === undefined) return undefined;
  const path = hostPathOf(fs, stream);
  if (path === undefined) return undefined;
  try {
    const opened = fstatSync(stream.nfd);
    const current = Deno.statSync(path);
    return opened.ino === current.ino && opened.dev === current.dev ? path : undefined;
  } catch {
    // Removed since it was opened, or not readable by path.
    return undefined;
  }
}

/** The `_wsgirun_posix` module of one isolate. */
export class PosixModule {
  #fs: EmscriptenFs;
  #memoryBytes: () => number;
  #memoryMaxBytes: number;
  /** Host files that hold the lock of each open Emscripten file. */
  #locks = new Map<EmscriptenStream, Deno.FsFile>();

  /** `memoryMaxBytes` is the memory cap of the isolate, or 0 for the 4 GiB of wasm32. */
  constructor(fs: EmscriptenFs, memoryBytes: () => number, memoryMaxBytes = 0) {
    this.#fs = fs;
    this.#memoryBytes = memoryBytes;
    this.#memoryMaxBytes = memoryMaxBytes;
    this.#hookClose();
  }

  /**
   * Locks the file open as `fd`, shared or exclusive, and returns LOCKED,
   * WOULD_BLOCK (only when `blocking` is false) or BAD_DESCRIPTOR. A file
   * that lives only in the isolate's memory cannot be seen by anybody else,
   * so locking it always succeeds.
   */
  lock(fd: number, exclusive: boolean, blocking: boolean): number {
    const stream = this.#fs.getStream(fd);
    if (!stream) return BAD_DESCRIPTOR;
    const path = hostPathOf(this.#fs, stream);
    if (path === undefined) return LOCKED;

    const held = this.#locks.get(stream);
    const file = held ?? Deno.openSync(path, { read: true });
    // flock(2) converts a lock that the file already holds, so a second call changes its mode.
    if (blocking) {
      // Only a lock that has to wait for another holder counts as blocked.
      if (!file.tryLockSync(exclusive)) blockedDuring(() => file.lockSync(exclusive));
    } else if (!file.tryLockSync(exclusive)) {
      if (!held) file.close();
      return WOULD_BLOCK;
    }
    this.#locks.set(stream, file);
    return LOCKED;
  }

  /** Releases the lock of `fd`; returns LOCKED (success) or BAD_DESCRIPTOR. */
  unlock(fd: number): number {
    const stream = this.#fs.getStream(fd);
    if (!stream) return BAD_DESCRIPTOR;
    this.#release(stream);
    return LOCKED;
  }

  /** Returns the status flags of `fd` (F_GETFL), or -1 for a closed descriptor. */
  get_flags(fd: number): number {
    return this.#fs.getStream(fd)?.flags ?? -1;
  }

  /** Sets O_APPEND and O_NONBLOCK of `fd` (F_SETFL); returns 0, or -1 for a closed descriptor. */
  set_flags(fd: number, flags: number): number {
    const stream = this.#fs.getStream(fd);
    if (!stream) return -1;
    stream.flags = (stream.flags & ~SETTABLE_FLAGS) | (flags & SETTABLE_FLAGS);
    return 0;
  }

  /** Current size of the isolate's WebAssembly memory in bytes. */
  memory_bytes(): number {
    return this.#memoryBytes();
  }

  /** Bytes the isolate's WebAssembly memory may grow to. */
  memory_max_bytes(): number {
    return this.#memoryMaxBytes || 4 * 1024 ** 3;
  }

  #release(stream: EmscriptenStream): void {
    const file = this.#locks.get(stream);
    if (!file) return;
    this.#locks.delete(stream);
    // Closing the host file releases its lock.
    file.close();
  }

  /** Releases a file's lock when Python closes it, as closing a file does in POSIX. */
  #hookClose(): void {
    const fs = this.#fs as EmscriptenFs & { [CLOSE_HOOK]?: { current: CloseHook } };
    const hook = fs[CLOSE_HOOK];
    const release: CloseHook = (stream) => this.#release(stream);
    if (hook) {
      hook.current = release;
      return;
    }
    const slot = { current: release };
    fs[CLOSE_HOOK] = slot;
    const close = fs.close.bind(fs);
    fs.close = (stream: EmscriptenStream) => {
      slot.current(stream);
      close(stream);
    };
  }
}
