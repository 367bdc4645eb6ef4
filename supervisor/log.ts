/**
 * Leveled logging for the server, its pools and its isolates.
 *
 * Lines go to standard error as `<ISO time> <LEVEL> [key=value ...] message`,
 * so they can be read by people and split by scripts. Each line of a message
 * of several lines gets that prefix. Context keys carry the
 * ids the guide asks every line to have: app, group, process (pid), isolate
 * and request. A mount's lines also carry `mount=PREFIX` when another mount
 * has the same app name and group (see runtime/mounts.ts).
 */

export const LOG_LEVELS = ["debug", "info", "warning", "error", "critical"] as const;
export type LogLevel = typeof LOG_LEVELS[number];

const LEVEL_RANK: Record<LogLevel, number> = {
  debug: 10,
  info: 20,
  warning: 30,
  error: 40,
  critical: 50,
};

export type LogContext = Record<string, string | number | undefined>;

/** Destination of finished log lines; tests replace it to capture output. */
export type LogSink = (line: string) => void;

const encoder = new TextEncoder();

/**
 * Writes text to standard error or output. Once the stream's reader has gone
 * (a log pipe whose reader exited), the text is dropped, so that the server
 * keeps serving without its log instead of stopping at the next line.
 */
export function writeOutput(stream: typeof Deno.stderr | typeof Deno.stdout, text: string): void {
  const bytes = encoder.encode(text);
  try {
    for (let offset = 0; offset < bytes.length;) offset += stream.writeSync(bytes.subarray(offset));
  } catch (error) {
    if (!(error instanceof Deno.errors.BrokenPipe)) throw error;
  }
}

function writeStderr(line: string): void {
  writeOutput(Deno.stderr, line + "\n");
}

/** Control characters other than tab, line feed and carriage return. */
// deno-lint-ignore no-control-regex
const CONTROL_CHARACTERS = /[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/;

/** Returns `character` as \xhh, the escape of Apache's access log. */
export function hexEscape(character: string): string {
  return "\\x" + character.charCodeAt(0).toString(16).padStart(2, "0");
}

/** Writes each control character of CONTROL_CHARACTERS as \xhh. */
function escapeControlCharacters(text: string): string {
  return text.replace(new RegExp(CONTROL_CHARACTERS, "g"), hexEscape);
}

function formatContext(context: LogContext): string {
  const parts: string[] = [];
  for (const [key, value] of Object.entries(context)) {
    if (value !== undefined) parts.push(`${key}=${value}`);
  }
  return parts.length ? `[${parts.join(" ")}] ` : "";
}

export class Logger {
  #minRank: number;
  #context: LogContext;
  #sink: LogSink;

  constructor(level: LogLevel = "info", context: LogContext = {}, sink: LogSink = writeStderr) {
    this.#minRank = LEVEL_RANK[level];
    this.#context = context;
    this.#sink = sink;
  }

  /** Returns a logger that adds `context` to every line of this one. */
  child(context: LogContext): Logger {
    const logger = new Logger("debug", { ...this.#context, ...context }, this.#sink);
    logger.#minRank = this.#minRank;
    return logger;
  }

  enabled(level: LogLevel): boolean {
    return LEVEL_RANK[level] >= this.#minRank;
  }

  log(level: LogLevel, message: string, context: LogContext = {}): void {
    if (!this.enabled(level)) return;
    const time = new Date().toISOString();
    const prefix = `${time} ${level.toUpperCase()} ${
      formatContext({ ...this.#context, ...context })
    }`;
    // Every line of a traceback carries the ids too, so a search for one finds
    // all of it. A carriage return counts as a line break, so that it cannot
    // hide the prefix on a terminal.
    // Other control characters are escaped, so that a message cannot hold
    // terminal escape sequences or NUL bytes.
    if (CONTROL_CHARACTERS.test(message)) message = escapeControlCharacters(message);
    if (!/[\r\n]/.test(message)) {
      this.#sink(prefix + message);
      return;
    }
    const lines = message.replace(/\r\n?/g, "\n").trimEnd().split("\n");
    this.#sink(lines.map((line) => prefix + line).join("\n"));
  }

  debug(message: string, context?: LogContext): void {
    this.log("debug", message, context);
  }
  info(message: string, context?: LogContext): void {
    this.log("info", message, context);
  }
  warning(message: string, context?: LogContext): void {
    this.log("warning", message, context);
  }
  error(message: string, context?: LogContext): void {
    this.log("error", message, context);
  }
  critical(message: string, context?: LogContext): void {
    this.log("critical", message, context);
  }
}

/**
 * Returns the line of a Python traceback in `text` that names the exception,
 * such as "ModuleNotFoundError: No module named 'x'", or undefined when
 * `text` contains no traceback. Lets a second log line about the same
 * failure name it without repeating the whole traceback.
 */
export function tracebackSummary(text: string): string | undefined {
  if (!text.includes("Traceback (most recent call last)")) return undefined;
  const lines = text.split("\n").filter((line) => line.trim() !== "");
  // The exception line is the first one at the left margin after the last
  // frame. The lines after it are the rest of a long message or notes.
  let lastFrame = -1;
  lines.forEach((line, index) => {
    if (/^\s*File "/.test(line)) lastFrame = index;
  });
  const exceptionLine = lines.slice(lastFrame + 1).find((line) => /^\S/.test(line));
  if (exceptionLine !== undefined && lastFrame >= 0) return exceptionLine;
  // An exception group draws its traceback inside "| " margins.
  const grouped = lines.map((line) =>
    /^[\s|+]*([A-Za-z_][\w.]*(?:Error|Exception|Group)\b.*)$/.exec(line)
  )
    .find((match) => match !== null);
  return grouped?.[1] ?? lines.at(-1)?.trim();
}

/** Returns "1 request" or "2 requests", for log messages. */
export function plural(count: number, noun: string): string {
  if (count === 1) return `${count} ${noun}`;
  return `${count} ${noun}${noun.endsWith("s") ? "es" : "s"}`;
}
