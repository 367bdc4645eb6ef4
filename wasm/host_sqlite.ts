/**
 * SQLite for Python in an isolate: the `_wsgirun_sqlite` module under the
 * DB-API module wasm/python/sqlite3/dbapi2.py.
 *
 * Databases are opened with Deno's built-in `node:sqlite` on the host file
 * behind the Python path. Unlike Pyodide's own sqlite3 build, whose file
 * locks do nothing, this SQLite locks the file for real, so several
 * isolates, daemon processes and host programs can share one database. The
 * calls are synchronous, so Python calls them directly without waiting on
 * another thread.
 *
 * Values cross as follows. Python passes parameters with a string of kinds
 * ("n" null, "i" integer, "I" integer as decimal text, "f" float, "s" text,
 * "b" bytes), because a JavaScript number would be bound as REAL. Rows come
 * back as one flat array plus fix-ups for the values that Pyodide would
 * convert wrongly: integer-valued REALs (they would become int), blobs, and
 * integers beyond 2^53.
 */

import {
  DatabaseSync,
  type SQLInputValue,
  type SQLOutputValue,
  type StatementSync,
} from "node:sqlite";
import type { EmscriptenFs } from "./host_posix.ts";
import type { LogFunction, PyBuffer } from "./host_socket.ts";

/** Result codes, the first element of every `execute` and `fetch` result. */
const ROWS = 0;
const DONE = 1;
const FAILED = -1;

/** Fix-up kinds that follow a value's index in the fix-up list. */
const FIX_FLOAT = 0;
const FIX_BLOB = 1;
const FIX_BIG_INTEGER = 2;

/** A statement that starts with INSERT, UPDATE, DELETE or REPLACE, after comments. */
const DML = /^(\s+|--[^\n]*\n|\/\*[\s\S]*?\*\/)*(insert|update|delete|replace)\b/i;

/** Rows returned per call; a larger result is fetched in further calls. */
const ROWS_PER_BATCH = 512;

/** Prefix of a Python function's result that carries its kind ("\0i123" is the integer 123). */
const TAGGED = "\0";

/** The parts of Emscripten's file system needed to find a database's host file. */
interface SqliteFs extends EmscriptenFs {
  lookupPath(path: string, options?: { follow?: boolean }): {
    node: { mount: { type: unknown; mountpoint: string; opts: { root?: string } } };
  };
}

/** A Python callable as Pyodide hands it to JavaScript. */
type PyCallable = ((...args: unknown[]) => unknown) & { destroy?(): void };

interface Database {
  handle: DatabaseSync;
  path: string;
  /** Prepared statements by SQL text, oldest first. */
  statements: Map<string, Statement>;
  cacheSize: number;
  /** Whether the file was opened read-only because the folder is not writable. */
  readOnlyFolder: boolean;
  callbacks: PyCallable[];
}

interface Statement {
  handle: StatementSync;
  reader: boolean;
  names: string[];
  declaredTypes: (string | null)[];
  /** Text after the first statement that is not a comment or a semicolon. */
  extra: boolean;
  /** INSERT, UPDATE, DELETE or REPLACE: the statements whose row count Python reports. */
  dml: boolean;
  busy: boolean;
}

interface OpenCursor {
  databaseId: number;
  iterator: Iterator<unknown[]>;
  statement: Statement;
}

export interface SqliteModuleOptions {
  fs: SqliteFs;
  log: LogFunction;
}

/** Version of the host's SQLite library, such as "3.53.2". */
export function sqliteVersion(): string {
  const probe = new DatabaseSync(":memory:");
  try {
    return String((probe.prepare("SELECT sqlite_version() AS v").get() as { v: string }).v);
  } finally {
    probe.close();
  }
}

/** The `_wsgirun_sqlite` module of one isolate. */
export class SqliteModule {
  #fs: SqliteFs;
  #log: LogFunction;
  #databases = new Map<number, Database>();
  #cursors = new Map<number, OpenCursor>();
  #nextId = 1;

  constructor(options: SqliteModuleOptions) {
    this.#fs = options.fs;
    this.#log = options.log;
  }

