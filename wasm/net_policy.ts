/**
 * The outbound network policy of an application: which hosts and ports its
 * isolates may connect to (`--allow-net HOST[:PORT]`). Nothing is allowed
 * unless listed.
 *
 * Hosts match literally, without resolving names, as Deno's own net
 * permission does: `localhost` and `127.0.0.1` are different entries.
 */

/** One `--allow-net` entry. */
export interface NetAllowEntry {
  /** Lowercase host name or IP address, IPv6 without brackets. */
  host: string;
  /** The only port allowed, or undefined for every port. */
  port?: number;
}

const HOST_NAME = /^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$/;
const IPV4 = /^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$/;
const IPV6 = /^[0-9a-f:.]+$/;

/**
 * Parses one `--allow-net` value: `HOST`, `HOST:PORT`, `[IPV6]` or `[IPV6]:PORT`.
 *
 * @throws {RangeError} The value is not a host with an optional port from 1 to 65535.
 */
export function parseNetAllowEntry(value: string): NetAllowEntry {
  const text = value.trim().toLowerCase();
  const bracketed = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  let host: string;
  let portText: string | undefined;
  if (bracketed) {
    [, host, portText] = bracketed;
    if (!IPV6.test(host) || !host.includes(":")) throw invalidEntry(value);
  } else if ((text.match(/:/g) ?? []).length > 1) {
    throw invalidEntry(value, "write an IPv6 address in brackets, such as [::1]:5432");
  } else {
    [host, portText] = text.split(":");
    if (!IPV4.test(host) && !HOST_NAME.test(host)) throw invalidEntry(value);
  }
  if (portText === undefined) return { host };

  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port < 1 || port > 65535) {
    throw invalidEntry(value, "the port must be a number from 1 to 65535");
  }
  return { host, port };
}

/** An --allow-net value or allow-net key that is not a valid entry. */
export class NetEntryError extends RangeError {
  /** The accepted form, with a hint about what is wrong where there is one. */
  readonly expected: string;

  constructor(value: string, expected: string, setting = "--allow-net") {
    super(`invalid value for ${setting}: '${value}' (expected ${expected})`);
    this.expected = expected;
  }
}

function invalidEntry(value: string, hint?: string): NetEntryError {
  const expected = "HOST, HOST:PORT or [IPV6]:PORT, such as db.example.com:5432" +
    (hint ? `; ${hint}` : "");
  return new NetEntryError(value, expected);
}

/** Formats an entry or address the way `--allow-net` takes it. */
export function formatNetAddress(host: string, port?: number): string {
  const bracketed = host.includes(":") ? `[${host}]` : host;
  return port === undefined ? bracketed : `${bracketed}:${port}`;
}

/** Reports whether `host` is an IPv4 or IPv6 address rather than a name. */
export function isIpAddress(host: string): boolean {
  return IPV4.test(host) || (host.includes(":") && IPV6.test(host.toLowerCase()));
}

/** The allow list of one application, checked before every connection. */
export class NetPolicy {
  readonly entries: readonly NetAllowEntry[];

  constructor(values: readonly string[]) {
    this.entries = values.map(parseNetAllowEntry);
  }

  /** Reports whether a connection to `host` (a name or an address as given) and `port` is allowed. */
  allows(host: string, port: number): boolean {
    const wanted = normalizeHost(host);
    return this.entries.some((entry) =>
      entry.host === wanted && (entry.port === undefined || entry.port === port)
    );
  }

  /** Reports whether some entry names `host`, with any port. Resolving a name needs this. */
  allowsHost(host: string): boolean {
    const wanted = normalizeHost(host);
    return this.entries.some((entry) => entry.host === wanted);
  }
}

function normalizeHost(host: string): string {
  const lower = host.toLowerCase();
  return lower.startsWith("[") && lower.endsWith("]") ? lower.slice(1, -1) : lower;
}
