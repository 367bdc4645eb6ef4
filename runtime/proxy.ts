/**
 * Trusted reverse proxies. A request that comes from one of their addresses
 * has its client's address, scheme, host and port taken from the proxy's
 * X-Forwarded-* headers, as mod_wsgi's WSGITrustedProxies and
 * WSGITrustedProxyHeaders do. Any other request loses those headers, so an
 * application that reads them cannot be fooled by a client that sets them.
 * Other headers for the same purpose, such as X-Real-IP, are dropped from
 * every request, because a proxy passes them on from the client unchanged.
 */

import { hostPort } from "./environ.ts";

/** An IP address as its 4 or 16 bytes. */
type Address = Uint8Array;

/** A range of addresses: the first `bits` bits of `address`; no bytes stand for Unix socket peers. */
export interface AddressRange {
  address: Address;
  bits: number;
  /** The range as given, for messages. */
  text: string;
}

/** Client details that the headers of a trusted proxy carry. */
export interface Forwarded {
  /** The client's address, the nearest one in X-Forwarded-For that is not a trusted proxy. */
  client?: string;
  /** "http" or "https", from X-Forwarded-Proto. */
  scheme?: string;
  /** The Host header the client sent, from X-Forwarded-Host. */
  host?: string;
  /** The port the client connected to, from X-Forwarded-Port, or else from X-Forwarded-Host. */
  port?: string;
}

/** The request headers that trusted proxies set, as environ keys. */
const FORWARDED_KEYS = [
  "HTTP_X_FORWARDED_FOR",
  "HTTP_X_FORWARDED_PROTO",
  "HTTP_X_FORWARDED_HOST",
  "HTTP_X_FORWARDED_PORT",
];

/** Other headers for the client's address or scheme, which the server does not read. */
const ALTERNATE_KEYS = [
  "HTTP_X_REAL_IP",
  "HTTP_X_CLIENT_IP",
  "HTTP_X_FORWARDED_SCHEME",
  "HTTP_X_SCHEME",
  "HTTP_X_FORWARDED_SSL",
  "HTTP_X_FORWARDED_HTTPS",
  "HTTP_X_FORWARDED_PROTOCOL",
];

/** Expected form of a --trusted-proxy value, for error messages. */
export const TRUSTED_PROXY_FORM =
  "an IPv4 or IPv6 address, a range in CIDR form such as 10.0.0.0/8 or fd00::/8, " +
  "or unix for every peer of --unix-socket";

/** The --trusted-proxy value that trusts the peers of a Unix socket, which have no address. */
const UNIX_PEERS = "unix";

/** Parses an IPv4 or IPv6 address; undefined when `text` is not one. */
export function parseAddress(text: string): Address | undefined {
  if (text.includes(":")) return parseIpv6(text);
  return parseIpv4(text);
}

function parseIpv4(text: string): Address | undefined {
  const parts = text.split(".");
  if (parts.length !== 4) return undefined;
  const bytes = new Uint8Array(4);
  for (const [index, part] of parts.entries()) {
    if (!/^(0|[1-9][0-9]{0,2})$/.test(part) || Number(part) > 255) return undefined;
    bytes[index] = Number(part);
  }
  return bytes;
}