  /**
   * Opens a database. `path` is the Python path, ":memory:", or a "file:"
   * URI when `uri` is set. Returns `[id]` or `[FAILED, class, message]`.
   */
  open(path: string, timeoutSeconds: number, uri: boolean, cacheSize: number): unknown[] {
    let location: { hostPath: string; memory: boolean };
    try {
      location = this.#locate(path, uri);
    } catch (error) {
      return [FAILED, "OperationalError", (error as Error).message];
    }
    const options = {
      timeout: Math.max(0, Math.round(timeoutSeconds * 1000)),
      // SQLite's defaults, which Python's sqlite3 keeps; node:sqlite changes both.
      enableForeignKeyConstraints: false,
      enableDoubleQuotedStringLiterals: true,
    };
    let handle: DatabaseSync;
    let readOnlyFolder = false;
    try {
      handle = new DatabaseSync(location.hostPath, options);
    } catch (error) {
      if (location.memory || !isPermissionError(error)) {
        return [
          FAILED,
          "OperationalError",
          `unable to open database file '${path}': ${(error as Error).message}`,
        ];
      }
      try {
        handle = new DatabaseSync(location.hostPath, { ...options, readOnly: true });
        readOnlyFolder = true;
      } catch (readError) {
        return [
          FAILED,
          "OperationalError",
          `unable to open database file '${path}': ${(readError as Error).message}`,
        ];
      }
    }
    const id = this.#nextId++;
    this.#databases.set(id, {
      handle,
      path,
      statements: new Map(),
      cacheSize,
      readOnlyFolder,
      callbacks: [],
    });
    return [id];
  }

  close(id: number): void {
    const database = this.#databases.get(id);
    if (!database) return;
    this.#databases.delete(id);
    for (const [cursorId, cursor] of this.#cursors) {
      if (cursor.databaseId === id) this.#cursors.delete(cursorId);
    }
    database.handle.close();
    for (const callback of database.callbacks) callback.destroy?.();
  }

  closeAll(): void {
    for (const id of [...this.#databases.keys()]) this.close(id);
  }

  in_transaction(id: number): boolean {
    return this.#database(id)?.handle.isTransaction ?? false;
  }

  /**
   * Runs one statement. `begin` is run first when no transaction is open
   * (Python's implicit BEGIN before DML). Returns `[ROWS | DONE, names,
   * declaredTypes, values, fixes, cursorId, changes, lastrowid]` or
   * `[FAILED, class, message]`. `changes` is -1 unless the statement is DML.
   */
  execute(
    id: number,
    sql: string,
    begin: string,
    kinds: string,
    names: string,
    ...values: unknown[]
  ): unknown[] {
    const database = this.#database(id);
    if (!database) return [FAILED, "ProgrammingError", "Cannot operate on a closed database."];
    try {
      const statement = this.#prepare(database, sql);
      if (statement.extra) {
        return [FAILED, "ProgrammingError", "You can only execute one statement at a time."];
      }
      if (begin && !database.handle.isTransaction) database.handle.exec(begin);
      const parameters = bindParameters(kinds, names, values);
      if (!statement.reader) {
        const result = statement.handle.run(...parameters);
        const changes = statement.dml ? Number(result.changes) : -1;
        return [DONE, [], [], [], [], 0, changes, Number(result.lastInsertRowid)];
      }
      statement.busy = true;
      const iterator = statement.handle.iterate(...parameters) as Iterator<unknown[]>;
      const batch = this.#pull(iterator, statement);
      let cursorId = 0;
      if (!batch.done) {
        cursorId = this.#nextId++;
        this.#cursors.set(cursorId, { databaseId: id, iterator, statement });
      }
      // Only DML with RETURNING both returns rows and changes rows.
      const [changes, lastrowid] = statement.dml ? this.#counts(database) : [-1, 0];
      return [
        batch.done ? DONE : ROWS,
        statement.names,
        statement.declaredTypes,
        batch.values,
        batch.fixes,
        cursorId,
        changes,
        lastrowid,
      ];
    } catch (error) {
      return this.#failure(database, error);
    }
  }

  /** Returns the next rows of an open cursor: `[ROWS | DONE, values, fixes]` or a failure. */
  fetch(cursorId: number): unknown[] {
    const cursor = this.#cursors.get(cursorId);
    if (!cursor) return [DONE, [], []];
    try {
      const batch = this.#pull(cursor.iterator, cursor.statement);
      if (batch.done) this.#cursors.delete(cursorId);
      return [batch.done ? DONE : ROWS, batch.values, batch.fixes];
    } catch (error) {
      this.#cursors.delete(cursorId);
      cursor.statement.busy = false;
      return [FAILED, ...classify(error).slice(0, 2)];
    }
  }

  /** Stops an open cursor early, which resets its statement and releases its locks. */
  release(cursorId: number): void {
    const cursor = this.#cursors.get(cursorId);
    if (!cursor) return;
    this.#cursors.delete(cursorId);
    cursor.iterator.return?.();
    cursor.statement.busy = false;
  }

  /** Runs a script of several statements (executescript). Returns `[DONE]` or a failure. */
  exec(id: number, script: string): unknown[] {
    const database = this.#database(id);
    if (!database) return [FAILED, "ProgrammingError", "Cannot operate on a closed database."];
    try {
      database.handle.exec(script);
      return [DONE];
    } catch (error) {
      return this.#failure(database, error);
    }
  }

  /**
   * Registers a SQL function backed by a Python callable, which receives a
   * string of argument kinds first (see dbapi2.py). Integers arrive as
   * BigInt so that they can be distinguished from REALs.
   */
  create_function(id: number, name: string, deterministic: boolean, call: PyCallable): unknown[] {
    const database = this.#database(id);
    if (!database) return [FAILED, "ProgrammingError", "Cannot operate on a closed database."];
    database.callbacks.push(call);
    try {
      database.handle.function(
        name,
        { varargs: true, deterministic, useBigIntArguments: true },
        (...args: SQLOutputValue[]) => this.#callPython(call, args) as SQLInputValue,
      );
      return [DONE];
    } catch (error) {
      return [FAILED, ...classify(error).slice(0, 2)];
    }
  }

  /** Registers an aggregate: `start()` makes the Python object, `step` and `finish` use it. */
  create_aggregate(
    id: number,
    name: string,
    start: PyCallable,
    step: PyCallable,
    finish: PyCallable,
  ): unknown[] {
    const database = this.#database(id);
    if (!database) return [FAILED, "ProgrammingError", "Cannot operate on a closed database."];
    database.callbacks.push(start, step, finish);
    try {
      database.handle.aggregate(
        name,
        {
          start: () => this.#callPython(start, []) as PyCallable,
          step: (state: unknown, ...args: unknown[]) => {
            this.#callPython(step, [state, ...args]);
            return state;
          },
          result: (state: unknown) => {
            try {
              return this.#callPython(finish, [state]);
            } finally {
              (state as PyCallable).destroy?.();
            }
          },
          varargs: true,
          useBigIntArguments: true,
        } as unknown as Parameters<DatabaseSync["aggregate"]>[1],
      );
      return [DONE];
    } catch (error) {
      return [FAILED, ...classify(error).slice(0, 2)];
    }
  }

  /** Returns the whole database as bytes (Connection.serialize). */
  serialize(id: number, schema: string): Uint8Array | undefined {
    return this.#database(id)?.handle.serialize(schema);
  }

  /** Replaces the database's content with `data` (Connection.deserialize). */
  deserialize(id: number, data: PyBuffer, schema: string): unknown[] {
    const database = this.#database(id);
    if (!database) return [FAILED, "ProgrammingError", "Cannot operate on a closed database."];
    const buffer = data.getBuffer("u8");
    try {
      database.handle.deserialize(new Uint8Array(buffer.data), { dbName: schema });
      database.statements.clear();
      return [DONE];
    } catch (error) {
      return this.#failure(database, error);
    } finally {
      buffer.release();
    }
  }

  #database(id: number): Database | undefined {
    return this.#databases.get(id);
  }

  /** Finds the host file behind a Python path; in-memory databases need none. */
  #locate(path: string, uri: boolean): { hostPath: string; memory: boolean } {
    if (path === ":memory:" || path === "") return { hostPath: ":memory:", memory: true };
    let filePath = path;
    let query = "";
    if (uri && path.startsWith("file:")) {
      const url = new URL(path);
      if (url.searchParams.get("mode") === "memory") return { hostPath: path, memory: true };
      filePath = decodeURIComponent(url.pathname);
      query = url.search;
    }
    const slash = filePath.lastIndexOf("/");
    const folder = slash > 0 ? filePath.slice(0, slash) : "/";
    let mount;
    try {
      mount = this.#fs.lookupPath(folder, { follow: true }).node.mount;
    } catch {
      throw new Error(
        `unable to open database file '${path}': the folder '${folder}' does not exist`,
      );
    }
    if (mount.type !== this.#fs.filesystems.NODEFS || !mount.opts.root) {
      throw new Error(
        `unable to open database file '${path}': the folder '${folder}' exists only in the ` +
          "isolate's memory; keep databases in a host folder given with --write DIR",
      );
    }
    const hostPath = mount.opts.root + filePath.slice(mount.mountpoint.length);
    return { hostPath: query ? `file:${encodeURI(hostPath)}${query}` : hostPath, memory: false };
  }

  #prepare(database: Database, sql: string): Statement {
    const cached = database.statements.get(sql);
    if (cached && !cached.busy) {
      // Map order is the eviction order: move the statement to the end.
      database.statements.delete(sql);
      database.statements.set(sql, cached);
      return cached;
    }
    // setReturnArrays is missing from Deno 2.9's type declarations, but node:sqlite has it.
    const handle = database.handle.prepare(sql) as StatementSync & {
      setReturnArrays(on: boolean): void;
    };
    handle.setReturnArrays(true);
    handle.setReadBigInts(true);
    handle.setAllowUnknownNamedParameters(true);
    const columns = handle.columns();
    const statement: Statement = {
      handle,
      reader: columns.length > 0,
      names: columns.map((column) => column.name),
      declaredTypes: columns.map((column) => column.type ?? null),
      extra: hasMoreStatements(sql.slice(handle.sourceSQL.length)),
      dml: DML.test(sql),
      busy: false,
    };
    if (cached) return statement;
    database.statements.set(sql, statement);
    if (database.statements.size > database.cacheSize) {
      const [oldest] = database.statements.keys();
      database.statements.delete(oldest);
    }
    return statement;
  }

  /** Pulls up to one batch of rows, flattened, with the fix-ups the Python side applies. */
  #pull(iterator: Iterator<unknown[]>, statement: Statement) {
    const values: unknown[] = [];
    const fixes: number[] = [];
    let done = false;
    for (let count = 0; count < ROWS_PER_BATCH; count++) {
      const next = iterator.next();
      if (next.done) {
        done = true;
        statement.busy = false;
        break;
      }
      for (const value of next.value) appendValue(values, fixes, value);
    }
    return { values, fixes, done };
  }

  /** changes() and last_insert_rowid() after a statement that returned rows (RETURNING). */
  #counts(database: Database): [number, number] {
    const statement = this.#prepare(database, "SELECT changes(), last_insert_rowid()");
    const [changes, lastrowid] = statement.handle.get() as unknown as [bigint, bigint];
    return [Number(changes), Number(lastrowid)];
  }

  #failure(database: Database, error: unknown): unknown[] {
    const [kind, message] = classify(error);
    if (database.readOnlyFolder && /readonly database/.test(message)) {
      return [
        FAILED,
        kind,
        `${message}: the folder of '${database.path}' is not writable; add it with --write DIR`,
      ];
    }
    if (/readonly database/.test(message)) {
      // The isolate may write the folder, so the file system permissions refused the write.
      return [
        FAILED,
        kind,
        `${message}: the user the application runs as cannot write '${database.path}' or ` +
        "its folder; give that user write access to both (chown or chmod)",
      ];
    }
    return [FAILED, kind, message];
  }

  #callPython(call: PyCallable, args: unknown[]): unknown {
    let kinds = "";
    const converted = args.map((value, index) => {
      const [kind, plain] = describeArgument(value);
      if (kind !== ".") kinds = kinds.padEnd(index, ".") + kind;
      return plain;
    });
    let result: unknown;
    try {
      result = call(kinds, ...converted);
    } catch (error) {
      this.#log("warning", `a Python SQL function raised an exception: ${error}`);
      throw new Error("user-defined function raised exception");
    }
    if (typeof result === "string" && result.startsWith(TAGGED)) {
      return result[1] === "i" ? BigInt(result.slice(2)) : result.slice(2);
    }
    return result;
  }
}

