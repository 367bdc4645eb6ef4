/**
 * The access log: one line per request on standard output, in a format
 * given with Apache's LogFormat directives (mod_wsgi's users know them from
 * Apache itself). A format is compiled once into a list of field writers,
 * so a request only runs the writers.
 */

import type { ResponseRecord } from "./wsgi_response.ts";

/** Facts about one request that an access log line can show. */
export interface AccessRecord {
  request: Request;
  /** The request target as the client sent it, path and query. */
  uri: string;
  /** The address of the connection's peer. */
  remote: string;
  /** The client's address: `remote`, or what a trusted proxy forwarded. */
  client: string;
  /** The port the server listens on; unset on a Unix socket. */
  serverPort: number | undefined;
  response: ResponseRecord;
  /** Date.now() when the request arrived. */
  arrivalWallMs: number;
  /** performance.now() when the request arrived. */
  arrivalMs: number;
  requestId: string;
}

/** Writes a line for one request, without its newline. */
export type AccessFormatter = (record: AccessRecord) => string;

/** Apache's common format. */
const COMMON = '%h %l %u %t "%r" %>s %b';
/** Apache's combined format. */
const COMBINED = COMMON + ' "%{Referer}i" "%{User-Agent}i"';

/** Formats that a name stands for, in --access-log-format. */
export const NAMED_FORMATS: Readonly<Record<string, string>> = {
  common: COMMON,
  combined: COMBINED,
  // The combined format, then the microseconds the request took and the id of its error log lines.
  default: COMBINED + " %D %L",
};

/** Error for a format with a directive that the access log does not support. */
export class AccessLogFormatError extends Error {}

type Field = (record: AccessRecord) => string;

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/** Formats a time as in Apache's access log: 04/Dec/2026:21:18:11 +0000. */
function accessLogTime(date: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${pad(date.getUTCDate())}/${MONTHS[date.getUTCMonth()]}/${date.getUTCFullYear()}:` +
    `${pad(date.getUTCHours())}:${pad(date.getUTCMinutes())}:${pad(date.getUTCSeconds())} +0000`;
}

// deno-lint-ignore no-control-regex -- control characters are what the log must not contain
const UNPRINTABLE = /[\x00-\x1f\x7f-\xff]/g;

/**
 * Escapes a field the way Apache does: `"` and `\` get a backslash, and each
 * byte outside printable ASCII becomes \xhh. The request line and headers come
 * with one character per byte, so a raw UTF-8 path shows as its bytes.
 */
function escaped(value: string | null): string {
  if (value === null) return "-";
  return value.replace(/[\\"]/g, (c) => "\\" + c).replace(
    UNPRINTABLE,
    (c) => "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"),
  );
}

/** Returns the body's bytes: none for a HEAD response, whatever the application returned. */
function bodyBytes({ request, response }: AccessRecord): number {
  return request.method === "HEAD" ? 0 : response.bytes;
}

function micros(record: AccessRecord): number {
  return Math.round((performance.now() - record.arrivalMs) * 1000);
}

function queryOf(uri: string): string {
  const mark = uri.indexOf("?");
  return mark < 0 ? "" : uri.slice(mark);
}

/** Returns the user name of Basic authentication, as gunicorn logs it, or null without one. */
function basicUser(request: Request): string | null {
  const header = request.headers.get("authorization");
  if (!header || !/^basic /i.test(header)) return null;
  try {
    const decoded = atob(header.slice(6).trim());
    const colon = decoded.indexOf(":");
    return colon < 0 ? null : decoded.slice(0, colon);
  } catch {
    return null;
  }
}

/**
 * Directives without an argument. Deno's server does not report the HTTP
 * version of a request, so %H and %r show HTTP/1.1 for every request.
 */
const DIRECTIVES: Record<string, Field> = {
  "%": () => "%",
  a: (r) => escaped(r.client || "-"),
  h: (r) => escaped(r.remote || "-"),
  l: () => "-",
  u: (r) => escaped(basicUser(r.request)),
  t: (r) => `[${accessLogTime(new Date(r.arrivalWallMs))}]`,
  r: (r) => `${r.request.method} ${escaped(r.uri)} HTTP/1.1`,
  m: (r) => r.request.method,
  U: (r) => escaped(r.uri.split("?", 1)[0]),
  q: (r) => escaped(queryOf(r.uri)),
  H: () => "HTTP/1.1",
  s: (r) => String(r.response.status),
  b: (r) => String(bodyBytes(r) || "-"),
  B: (r) => String(bodyBytes(r)),
  D: (r) => String(micros(r)),
  T: (r) => String(Math.floor(micros(r) / 1_000_000)),
  L: (r) => r.requestId,
  p: (r) => String(r.serverPort ?? "-"),
  P: () => String(Deno.pid),
};

/** A header name, as RFC 9110 allows it (a token). */
const HEADER_NAME = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/** The accepted form of a format, for error messages. */
export const FORMAT_FORM = "Apache's LogFormat directives %a %h %l %u %t %r %m %U %q %H %s %>s " +
  `%b %B %D %T %L %p %P %{Header}i and %%, or a name: ${Object.keys(NAMED_FORMATS).join(", ")}`;

/**
 * Compiles a format of Apache's LogFormat directives, or the name of one
 * of NAMED_FORMATS, into a function that writes the line of a request.
 *
 * @throws {AccessLogFormatError} The format has a directive that is not supported.
 */
export function compileAccessLogFormat(format: string): AccessFormatter {
  if (format === "") throw new AccessLogFormatError("an empty format writes empty lines");
  const text = Object.hasOwn(NAMED_FORMATS, format) ? NAMED_FORMATS[format] : format;
  const fields: Field[] = [];
  let literal = "";
  const pushLiteral = () => {
    if (literal === "") return;
    const fixed = literal;
    fields.push(() => fixed);
    literal = "";
  };
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== "%") {
      literal += text[i];
      continue;
    }
    const start = i;
    let argument: string | undefined;
    // Apache's < and > right after the % pick the original or the final
    // request; there is only one here.
    while (text[i + 1] === ">" || text[i + 1] === "<") i++;
    if (text[i + 1] === "{") {
      const end = text.indexOf("}", i + 2);
      if (end < 0) throw unknownDirective(text.slice(start), "has no closing '}'");
      argument = text.slice(i + 2, end);
      i = end;
    }
    const letter = text[i + 1];
    i++;
    const directive = text.slice(start, i + 1);
    if (letter === undefined) throw unknownDirective(directive, "ends the format");
    if (argument !== undefined) {
      if (letter !== "i" || argument === "") {
        throw unknownDirective(directive, "is not supported: only %{Header}i takes a name");
      }
      if (!HEADER_NAME.test(argument)) {
        throw unknownDirective(
          directive,
          `names no valid header: '${argument}' is not a header name`,
        );
      }
      const name = argument;
      pushLiteral();
      fields.push((r) => escaped(r.request.headers.get(name)));
      continue;
    }
    const field = Object.hasOwn(DIRECTIVES, letter) ? DIRECTIVES[letter] : undefined;
    if (!field) throw unknownDirective(directive, "is not supported");
    if (letter === "%") {
      literal += "%";
      continue;
    }
    pushLiteral();
    fields.push(field);
  }
  pushLiteral();
  return (record) => {
    let line = "";
    for (const field of fields) line += field(record);
    return line;
  };
}

function unknownDirective(directive: string, problem: string): AccessLogFormatError {
  return new AccessLogFormatError(`'${directive}' ${problem}`);
}
