/**
 * Builds the CGI part of a WSGI environ from a Deno request.
 *
 * Deno gives the request target only inside `req.url`, as "http://" plus the
 * Host header plus the raw target, with valid UTF-8 bytes already decoded to
 * characters. Parsing `req.url` with `URL` would resolve dot segments, turn
 * "\" into "/" and let a crafted Host move the path, so the raw target is cut
 * out by its known prefix instead and decoded here exactly once.
 */

const encoder = new TextEncoder();

/** Addresses of the connection, for the SERVER_* and REMOTE_* keys. */
export interface ConnectionInfo {
  serverName: string;
  serverPort: number;
  remoteAddr: string;
  /** The client's port; unset on a Unix socket, where REMOTE_PORT is left out. */
  remotePort: number | undefined;
  /** "https" when the server has a TLS certificate. */
  scheme: "http" | "https";
  /** The host the request names (see requestHost), which HTTP/2 sends in no header. */
  host?: string | null;
}

/** The request target split into its raw parts, as strings of byte values 0-255. */
export interface RawTarget {
  /** The raw path, still percent-encoded. */
  path: string;
  /** The raw query without "?", or "". */
  query: string;
  /** Path and query as sent ("/a%2Fb?x=1"). */
  uri: string;
  /**
   * The raw path as Deno gives it, with raw UTF-8 bytes as their characters
   * ("/caf\u00e9" where `path` has "/caf\u00c3\u00a9"), for names that a user
   * configured, such as alias URLs and file names.
   */
  text: string;
}

// deno-lint-ignore no-control-regex -- the range is all of ASCII, NUL included
const NON_ASCII = /[^\x00-\x7f]/;

/** Returns the Latin-1 view of a string's UTF-8 bytes (one character per byte). */
function latin1OfUtf8(text: string): string {
  // ASCII is the common case and needs no work.
  if (!NON_ASCII.test(text)) return text;
  let out = "";
  for (const byte of encoder.encode(text)) out += String.fromCharCode(byte);
  return out;
}

/**
 * Cuts the raw request target out of `req.url`.
 * `host` is the Host header, or null when the request had none.
 */
export function rawTarget(
  url: string,
  host: string | null,
  listenPort: number,
  scheme = "http",
): RawTarget {
  const prefix = `${scheme}://` + (host ? host : `localhost:${listenPort}`);
  let target: string;
  if (
    url.startsWith(prefix) && (url.length === prefix.length || "/?*".includes(url[prefix.length]))
  ) {
    target = url.slice(prefix.length);
  } else {
    // Absolute-form request target ("GET http://other/x"): drop scheme and authority.
    const afterScheme = url.indexOf("://");
    const rest = afterScheme >= 0 ? url.slice(afterScheme + 3) : url;
    const pathStart = rest.search(/[/?]/);
    target = pathStart >= 0 ? rest.slice(pathStart) : "/";
  }
  if (target === "" || target.startsWith("?")) target = "/" + target;

  const hash = target.indexOf("#");
  if (hash >= 0) target = target.slice(0, hash);
  const uri = latin1OfUtf8(target);
  const question = uri.indexOf("?");
  const textEnd = target.indexOf("?");
  const text = textEnd >= 0 ? target.slice(0, textEnd) : target;
  return question >= 0
    ? { path: uri.slice(0, question), query: uri.slice(question + 1), uri, text }
    : { path: uri, query: "", uri, text };
}

function hexValue(code: number): number {
  if (code >= 48 && code <= 57) return code - 48;
  const lower = code | 0x20;
  if (lower >= 97 && lower <= 102) return lower - 87;
  return -1;
}

/**
 * Percent-decodes a raw path once. The result has one character per byte
 * (the Latin-1 view PEP 3333 asks for); invalid escapes stay as they are.
 */
export function decodePath(rawPath: string): string {
  if (!rawPath.includes("%")) return rawPath;
  let out = "";
  for (let i = 0; i < rawPath.length; i++) {
    const char = rawPath[i];
    if (char === "%" && i + 2 < rawPath.length) {
      const high = hexValue(rawPath.charCodeAt(i + 1));
      const low = hexValue(rawPath.charCodeAt(i + 2));
      if (high >= 0 && low >= 0) {
        out += String.fromCharCode(high * 16 + low);
        i += 2;
        continue;
      }
    }
    out += char;
  }
  return out;
}

