/**
 * Touch to reload: notices when the modification time of an application's
 * script file changes, as mod_wsgi does for its script files. For an
 * application given as package.module:callable, the module's file is the
 * one watched.
 */

import type { AppSpec } from "./app_spec.ts";

/**
 * Returns the file whose changes reload `app`. That is its script, or for
 * the module form the first file that Python's import would find along
 * `app.pythonPath` and then in the working folder (a daemon group's `home`).
 * For `a.b` it looks for `a/b/__init__.py` before `a/b.py`, because a package
 * comes before a module of the same name. Returns undefined when there is
 * none, such as for a module of the standard library.
 */
export function reloadFile(app: AppSpec): string | undefined {
  if (app.scriptPath !== undefined) return app.scriptPath;
  if (app.module === undefined) return undefined;
  const relative = app.module.split(".").join("/");
  const folders = app.home === undefined ? app.pythonPath : [...app.pythonPath, app.home];
  for (const folder of folders) {
    for (const candidate of [`${folder}/${relative}/__init__.py`, `${folder}/${relative}.py`]) {
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

/** Returns the reload reason for a change of reloadFile(app), for the log. */
export function changeReason(app: AppSpec): string {
  return app.scriptPath !== undefined ? "the script file changed" : "the module file changed";
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}
