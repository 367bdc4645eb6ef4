/**
 * Trusted proxies: parsing of addresses and ranges, and what the
 * X-Forwarded-* headers of a request change in its environ.
 */

import assert from "node:assert/strict";
import {
  type Forwarded,
  parseAddress,
  parseAddressRange,
  TrustedProxies,
} from "../../runtime/proxy.ts";

function proxies(...ranges: string[]): TrustedProxies {
  return new TrustedProxies(ranges.map((text) => parseAddressRange(text)!));
}

/** Returns what `resolve` made of `headers` and the invalid headers it reported. */
function resolve(
  trusted: TrustedProxies,
  peer: string,
  headers: Record<string, string>,
): { forwarded: Forwarded | undefined; invalid: string[] } {
  const invalid: string[] = [];
  const forwarded = trusted.resolve(
    peer,
    new Headers(headers),
    (header, value) => invalid.push(`${header}: ${value}`),
  );
  return { forwarded, invalid };
}

Deno.test("proxy address parsing", () => {
  assert.deepEqual(parseAddress("192.0.2.1"), new Uint8Array([192, 0, 2, 1]));
  assert.deepEqual(
    parseAddress("2001:db8::1"),
    new Uint8Array([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
  );
  assert.deepEqual(parseAddress("::"), new Uint8Array(16));
  assert.deepEqual(parseAddress("fe80::1%eth0")?.[15], 1);
  // A zone with other characters would carry them into REMOTE_ADDR.
  assert.equal(parseAddress("::1%<script>"), undefined);
  assert.equal(parseAddress('fe80::1%" x'), undefined);
  assert.equal(parseAddress("fe80::1%"), undefined);
  assert.deepEqual(
    parseAddress("::ffff:10.1.2.3")?.slice(10),
    new Uint8Array([255, 255, 10, 1, 2, 3]),
  );
  for (
    const bad of [
      "",
      "1.2.3",
      "1.2.3.4.5",
      "256.1.1.1",
      "01.2.3.4",
      "1:2:3",
      "1::2::3",
      "g::1",
      "1:2:3:4:5:6:7:8:9",
      "localhost",
    ]
  ) {
    assert.equal(parseAddress(bad), undefined, bad);
  }
});

Deno.test("proxy range parsing", () => {
  assert.equal(parseAddressRange("10.0.0.0/8")?.bits, 8);
  assert.equal(parseAddressRange("10.0.0.1")?.bits, 32);
  assert.equal(parseAddressRange("fd00::/8")?.bits, 8);
  assert.equal(parseAddressRange("::1")?.bits, 128);
  // An IPv4-mapped range is the IPv4 range.
  assert.deepEqual(
    parseAddressRange("::ffff:10.0.0.0/104")?.address,
    new Uint8Array([10, 0, 0, 0]),
  );
  assert.equal(parseAddressRange("::ffff:10.0.0.0/104")?.bits, 8);
  for (
    const bad of [
      "10.0.0.0/33",
      "10.0.0.0/",
      "10.0.0.0/-1",
      "fd00::/129",
      "10.0.0.0/8/8",
      "proxy.local",
    ]
  ) {
    assert.equal(parseAddressRange(bad), undefined, bad);
  }
});

Deno.test("proxy trust by range", () => {
  const trusted = proxies("10.0.0.0/8", "192.0.2.7", "fd00::/8", "172.16.0.0/12");
  assert.ok(trusted.trusts("10.200.3.4"));
  assert.ok(trusted.trusts("192.0.2.7"));
  assert.ok(trusted.trusts("fd12::5"));
  assert.ok(trusted.trusts("172.31.255.255"));
  // A listener on :: gets IPv4 peers as IPv4-mapped addresses.
  assert.ok(trusted.trusts("::ffff:10.0.0.1"));
  assert.ok(!trusted.trusts("192.0.2.8"));
  assert.ok(!trusted.trusts("11.0.0.1"));
  assert.ok(!trusted.trusts("172.32.0.1"));
  assert.ok(!trusted.trusts("fe80::1"));
  assert.ok(!trusted.trusts("not an address"));
  // A peer of a Unix socket has no address, and only "unix" trusts it.
  assert.ok(!trusted.trusts(""));
  assert.ok(proxies("unix").trusts(""));
  assert.ok(!proxies("unix").trusts("127.0.0.1"));
});

Deno.test("proxy untrusted peer", () => {
  const { forwarded } = resolve(proxies("127.0.0.1"), "192.0.2.50", {
    "X-Forwarded-For": "203.0.113.9",
  });
  assert.equal(forwarded, undefined);
});

Deno.test("proxy client from chain", () => {
  const trusted = proxies("127.0.0.1", "10.0.0.0/8");
  // The client is the nearest address that is not a trusted proxy. Addresses that a
  // client wrote itself at the start of the chain do not count.
  const chain = resolve(trusted, "127.0.0.1", {
    "X-Forwarded-For": "6.6.6.6, 203.0.113.9, 10.1.1.1",
  });
  assert.equal(chain.forwarded?.client, "203.0.113.9");
  const withPorts = resolve(trusted, "127.0.0.1", {
    "X-Forwarded-For": "[2001:db8::7]:443, 10.1.1.1:5000",
  });
  assert.equal(withPorts.forwarded?.client, "2001:db8::7");
  const ported = resolve(trusted, "127.0.0.1", { "X-Forwarded-For": "198.51.100.4:61000" });
  assert.equal(ported.forwarded?.client, "198.51.100.4");
  const allTrusted = resolve(trusted, "127.0.0.1", { "X-Forwarded-For": "10.0.0.5, 10.0.0.6" });
  assert.equal(allTrusted.forwarded?.client, "10.0.0.5");
  const bad = resolve(trusted, "127.0.0.1", { "X-Forwarded-For": "10.0.0.5, unknown" });
  assert.equal(bad.forwarded?.client, undefined);
  assert.deepEqual(bad.invalid, ["X-Forwarded-For: 10.0.0.5, unknown"]);
});

Deno.test("proxy scheme host and port", () => {
  const trusted = proxies("127.0.0.1");
  const { forwarded, invalid } = resolve(trusted, "127.0.0.1", {
    "X-Forwarded-Proto": "http, HTTPS",
    "X-Forwarded-Host": "shop.example.test",
    "X-Forwarded-Port": "0443",
  });
  assert.deepEqual(forwarded, { scheme: "https", host: "shop.example.test", port: "443" });
  assert.deepEqual(invalid, []);

  const fromHost = resolve(trusted, "127.0.0.1", { "X-Forwarded-Host": "[2001:db8::1]:8443" });
  assert.equal(fromHost.forwarded?.port, "8443");
  const noPort = resolve(trusted, "127.0.0.1", { "X-Forwarded-Host": "[2001:db8::1]" });
  assert.equal(noPort.forwarded?.port, undefined);

  const wrong = resolve(trusted, "127.0.0.1", {
    "X-Forwarded-Proto": "gopher",
    "X-Forwarded-Host": "bad host/x",
    "X-Forwarded-Port": "99999",
  });
  assert.deepEqual(wrong.forwarded, {});
  assert.deepEqual(wrong.invalid, [
    "X-Forwarded-Proto: gopher",
    "X-Forwarded-Host: bad host/x",
    "X-Forwarded-Port: 99999",
  ]);
});

Deno.test("proxy environ changes", () => {
  const trusted = proxies("127.0.0.1");
  const base = () => ({
    REMOTE_ADDR: "127.0.0.1",
    SERVER_NAME: "127.0.0.1",
    SERVER_PORT: "8000",
    HTTP_HOST: "127.0.0.1:8000",
    "wsgi.url_scheme": "http",
    HTTP_X_FORWARDED_FOR: "203.0.113.9",
    HTTP_X_FORWARDED_PROTO: "https",
    HTTP_X_FORWARDED_HOST: "shop.example.test",
    HTTP_X_FORWARDED_PORT: "443",
    HTTP_X_OTHER: "kept",
    HTTP_X_REAL_IP: "6.6.6.6",
    HTTP_X_FORWARDED_SSL: "on",
  });
  const serverName = (host: string) => host.split(":")[0];

  const environ: Record<string, string> = base();
  trusted.apply(
    environ,
    { client: "203.0.113.9", scheme: "https", host: "shop.example.test:443", port: "443" },
    serverName,
  );
  assert.equal(environ.REMOTE_ADDR, "203.0.113.9");
  assert.equal(environ["wsgi.url_scheme"], "https");
  assert.equal(environ.HTTPS, "on");
  assert.equal(environ.HTTP_HOST, "shop.example.test:443");
  assert.equal(environ.SERVER_NAME, "shop.example.test");
  assert.equal(environ.SERVER_PORT, "443");
  // The headers stay for applications that read them, but not the alternate ones.
  assert.equal(environ.HTTP_X_FORWARDED_FOR, "203.0.113.9");
  assert.equal(environ.HTTP_X_REAL_IP, undefined);
  assert.equal(environ.HTTP_X_FORWARDED_SSL, undefined);

  // From elsewhere, the forwarding headers go too, and nothing else changes.
  const stripped: Record<string, string> = base();
  trusted.apply(stripped, undefined, serverName);
  assert.deepEqual(stripped, {
    REMOTE_ADDR: "127.0.0.1",
    SERVER_NAME: "127.0.0.1",
    SERVER_PORT: "8000",
    HTTP_HOST: "127.0.0.1:8000",
    "wsgi.url_scheme": "http",
    HTTP_X_OTHER: "kept",
  });
});