/**
 * Splits a decoded path at a mount point. Returns [SCRIPT_NAME, PATH_INFO],
 * or undefined when the path is outside the mount. A mount matches only at a
 * segment boundary: "/app" serves "/app" and "/app/x", never "/application".
 */
export function splitMount(path: string, mountPoint: string): [string, string] | undefined {
  if (mountPoint === "") return ["", path];
  if (path === mountPoint) return [mountPoint, ""];
  if (path.startsWith(mountPoint + "/")) return [mountPoint, path.slice(mountPoint.length)];
  return undefined;
}

/** Request headers whose WSGI keys have no HTTP_ prefix. */
const UNPREFIXED: Record<string, string> = {
  "content-type": "CONTENT_TYPE",
  "content-length": "CONTENT_LENGTH",
};

/**
 * Builds the string-valued environ keys of a request. The Python adapter adds
 * the `wsgi.*` objects.
 */
export function buildEnviron(
  request: Request,
  target: RawTarget,
  scriptName: string,
  pathInfo: string,
  connection: ConnectionInfo,
): Record<string, string> {
  const environ: Record<string, string> = {
    REQUEST_METHOD: request.method,
    SCRIPT_NAME: scriptName,
    PATH_INFO: pathInfo,
    QUERY_STRING: target.query,
    REQUEST_URI: target.uri,
    // Deno.serve does not tell the handler the HTTP version of the request.
    SERVER_PROTOCOL: "HTTP/1.1",
    SERVER_NAME: connection.serverName,
    SERVER_PORT: String(connection.serverPort),
    REMOTE_ADDR: connection.remoteAddr,
    "wsgi.url_scheme": connection.scheme,
  };
  if (connection.remotePort !== undefined) environ.REMOTE_PORT = String(connection.remotePort);
  if (connection.scheme === "https") environ.HTTPS = "on";

  for (const [name, value] of request.headers) {
    const plain = UNPREFIXED[name];
    if (plain) {
      environ[plain] = value;
      continue;
    }
    // "X_Auth" and "X-Auth" would both become HTTP_X_AUTH; a name with "_"
    // could overwrite a header a proxy set, so it is dropped (as nginx and
    // Apache 2.4 do).
    if (name.includes("_")) continue;
    environ["HTTP_" + name.toUpperCase().replaceAll("-", "_")] = value;
  }
  // HTTP/2 carries the host in :authority, which is no header.
  if (connection.host && environ.HTTP_HOST === undefined) environ.HTTP_HOST = connection.host;
  return environ;
}

/**
 * Returns the host that a request names: its Host header, or over TLS,
 * where clients speak HTTP/2 and send no Host header, the :authority that
 * Deno puts in the request's URL.
 *
 * NOTE: an HTTP/1.0 request over TLS without a Host header gets Deno's
 * stand-in "localhost:PORT" in its URL, which then counts as its host.
 */
export function requestHost(request: Request, tls: boolean): string | null {
  const header = request.headers.get("host");
  if (header !== null || !tls) return header;
  return new URL(request.url).host;
}

/** Returns the port of a Host value ("example.test:8443", "[2001:db8::1]:8443"), if it has one. */
export function hostPort(host: string | null): string | undefined {
  if (host === null) return undefined;
  const colon = host.lastIndexOf(":");
  if (colon < 0 || host.lastIndexOf("]") > colon) return undefined;
  return host.slice(colon + 1);
}

/**
 * Returns SERVER_PORT for a request on a Unix socket, which has no port of
 * its own: the port of the Host header, else the scheme's default.
 */
export function unixServerPort(host: string | null, scheme: string): number {
  const port = hostPort(host);
  if (port !== undefined && /^[0-9]{1,5}$/.test(port) && Number(port) <= 65535) {
    return Number(port);
  }
  return scheme === "https" ? 443 : 80;
}

/** Takes SERVER_NAME from the Host header (without its port), as mod_wsgi does by default. */
export function serverName(host: string | null, fallback: string): string {
  if (!host) return fallback;
  if (host.startsWith("[")) {
    const end = host.indexOf("]");
    return end > 0 ? host.slice(0, end + 1) : host;
  }
  const colon = host.lastIndexOf(":");
  return colon >= 0 ? host.slice(0, colon) : host;
}