function parseIpv6(text: string): Address | undefined {
  // A zone, such as %eth0, names an interface, not a part of the address.
  // Only the characters of interface names are accepted in it, because the
  // text goes on to REMOTE_ADDR and the log.
  const zone = text.indexOf("%");
  if (zone >= 0 && !/^%[A-Za-z0-9._-]{1,32}$/.test(text.slice(zone))) return undefined;
  const address = zone >= 0 ? text.slice(0, zone) : text;
  const halves = address.split("::");
  if (halves.length > 2) return undefined;
  const groups: number[][] = [];
  for (const half of halves) {
    const words: number[] = [];
    const parts = half === "" ? [] : half.split(":");
    for (const [index, part] of parts.entries()) {
      // The last group may be an IPv4 address, as in ::ffff:192.0.2.1.
      if (index === parts.length - 1 && part.includes(".")) {
        const ipv4 = parseIpv4(part);
        if (!ipv4) return undefined;
        words.push(ipv4[0] * 256 + ipv4[1], ipv4[2] * 256 + ipv4[3]);
        continue;
      }
      if (!/^[0-9a-fA-F]{1,4}$/.test(part)) return undefined;
      words.push(parseInt(part, 16));
    }
    groups.push(words);
  }
  const count = groups.reduce((sum, words) => sum + words.length, 0);
  if (halves.length === 1 ? count !== 8 : count > 7) return undefined;

  const words = [...groups[0], ...new Array(8 - count).fill(0), ...(groups[1] ?? [])];
  const bytes = new Uint8Array(16);
  for (const [index, word] of words.entries()) {
    bytes[index * 2] = word >> 8;
    bytes[index * 2 + 1] = word & 0xff;
  }
  return bytes;
}

/** Returns the IPv4 address inside an IPv4-mapped IPv6 address (::ffff:a.b.c.d), or the address itself. */
function unmapped(address: Address): Address {
  if (address.length !== 16) return address;
  for (let i = 0; i < 10; i++) if (address[i] !== 0) return address;
  if (address[10] !== 0xff || address[11] !== 0xff) return address;
  return address.slice(12);
}

/**
 * Parses a --trusted-proxy value: an address, or a range in CIDR form.
 * Returns undefined when `text` is neither.
 */
export function parseAddressRange(text: string): AddressRange | undefined {
  if (text === UNIX_PEERS) return { address: new Uint8Array(0), bits: 0, text };
  const slash = text.indexOf("/");
  const address = parseAddress(slash < 0 ? text : text.slice(0, slash));
  if (!address) return undefined;
  const maxBits = address.length * 8;
  if (slash < 0) return { address: unmapped(address), bits: maxBits, text };
  const prefix = text.slice(slash + 1);
  if (!/^[0-9]{1,3}$/.test(prefix) || Number(prefix) > maxBits) return undefined;
  const bits = Number(prefix);
  const mapped = unmapped(address);
  // A mapped IPv4 range such as ::ffff:10.0.0.0/104 is the IPv4 range 10.0.0.0/8.
  if (mapped.length === 4 && address.length === 16) {
    return bits >= 96 ? { address: mapped, bits: bits - 96, text } : { address, bits, text };
  }
  return { address, bits, text };
}

function inRange(address: Address, range: AddressRange): boolean {
  if (address.length !== range.address.length) return false;
  const whole = Math.floor(range.bits / 8);
  for (let i = 0; i < whole; i++) if (address[i] !== range.address[i]) return false;
  const rest = range.bits % 8;
  if (rest === 0) return true;
  const mask = (0xff << (8 - rest)) & 0xff;
  return (address[whole] & mask) === (range.address[whole] & mask);
}

/**
 * Returns the address of an X-Forwarded-For entry without the port or
 * brackets that some proxies add ("192.0.2.1:4711", "[2001:db8::1]:80").
 */
function entryAddress(entry: string): string {
  if (entry.startsWith("[")) {
    const end = entry.indexOf("]");
    return end > 0 ? entry.slice(1, end) : entry;
  }
  const colon = entry.indexOf(":");
  if (colon > 0 && entry.indexOf(":", colon + 1) < 0) return entry.slice(0, colon);
  return entry;
}

/** Returns the last item of a comma-separated header, which the nearest proxy added. */
function lastItem(value: string | null): string | undefined {
  if (value === null) return undefined;
  const item = value.slice(value.lastIndexOf(",") + 1).trim();
  return item === "" ? undefined : item;
}

/** The trusted proxies of a server (--trusted-proxy). */
export class TrustedProxies {
  readonly ranges: readonly AddressRange[];

