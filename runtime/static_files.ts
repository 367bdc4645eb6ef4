/**
 * Static files for `--url-alias URL PATH`, served by the front without Python.
 *
 * Behavior, chosen to match what nginx and Apache users expect:
 * - Only GET and HEAD; other methods get 405 with `Allow: GET, HEAD`.
 * - The path after the alias URL is percent-decoded as UTF-8. Invalid escapes, invalid
 *   UTF-8, NUL, backslash and `.` or `..` segments get 400, because no file name needs
 *   them and a 400 shows the client at once that the path itself is wrong. `%2F` decodes
 *   to `/` and separates segments, and empty segments (`//`) are skipped.
 * - The decoded path is resolved with `Deno.realPath` and must stay inside the alias
 *   path, so a symbolic link that points outside gets 404.
 * - A folder request without a trailing slash gets 301 to the slash form (query kept).
 *   A folder serves its `index.html`. Folders are never listed, so a folder without
 *   `index.html` has nothing to send and gets 404, where nginx and Apache send 403.
 * - An alias whose path is a single file matches only its exact URL.
 * - Responses carry Content-Type, Content-Length, Last-Modified, a weak ETag and
 *   `Accept-Ranges: bytes`. If-None-Match and If-Modified-Since give 304.
 * - GET with one byte range gets 206, and an unsatisfiable one 416. A Range header with
 *   several ranges is ignored (200 with the whole file). If-Range is honored only with
 *   a date equal to Last-Modified, because the weak ETag never passes the strong
 *   comparison that If-Range requires.
 * - Bodies are streamed from the open file in chunks and never read whole.
 *
 * NOTE: If-Match and If-Unmodified-Since are not evaluated, so they never produce 412.
 */

import { hexEscape, Logger } from "../supervisor/log.ts";
import { SendTimer } from "./send_timeout.ts";
import type { UrlAlias } from "./options.ts";

/** The logger methods `serveStatic` calls. */
export type StaticFilesLogger = Pick<Logger, "error" | "warning">;

/** Options of {@linkcode serveStatic}. */
export interface ServeStaticOptions {
  /**
   * Receives a line for every 500 and for permission problems.
   * @default a Logger at level "info" that writes to standard error
   */
  logger?: StaticFilesLogger;
  /**
   * Receives the status and the body bytes sent once the response is over. That
   * is when `serveStatic` returns, or for a body streamed from a file, when its
   * last byte is sent, the client goes away or a read fails (`error` names which).
   */
  onDone?: (record: StaticRecord) => void;
  /**
   * Milliseconds a file's body may wait for the client to take more bytes
   * before the server stops it and closes the file; 0 for no limit.
   * @default 0
   */
  sendTimeoutMs?: number;
}

/** Summary of a static response, for {@linkcode ServeStaticOptions.onDone}. */
export interface StaticRecord {
  status: number;
  bytes: number;
  /** Reason the body stopped before its end, if it did. */
  error?: string;
}

/** Logger and end-of-response callback that the functions below share for one request. */
interface FileContext {
  logger: StaticFilesLogger;
  /** Set by `streamFile`, which reports the end of the body itself. */
  streaming: boolean;
  onDone: (record: StaticRecord) => void;
  sendTimeoutMs: number;
}

/** Result of {@linkcode matchAlias}. */
export interface AliasMatch {
  alias: UrlAlias;
  /** Raw (still percent-encoded) path after the alias URL: "" or a string starting with "/". */
  rest: string;
}

const defaultLogger = new Logger();

/** Size of each read from the file while streaming a body, in bytes. */
const CHUNK_SIZE = 64 * 1024;

const CONTENT_TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8",
  htm: "text/html; charset=utf-8",
  css: "text/css; charset=utf-8",
  js: "text/javascript; charset=utf-8",
  mjs: "text/javascript; charset=utf-8",
  json: "application/json; charset=utf-8",
  map: "application/json; charset=utf-8",
  svg: "image/svg+xml; charset=utf-8",
  txt: "text/plain; charset=utf-8",
  xml: "text/xml; charset=utf-8",
  csv: "text/csv; charset=utf-8",
  md: "text/markdown; charset=utf-8",
  webmanifest: "application/manifest+json; charset=utf-8",
  png: "image/png",
  jpg: "image/jpeg",
  jpeg: "image/jpeg",
  gif: "image/gif",
  webp: "image/webp",
  avif: "image/avif",
  ico: "image/x-icon",
  pdf: "application/pdf",
  wasm: "application/wasm",
  woff: "font/woff",
  woff2: "font/woff2",
  ttf: "font/ttf",
  otf: "font/otf",
  mp4: "video/mp4",
  webm: "video/webm",
  mp3: "audio/mpeg",
  ogg: "audio/ogg",
  wav: "audio/wav",
  zip: "application/zip",
  gz: "application/gzip",
};

