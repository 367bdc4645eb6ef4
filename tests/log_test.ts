/**
 * The logger's lines, and log helpers: the one-line summary of a Python
 * traceback that a second log line about the same failure shows instead of
 * the whole traceback.
 */

import assert from "node:assert/strict";
import { Logger, plural, tracebackSummary } from "../supervisor/log.ts";

Deno.test("traceback summary names the exception", () => {
  const text = [
    "PythonError: Traceback (most recent call last):",
    '  File "/lib/loader.py", line 69, in load_application',
    "    module = _load_script(settings.script_path)",
    '  File "/srv/app.wsgi", line 1, in <module>',
    "    import missing_module",
    "ModuleNotFoundError: No module named 'missing_module'",
  ].join("\n");

  assert.equal(tracebackSummary(text), "ModuleNotFoundError: No module named 'missing_module'");
});

Deno.test("traceback summary skips message lines and notes", () => {
  const longMessage = [
    "Traceback (most recent call last):",
    '  File "/srv/app.wsgi", line 3, in <module>',
    '    raise RuntimeError("first line\\nsecond line")',
    "RuntimeError: first line",
    "second line",
  ].join("\n");
  const withNote = [
    "Traceback (most recent call last):",
    '  File "/srv/app.wsgi", line 3, in <module>',
    '    raise KeyError("PORT")',
    "KeyError: 'PORT'",
    "while reading the settings",
  ].join("\n");

  assert.equal(tracebackSummary(longMessage), "RuntimeError: first line");
  assert.equal(tracebackSummary(withNote), "KeyError: 'PORT'");
});

Deno.test("traceback summary of an exception group", () => {
  const text = [
    "  + Exception Group Traceback (most recent call last):",
    '  |   File "/srv/app.wsgi", line 2, in <module>',
    '  |     raise ExceptionGroup("several", [ValueError(1)])',
    "  | ExceptionGroup: several (1 sub-exception)",
    "  +-+---------------- 1 ----------------",
    "    | ValueError: 1",
    "    +------------------------------------",
  ].join("\n");

  assert.equal(tracebackSummary(text), "ExceptionGroup: several (1 sub-exception)");
});

Deno.test("traceback summary needs a traceback", () => {
  assert.equal(tracebackSummary("no import within 60 s"), undefined);
});

Deno.test("plural of count and noun", () => {
  const cases: [number, string, string][] = [
    [0, "request", "0 requests"],
    [1, "request", "1 request"],
    [2, "running request", "2 running requests"],
    [1, "process", "1 process"],
    [2, "fresh process", "2 fresh processes"],
  ];
  for (const [count, noun, expected] of cases) assert.equal(plural(count, noun), expected);
});

Deno.test("logger prefixes every line of a message", () => {
  const written: string[] = [];
  const logger = new Logger("info", { app: "a.wsgi" }, (line) => written.push(line));
  logger.error("failed:\nTraceback\r\n  File x\rline\n\n");

  assert.equal(written.length, 1);
  const lines = written[0].split("\n");
  // A trailing line break adds no empty line, and a lone carriage return breaks the line.
  assert.deepEqual(lines.map((line) => line.replace(/^\S+ /, "")), [
    "ERROR [app=a.wsgi] failed:",
    "ERROR [app=a.wsgi] Traceback",
    "ERROR [app=a.wsgi]   File x",
    "ERROR [app=a.wsgi] line",
  ]);
});

Deno.test("logger escapes control characters", () => {
  const written: string[] = [];
  const logger = new Logger("info", {}, (line) => written.push(line));
  logger.error("\x1b[2Jcleared\x00screen\tand tab\nnext");

  const lines = written[0].split("\n").map((line) => line.replace(/^\S+ ERROR /, ""));
  assert.deepEqual(lines, ["\\x1b[2Jcleared\\x00screen\tand tab", "next"]);
});