  constructor(ranges: readonly AddressRange[]) {
    this.ranges = ranges;
  }

  /** Whether any proxy is trusted; without one, requests keep their headers as they came. */
  get enabled(): boolean {
    return this.ranges.length > 0;
  }

  /** Returns whether the peer at `address` is a trusted proxy; "" is a peer of a Unix socket. */
  trusts(address: string): boolean {
    if (address === "") return this.ranges.some((range) => range.text === UNIX_PEERS);
    const parsed = parseAddress(address);
    if (!parsed) return false;
    const plain = unmapped(parsed);
    return this.ranges.some((range) => inRange(plain, range));
  }

  /**
   * Reads the forwarding headers of a request that came from `peer`.
   * Returns undefined when the peer is not a trusted proxy. A header whose
   * value is not valid is left out, and `onInvalid` names it.
   */
  resolve(
    peer: string,
    headers: Headers,
    onInvalid: (header: string, value: string) => void,
  ): Forwarded | undefined {
    if (!this.trusts(peer)) return undefined;
    const forwarded: Forwarded = {};

    const chain = headers.get("x-forwarded-for");
    if (chain !== null) {
      const entries = chain.split(",").map((entry) => entryAddress(entry.trim()));
      // Each proxy appends the address it got the request from, so the client is the
      // nearest address that is not itself a trusted proxy.
      let client: string | undefined;
      for (let i = entries.length - 1; i >= 0; i--) {
        client = entries[i];
        if (!this.trusts(client)) break;
      }
      if (client !== undefined && parseAddress(client)) {
        forwarded.client = client;
      } else {
        onInvalid("X-Forwarded-For", chain);
      }
    }

    const proto = lastItem(headers.get("x-forwarded-proto"))?.toLowerCase();
    if (proto === "http" || proto === "https") {
      forwarded.scheme = proto;
    } else if (proto !== undefined) {
      onInvalid("X-Forwarded-Proto", headers.get("x-forwarded-proto")!);
    }

    const host = lastItem(headers.get("x-forwarded-host"));
    if (host !== undefined && /^[A-Za-z0-9._~!$&'()*+;=:[\]-]+$/.test(host)) {
      forwarded.host = host;
    } else if (host !== undefined) {
      onInvalid("X-Forwarded-Host", headers.get("x-forwarded-host")!);
    }

    const portHeader = headers.get("x-forwarded-port");
    const port = portHeader !== null ? lastItem(portHeader) : hostPort(forwarded.host ?? null);
    if (port !== undefined && /^[0-9]{1,5}$/.test(port) && Number(port) <= 65535) {
      forwarded.port = String(Number(port));
    } else if (port !== undefined) {
      if (portHeader !== null) onInvalid("X-Forwarded-Port", portHeader);
      else onInvalid("X-Forwarded-Host", forwarded.host!);
    }
    return forwarded;
  }

  /**
   * Applies what a trusted proxy forwarded to an environ, or, for a request
   * from elsewhere (`forwarded` undefined), removes the forwarding headers.
   * Alternate headers go in both cases.
   */
  apply(
    environ: Record<string, string>,
    forwarded: Forwarded | undefined,
    serverName: (host: string) => string,
  ): void {
    for (const key of ALTERNATE_KEYS) delete environ[key];
    if (!forwarded) {
      for (const key of FORWARDED_KEYS) delete environ[key];
      return;
    }
    if (forwarded.client !== undefined) environ.REMOTE_ADDR = forwarded.client;
    if (forwarded.scheme !== undefined) {
      environ["wsgi.url_scheme"] = forwarded.scheme;
      if (forwarded.scheme === "https") environ.HTTPS = "on";
    }
    if (forwarded.host !== undefined) {
      environ.HTTP_HOST = forwarded.host;
      environ.SERVER_NAME = serverName(forwarded.host);
    }
    if (forwarded.port !== undefined) environ.SERVER_PORT = forwarded.port;
  }
}
