/**
 * The access log's formats: each directive, the named formats and the
 * errors for directives that are not supported.
 */

import assert from "node:assert/strict";
import {
  AccessLogFormatError,
  type AccessRecord,
  compileAccessLogFormat,
  NAMED_FORMATS,
} from "../../runtime/access_log.ts";

/** Returns a request as the server saw it, which arrived 1500 ms ago, on 6 Dec 2026 at 09:05:03 UTC. */
function record(overrides: Partial<AccessRecord> = {}, headers: HeadersInit = {}): AccessRecord {
  return {
    request: new Request("http://127.0.0.1:8000/shop/cart?item=7", { method: "POST", headers }),
    uri: "/shop/cart?item=7",
    remote: "127.0.0.2",
    client: "192.0.2.9",
    serverPort: 8000,
    response: { status: 201, bytes: 42 },
    arrivalWallMs: Date.UTC(2026, 11, 6, 9, 5, 3, 999),
    arrivalMs: performance.now() - 1500,
    requestId: "ab12-7",
    ...overrides,
  };
}

Deno.test("access log directives", () => {
  const line = compileAccessLogFormat("%a|%h|%l|%t|%r|%m|%U|%q|%H|%s|%>s|%b|%B|%L|%p|%P|100%%")(
    record(),
  );
  assert.equal(
    line,
    "192.0.2.9|127.0.0.2|-|[06/Dec/2026:09:05:03 +0000]|POST /shop/cart?item=7 HTTP/1.1|POST|" +
      `/shop/cart|?item=7|HTTP/1.1|201|201|42|42|ab12-7|8000|${Deno.pid}|100%`,
  );
});

Deno.test("access log durations", () => {
  const [micros, seconds] = compileAccessLogFormat("%D %T")(record()).split(" ").map(Number);
  assert.ok(micros >= 1_500_000, String(micros));
  assert.ok(micros < 60_000_000, String(micros));
  assert.equal(seconds, Math.floor(micros / 1_000_000));
});

Deno.test("access log empty parts", () => {
  const format = compileAccessLogFormat("%q|%b|%B|%u|%{Referer}i");
  const noQuery = record({ uri: "/shop" });
  assert.equal(format(noQuery), "|42|42|-|-");
  // A HEAD response sends no body, whatever the application returned.
  const head = record({ request: new Request("http://127.0.0.1:8000/", { method: "HEAD" }) });
  assert.equal(format(head).split("|").slice(1, 3).join("|"), "-|0");
});

Deno.test("access log modifiers", () => {
  // Apache's < and > after the % change nothing here: a request has one status.
  const line = compileAccessLogFormat("%<s %>s %>{X-Id}i")(record({}, { "X-Id": "7" }));
  assert.equal(line, "201 201 7");
});

Deno.test("access log headers and user", () => {
  const headers = {
    "X-Trace": 'a"b\\c',
    Referer: "http://example.test/\u00e9",
    Authorization: "Basic " + btoa("alice:secret:with:colons"),
  };
  const line = compileAccessLogFormat("%{x-trace}i %{Referer}i %u %a")(
    record({ client: 'fe80::1%" x' }, headers),
  );
  // Quotes and backslashes get a backslash, and bytes outside printable ASCII become \xhh.
  assert.equal(line, 'a\\"b\\\\c http://example.test/\\xe9 alice fe80::1%\\" x');

  const bearer = compileAccessLogFormat("%u")(record({}, { Authorization: "Bearer x" }));
  assert.equal(bearer, "-");
  const broken = compileAccessLogFormat("%u")(record({}, { Authorization: "Basic !!!" }));
  assert.equal(broken, "-");
});

Deno.test("access log named formats", () => {
  const common = compileAccessLogFormat("common")(record());
  assert.equal(
    common,
    '127.0.0.2 - - [06/Dec/2026:09:05:03 +0000] "POST /shop/cart?item=7 HTTP/1.1" 201 42',
  );
  const combined = compileAccessLogFormat("combined")(record({}, { "User-Agent": "curl/8" }));
  assert.equal(combined, common + ' "-" "curl/8"');
  const fallback = compileAccessLogFormat("default")(record());
  assert.match(fallback, /^127\.0\.0\.2 - - \[.*\] "POST .*" 201 42 "-" "-" \d+ ab12-7$/);
  assert.deepEqual(Object.keys(NAMED_FORMATS), ["common", "combined", "default"]);
});

Deno.test("access log format errors", () => {
  const cases: [string, string][] = [
    ["%h %Z", "'%Z' is not supported"],
    ["%{X-Id}o", "'%{X-Id}o' is not supported: only %{Header}i takes a name"],
    ["%{}i", "'%{}i' is not supported: only %{Header}i takes a name"],
    ["%h %{Referer", "'%{Referer' has no closing '}'"],
    ["%h %", "'%' ends the format"],
    ["%{a b}i", "'%{a b}i' names no valid header: 'a b' is not a header name"],
    ["%{X-Id}>i", "'%{X-Id}>' is not supported: only %{Header}i takes a name"],
    ["", "an empty format writes empty lines"],
  ];
  for (const [format, message] of cases) {
    assert.throws(
      () => compileAccessLogFormat(format),
      (error: unknown) => error instanceof AccessLogFormatError && error.message === message,
      format,
    );
  }
});