const DEFAULT_CONTENT_TYPE = "application/octet-stream";

/**
 * Statuses for the `code` of filesystem errors that a request path can cause. Codes not
 * listed here mean a fault on the server and give 500.
 */
const STATUS_BY_ERROR_CODE: Record<string, number> = {
  ENOENT: 404,
  ENOTDIR: 404,
  ELOOP: 404,
  ENAMETOOLONG: 404,
  EACCES: 403,
  EPERM: 403,
};

/** Bodies of the error responses, the same reason phrases as the front's other errors. */
const STATUS_TEXT: Record<number, string> = {
  400: "Bad Request",
  403: "Forbidden",
  404: "Not Found",
  405: "Method Not Allowed",
  416: "Range Not Satisfiable",
  500: "Internal Server Error",
};

/**
 * Finds the alias that serves a request path.
 *
 * The alias URL is compared byte for byte with the raw path, and it matches only at a
 * segment boundary: `/static` matches `/static` and `/static/x` but not `/statics`. The
 * longest matching URL wins. The alias `/` matches every path that starts with `/`.
 *
 * @param aliases The configured aliases.
 * @param rawPath The raw request path, still percent-encoded and without the query.
 * @returns The alias and the raw rest of the path, or `undefined` when none matches.
 *
 * @example Pick the longer of two nested aliases
 * ```ts
 * const aliases = [{ url: "/static", path: "/srv/static" }, { url: "/static/img", path: "/srv/img" }];
 * matchAlias(aliases, "/static/img/logo.png"); // { alias: aliases[1], rest: "/logo.png" }
 * ```
 */
export function matchAlias(aliases: UrlAlias[], rawPath: string): AliasMatch | undefined {
  let best: AliasMatch | undefined;
  for (const alias of aliases) {
    const prefix = aliasPrefix(alias);
    if (!rawPath.startsWith(prefix)) continue;

    const rest = rawPath.slice(prefix.length);
    if (rest !== "" && !rest.startsWith("/")) continue;
    if (best && aliasPrefix(best.alias).length >= prefix.length) continue;
    best = { alias, rest };
  }
  return best;
}

/**
 * Serves the file that `rest` names under `alias`.
 *
 * @param request The request; its method and its conditional and Range headers are used.
 * @param alias The alias that `matchAlias` returned.
 * @param rest The raw rest of the path that `matchAlias` returned.
 * @param options The logger for server faults.
 * @returns The response. Filesystem errors become 4xx or 500 responses, so the promise
 *   does not reject.
 *
 * @example Serve aliases in front of an application
 * ```ts
 * Deno.serve(async (request) => {
 *   const match = matchAlias(aliases, rawPathOf(request));
 *   if (match) return await serveStatic(request, match.alias, match.rest);
 *   return await callApplication(request);
 * });
 * ```
 */
export async function serveStatic(
  request: Request,
  alias: UrlAlias,
  rest: string,
  options: ServeStaticOptions = {},
): Promise<Response> {
  const context: FileContext = {
    logger: options.logger ?? defaultLogger,
    streaming: false,
    onDone: options.onDone ?? (() => {}),
    sendTimeoutMs: options.sendTimeoutMs ?? 0,
  };
  const response = await respond(request, alias, rest, context);
  if (!context.streaming) {
    // HEAD and 304 responses have no body, whatever their Content-Length header is.
    const bytes = response.body === null ? 0 : Number(response.headers.get("content-length") ?? 0);
    context.onDone({ status: response.status, bytes });
  }
  return response;
}

async function respond(
  request: Request,
  alias: UrlAlias,
  rest: string,
  context: FileContext,
): Promise<Response> {
  if (request.method !== "GET" && request.method !== "HEAD") {
    return textResponse(405, { allow: "GET, HEAD" });
  }

  const segments = decodeSegments(rest);
  if (segments === undefined) return textResponse(400);

  try {
    // Resolved for each request, so an alias behind a symbolic link
    // (current -> releases/42) serves the release the link names now.
    const root = await Deno.realPath(alias.path);
    const candidate = segments.length === 0 ? root : `${root}/${segments.join("/")}`;
    const target = await resolveInside(root, candidate);
    if (target === undefined) return textResponse(404);

    const info = await Deno.stat(target);
    if (info.isDirectory) {
      if (!rest.endsWith("/")) return redirectToFolder(request, alias, rest);
      return await serveIndex(request, root, target, context);
    }
    // A file cannot be a folder, and a file alias has no paths below it.
    if (!info.isFile || rest.endsWith("/")) return textResponse(404);
    return await serveFile(request, target, context);
  } catch (error) {
    return errorResponse(error, alias, rest, context.logger);
  }
}