function isPermissionError(error: unknown): boolean {
  return error instanceof Deno.errors.NotCapable || error instanceof Deno.errors.PermissionDenied ||
    /permission|NotCapable|Requires write access/i.test(String(error));
}

/** Whether SQL text after the first statement holds anything but whitespace, comments and semicolons. */
function hasMoreStatements(tail: string): boolean {
  let index = 0;
  while (index < tail.length) {
    const rest = tail.slice(index);
    const skip = /^(\s+|;|--[^\n]*(\n|$)|\/\*[\s\S]*?(\*\/|$))/.exec(rest);
    if (!skip) return true;
    index += skip[0].length;
  }
  return false;
}

/** Converts Python's parameters by their kinds (see the module comment). */
function bindParameters(kinds: string, names: string, values: unknown[]): SQLInputValue[] {
  const bound = values.map((value, index): SQLInputValue => {
    switch (kinds[index]) {
      case "n":
        return null;
      case "i":
      case "I":
        return BigInt(value as number | string);
      case "b": {
        const buffer = (value as PyBuffer).getBuffer("u8");
        try {
          return new Uint8Array(buffer.data);
        } finally {
          buffer.release();
        }
      }
      default:
        return value as SQLInputValue;
    }
  });
  if (!names) return bound;
  const named: Record<string, SQLInputValue> = {};
  JSON.parse(names).forEach((name: string, index: number) => (named[name] = bound[index]));
  return [named as unknown as SQLInputValue];
}

