/**
 * The repository's own source: formatted by `deno fmt` and free of `deno
 * lint` findings, with the settings of deno.json, so that a contributor who
 * runs either tool changes only the lines of their own change.
 */

import assert from "node:assert/strict";

const root = new URL("..", import.meta.url);

async function runDeno(...args: string[]): Promise<{ code: number; output: string }> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: root,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return { code, output: decoder.decode(stdout) + decoder.decode(stderr) };
}

Deno.test("source is formatted by deno fmt", async () => {
  const { code, output } = await runDeno("fmt", "--check");
  assert.equal(code, 0, `run 'deno fmt' to format these files:\n${output}`);
});

Deno.test("source passes deno lint", async () => {
  const { code, output } = await runDeno("lint");
  assert.equal(code, 0, output);
});