/** Returns the alias URL as a prefix to strip: "" for the root alias "/". */
function aliasPrefix(alias: UrlAlias): string {
  return alias.url === "/" ? "" : alias.url;
}

/**
 * Decodes the raw rest of a path into file name segments, or returns `undefined` when
 * the path is invalid or tries to leave the folder.
 */
function decodeSegments(rest: string): string[] | undefined {
  let decoded: string;
  try {
    decoded = decodeURIComponent(rest);
  } catch {
    // URIError: a malformed escape or bytes that are not UTF-8.
    return undefined;
  }
  if (decoded.includes("\0") || decoded.includes("\\")) return undefined;

  const segments = decoded.split("/").filter((segment) => segment !== "");
  if (segments.some((segment) => segment === "." || segment === "..")) return undefined;
  return segments;
}

/**
 * Resolves `candidate` through symbolic links, and returns `undefined` when the real path
 * lies outside `root`. `root` must itself be a real path.
 */
async function resolveInside(root: string, candidate: string): Promise<string | undefined> {
  const real = await Deno.realPath(candidate);
  return isInside(root, real) ? real : undefined;
}

function isInside(root: string, real: string): boolean {
  if (real === root) return true;
  const rootWithSlash = root.endsWith("/") ? root : root + "/";
  return real.startsWith(rootWithSlash);
}

/** Serves `index.html` of a folder that the request named with a trailing slash. */
async function serveIndex(
  request: Request,
  root: string,
  folder: string,
  context: FileContext,
): Promise<Response> {
  // index.html may itself be a symbolic link, so it is resolved and checked again.
  const index = await resolveInside(root, `${folder}/index.html`);
  if (index === undefined) return textResponse(404);

  const info = await Deno.stat(index);
  if (!info.isFile) return textResponse(404);
  return await serveFile(request, index, context);
}

/**
 * Redirects a folder request to its slash form. The location is built from the raw path
 * segments, so it stays percent-encoded ASCII, and it never starts with `//`, which a
 * browser would read as another host.
 */
function redirectToFolder(request: Request, alias: UrlAlias, rest: string): Response {
  const rawSegments = rest.split("/").filter((segment) => segment !== "");
  let location = aliasPrefix(alias) + "/";
  if (rawSegments.length > 0) location += rawSegments.join("/") + "/";

  const query = rawQuery(request);
  if (query !== "") location += "?" + query;

  return new Response(null, {
    status: 301,
    headers: { location: encodeNonPrintable(location) },
  });
}

/**
 * Returns the raw query of the request target, without "?".
 *
 * Deno builds `request.url` from the Host header and the raw target without checking
 * the Host, so the host is cut off by its known text, not by parsing the URL.
 */
function rawQuery(request: Request): string {
  const url = request.url;
  const schemeEnd = url.indexOf("://") + 3;
  const host = request.headers.get("host");

  let targetStart: number;
  if (host !== null && url.startsWith(host, schemeEnd)) {
    targetStart = schemeEnd + host.length;
  } else {
    targetStart = url.indexOf("/", schemeEnd);
    if (targetStart === -1) return "";
  }

  const queryStart = url.indexOf("?", targetStart);
  return queryStart === -1 ? "" : url.slice(queryStart + 1);
}

/**
 * Percent-encodes every character outside printable ASCII, because Deno stops the whole
 * process on a response header value that contains a control character.
 */
function encodeNonPrintable(text: string): string {
  return text.replace(/[^\x21-\x7e]/gu, (character) => encodeURIComponent(character));
}

/** Serves one regular file, with conditional requests and a single byte range. */
async function serveFile(
  request: Request,
  path: string,
  context: FileContext,
): Promise<Response> {
  const file = await Deno.open(path, { read: true });
  try {
    return await respondWithFile(request, file, path, context);
  } catch (error) {
    file.close();
    throw error;
  }
}

/**
 * Builds the response for an open file. The file is closed here unless the response
 * body streams from it, and the stream then closes it.
 */