const MIN_SAFE = BigInt(Number.MIN_SAFE_INTEGER);
const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

function appendValue(values: unknown[], fixes: number[], value: unknown): void {
  const index = values.length;
  if (typeof value === "bigint") {
    if (value >= MIN_SAFE && value <= MAX_SAFE) {
      values.push(Number(value));
    } else {
      fixes.push(index, FIX_BIG_INTEGER);
      values.push(value.toString());
    }
  } else if (typeof value === "number") {
    if (Number.isInteger(value)) fixes.push(index, FIX_FLOAT);
    values.push(value);
  } else if (value === null) {
    // Pyodide 314 turns null into JsNull; undefined becomes None in both versions.
    values.push(undefined);
  } else {
    if (value instanceof Uint8Array) fixes.push(index, FIX_BLOB);
    values.push(value);
  }
}

/** A SQL function's argument for Python: its kind ("." needs nothing) and plain value. */
function describeArgument(value: unknown): [string, unknown] {
  if (typeof value === "bigint") {
    return value >= MIN_SAFE && value <= MAX_SAFE ? [".", Number(value)] : ["I", value.toString()];
  }
  if (typeof value === "number") return Number.isInteger(value) ? ["f", value] : [".", value];
  if (value === null) return [".", undefined];
  if (value instanceof Uint8Array) return ["b", value];
  return [".", value];
}

