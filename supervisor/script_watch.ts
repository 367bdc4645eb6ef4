/**
 * Touch to reload: notices when the modification time of an application's
 * script file changes, as mod_wsgi does for its script files. For an
 * application given as package.module:callable, the module's file is the
 * one watched.
 */

import type { AppSpec } from "./app_spec.ts";

/**
 * Returns the file whose changes reload `app`: its script, or for the
 * module form the first file that Python's import would find for the module
 * along `app.pythonPath` (`a/b.py` or `a/b/__init__.py` for `a.b`).
 * Returns undefined when there is none, such as for a module of the
 * standard library.
 */
export function reloadFile(app: AppSpec): string | undefined {
  if (app.scriptPath !== undefined) return app.scriptPath;
  if (app.module === undefined) return undefined;
  const relative = app.module.split(".").join("/");
  for (const folder of app.pythonPath) {
    for (const candidate of [`${folder}/${relative}.py`, `${folder}/${relative}/__init__.py`]) {
      if (isFile(candidate)) return candidate;
    }
  }
  return undefined;
}

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

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}