async function respondWithFile(
  request: Request,
  file: Deno.FsFile,
  path: string,
  context: FileContext,
): Promise<Response> {
  // Stat the open file, not the path, so the headers describe the bytes that are sent
  // even if the path was replaced after it was resolved.
  const info = await file.stat();
  if (!info.isFile) {
    file.close();
    return textResponse(404);
  }

  const size = info.size;
  const headers = validatorHeaders(size, info.mtime);
  if (isNotModified(request.headers, headers)) {
    file.close();
    return new Response(null, { status: 304, headers });
  }

  headers.set("content-type", contentTypeFor(path));
  headers.set("accept-ranges", "bytes");

  const range = request.method === "GET" ? selectRange(request.headers, headers, size) : undefined;
  if (range === "unsatisfiable") {
    file.close();
    return textResponse(416, { "content-range": `bytes */${size}` });
  }

  const start = range?.start ?? 0;
  const length = range ? range.end - range.start + 1 : size;
  headers.set("content-length", String(length));
  if (range) headers.set("content-range", `bytes ${range.start}-${range.end}/${size}`);
  const status = range ? 206 : 200;

  if (request.method === "HEAD" || length === 0) {
    file.close();
    // Deno keeps a handler-set Content-Length on HEAD responses.
    const body = request.method === "HEAD" ? null : new Uint8Array(0);
    return new Response(body, { status, headers });
  }

  if (start > 0) await file.seek(start, Deno.SeekMode.Start);
  context.streaming = true;
  const body = streamFile(file, length, path, context, (sent, error) => {
    context.onDone({ status, bytes: sent, error });
  });
  return new Response(body, { status, headers });
}

/** Builds ETag and Last-Modified, the headers that 200, 206 and 304 responses share. */
function validatorHeaders(size: number, mtime: Date | null): Headers {
  const headers = new Headers();
  const mtimeMs = mtime === null ? 0 : mtime.getTime();
  // Weak, because equal size and mtime do not prove equal bytes.
  headers.set("etag", `W/"${size.toString(16)}-${mtimeMs.toString(16)}"`);
  if (mtime !== null) headers.set("last-modified", mtime.toUTCString());
  return headers;
}

/**
 * Evaluates If-None-Match (weak comparison) and, only when it is absent,
 * If-Modified-Since, as RFC 9110 section 13.2.2 orders them.
 */
function isNotModified(requestHeaders: Headers, validators: Headers): boolean {
  const ifNoneMatch = requestHeaders.get("if-none-match");
  if (ifNoneMatch !== null) {
    const etag = stripWeakPrefix(validators.get("etag")!);
    return ifNoneMatch.split(",").some((tag) => {
      const trimmed = tag.trim();
      return trimmed === "*" || stripWeakPrefix(trimmed) === etag;
    });
  }

  const ifModifiedSince = requestHeaders.get("if-modified-since");
  const lastModified = validators.get("last-modified");
  if (ifModifiedSince === null || lastModified === null) return false;

  const since = Date.parse(ifModifiedSince);
  // A date later than now is invalid (RFC 9110 section 13.1.3). Taking it would
  // give 304 for a file changed after that date on a client with a wrong clock.
  if (Number.isNaN(since) || since > Date.now()) return false;
  // HTTP dates have whole seconds, so the file's sub-second part must not count.
  return Date.parse(lastModified) <= since;
}

function stripWeakPrefix(tag: string): string {
  return tag.startsWith("W/") ? tag.slice(2) : tag;
}

function contentTypeFor(path: string): string {
  const name = path.slice(path.lastIndexOf("/") + 1);
  const dot = name.lastIndexOf(".");
  if (dot <= 0) return DEFAULT_CONTENT_TYPE;
  return CONTENT_TYPES[name.slice(dot + 1).toLowerCase()] ?? DEFAULT_CONTENT_TYPE;
}

/** An inclusive byte range of a file. */
interface ByteRange {
  start: number;
  end: number;
}

/**
 * Selects the byte range to send: `undefined` for the whole file (no Range, a Range
 * ignored, or an If-Range that does not match), or "unsatisfiable" for 416.
 */
function selectRange(
  requestHeaders: Headers,
  validators: Headers,
  size: number,
): ByteRange | "unsatisfiable" | undefined {
  const rangeHeader = requestHeaders.get("range");
  if (rangeHeader === null) return undefined;

  const ifRange = requestHeaders.get("if-range");
  if (ifRange !== null && ifRange.trim() !== validators.get("last-modified")) return undefined;

  return parseRange(rangeHeader, size);
}

/**
 * Parses a Range header with one byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n`.
 * Returns `undefined` for a header to ignore: another unit, invalid syntax, or several
 * ranges, which this server does not send as multipart/byteranges.
 */