/** Python exception class names by SQLite's primary result code, as CPython's sqlite3 maps them. */
const CLASS_BY_CODE: Record<number, string> = {
  2: "InternalError", // SQLITE_INTERNAL
  11: "DatabaseError", // SQLITE_CORRUPT
  12: "InternalError", // SQLITE_NOTFOUND
  18: "DataError", // SQLITE_TOOBIG
  19: "IntegrityError", // SQLITE_CONSTRAINT
  20: "IntegrityError", // SQLITE_MISMATCH
  21: "InterfaceError", // SQLITE_MISUSE
  25: "ProgrammingError", // SQLITE_RANGE
  26: "DatabaseError", // SQLITE_NOTADB
};

/** Messages of errors that node:sqlite raises without a result code. */
const CLASS_BY_MESSAGE: [RegExp, string][] = [
  [/constraint failed|datatype mismatch/i, "IntegrityError"],
  [/file is not a database|malformed/i, "DatabaseError"],
  [/string or blob too big|too large to be represented/i, "DataError"],
  [/column index out of range|cannot be bound|Unknown named parameter/i, "ProgrammingError"],
];

/** Returns the Python exception class name and message for an error from node:sqlite. */
function classify(error: unknown): [string, string] {
  const message = error instanceof Error ? error.message : String(error);
  const code = (error as { errcode?: number }).errcode;
  if (typeof code === "number" && CLASS_BY_CODE[code & 0xff]) {
    return [CLASS_BY_CODE[code & 0xff], message];
  }
  for (const [pattern, kind] of CLASS_BY_MESSAGE) if (pattern.test(message)) return [kind, message];
  return ["OperationalError", message];
}
