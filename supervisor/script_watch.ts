/**
 * Touch to reload: notices when the modification time of an application's
 * script file changes, as mod_wsgi does for its script files.
 */

/** Polls a script file's modification time and calls `onChange` when it moved. */
export class ScriptWatcher {
  #path: string | undefined;
  #onChange: () => void;
  #mtime: number | undefined;
  #checking = false;

  /** `path` may be undefined (an application given as module:callable); nothing is watched then. */
  constructor(path: string | undefined, onChange: () => void) {
    this.#path = path;
    this.#onChange = onChange;
  }

  /** Records the current modification time as the one later checks compare with. */
  async start(): Promise<void> {
    this.#mtime = await this.#readMtime();
  }

  /** Calls `onChange` once if the modification time differs from the last one seen. */
  async check(): Promise<void> {
    if (this.#checking || !this.#path) return;
    this.#checking = true;
    try {
      const mtime = await this.#readMtime();
      // A script being replaced by an editor may be missing for a moment.
      if (mtime === undefined || mtime === this.#mtime) return;
      this.#mtime = mtime;
      this.#onChange();
    } finally {
      this.#checking = false;
    }
  }

  async #readMtime(): Promise<number | undefined> {
    if (!this.#path) return undefined;
    try {
      return (await Deno.stat(this.#path)).mtime?.getTime();
    } catch {
      return undefined;
    }
  }
}