function parseRange(header: string, size: number): ByteRange | "unsatisfiable" | undefined {
  const match = /^bytes=(\d*)-(\d*)$/i.exec(header.trim());
  if (match === null) return undefined;

  const [, first, last] = match;
  if (first === "" && last === "") return undefined;

  if (first === "") {
    const suffixLength = Number(last);
    if (suffixLength === 0 || size === 0) return "unsatisfiable";
    return { start: Math.max(0, size - suffixLength), end: size - 1 };
  }

  const start = Number(first);
  const end = last === "" ? size - 1 : Number(last);
  if (end < start) return last === "" ? "unsatisfiable" : undefined;
  if (start >= size) return "unsatisfiable";
  return { start, end: Math.min(end, size - 1) };
}

/**
 * Streams `length` bytes from the current position of `file`, then closes it. The
 * stream also closes the file when the client goes away (cancel) or a read fails.
 * `onEnd` is called once, with the bytes handed to Deno and, when the body stopped
 * short, the reason.
 */
function streamFile(
  file: Deno.FsFile,
  length: number,
  path: string,
  context: FileContext,
  onEnd: (sent: number, error?: string) => void,
): ReadableStream<Uint8Array> {
  const logger = context.logger;
  let remaining = length;
  let closed = false;
  let cancelled = false;
  let stream: ReadableStreamDefaultController<Uint8Array>;
  const closeFile = (error?: string) => {
    if (closed) return;
    closed = true;
    sendTimer.stop();
    file.close();
    onEnd(length - remaining, error);
  };
  // Deno keeps the connection until the client closes it, but the file closes now.
  const sendTimer = new SendTimer(context.sendTimeoutMs, (reason) => {
    if (closed) return;
    cancelled = true;
    closeFile(reason);
    stream.error(new Error(reason));
    logger.warning(`Stopped sending a static file: ${reason}`, { path: JSON.stringify(path) });
  });

  return new ReadableStream<Uint8Array>({
    start(controller) {
      stream = controller;
    },
    async pull(controller) {
      sendTimer.pullStarted();
      try {
        const buffer = new Uint8Array(Math.min(CHUNK_SIZE, remaining));
        const count = await file.read(buffer);
        if (count === null) {
          // Content-Length is already sent, so erroring the stream makes Deno close the
          // connection instead of sending a short body as if it were complete.
          throw new Error(`File "${path}" became shorter while it was being sent`);
        }
        remaining -= count;
        controller.enqueue(buffer.subarray(0, count));
        if (remaining === 0) {
          closeFile();
          controller.close();
        } else {
          sendTimer.pieceQueued();
        }
      } catch (error) {
        // Closing the file on cancel makes a pending read fail, which is no fault.
        if (cancelled) return;
        closeFile(String(error));
        logger.error("Failed to read a static file", {
          path: JSON.stringify(path),
          error: printable(String(error)),
        });
        controller.error(error);
      }
    },
    cancel() {
      cancelled = true;
      closeFile("client disconnected");
    },
  });
}

/** Maps a filesystem error to a response and logs the ones that need a fix on the server. */
function errorResponse(
  error: unknown,
  alias: UrlAlias,
  rest: string,
  logger: StaticFilesLogger,
): Response {
  const context = { alias: alias.url, path: JSON.stringify(rest) };

  if (error instanceof Deno.errors.NotCapable) {
    logger.warning(
      `Failed to read a static file: Deno has no read permission for "${alias.path}". ` +
        "Start the server with --allow-read for that path",
      context,
    );
    return textResponse(403);
  }

  const code = (error as { code?: unknown })?.code;
  const status = typeof code === "string" ? STATUS_BY_ERROR_CODE[code] : undefined;
  if (status === 403) {
    logger.warning("Failed to read a static file: permission denied", {
      ...context,
      error: printable(String(error)),
    });
  }
  if (status !== undefined) return textResponse(status);

  logger.error("Failed to serve a static file", { ...context, error: printable(String(error)) });
  return textResponse(500);
}

/** Escapes control characters, so a file name cannot break a log line in two. */
function printable(text: string): string {
  // deno-lint-ignore no-control-regex -- matching control characters is the purpose.
  return text.replace(/[\x00-\x1f\x7f]/g, hexEscape);
}

function textResponse(status: number, extraHeaders: Record<string, string> = {}): Response {
  const body = new TextEncoder().encode(STATUS_TEXT[status] + "\n");
  // The length also goes to the access log, which reads it from this header.
  return new Response(body, {
    status,
    headers: {
      "content-type": "text/plain; charset=utf-8",
      "content-length": String(body.length),
      ...extraHeaders,
    },
  });
}
