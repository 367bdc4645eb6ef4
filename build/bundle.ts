/**
 * Bundles wsgirun into `dist/` with esbuild: `wsgirun.js` (the entry) and
 * `isolate_worker.js` (the isolate's worker, loaded next to it).
 *
 * The bundle runs with `deno run --allow-all dist/wsgirun.js`. Pyodide stays
 * an npm dependency that Deno installs on first run, because its wasm and
 * standard library files are read from the package folder at run time.
 */

import * as esbuild from "esbuild";
import { PYODIDE_SPECIFIER } from "../supervisor/app_spec.ts";

const root = new URL("../", import.meta.url).pathname;
const outdir = Deno.args[0] ?? root + "dist";

/** Points the isolate worker URL at the bundled sibling file. */
const workerUrlPlugin: esbuild.Plugin = {
  name: "isolate-worker-url",
  setup(build) {
    build.onLoad({ filter: /supervisor[\\/]worker_url\.ts$/ }, () => ({
      contents:
        'export const ISOLATE_WORKER_URL = new URL("./isolate_worker.js", import.meta.url);\n' +
        'export const SHIPPED_SNAPSHOTS_URL = new URL("./snapshots/", import.meta.url);',
      loader: "ts",
    }));
  },
};

/**
 * Literal imports of every Pyodide package, put at the top of each output file and never run.
 * The main thread finds Pyodide's folder with import.meta.resolve(), which returns the bare
 * npm: specifier unless a literal import puts the package into Deno's module graph. This
 * matters when the bundle runs outside this repository, where no node_modules folder applies.
 * esbuild would drop such dead code from the source, so it goes into the banner.
 */
const pyodideImports = Object.values(PYODIDE_SPECIFIER)
  .map((specifier) => `import("${specifier}");`)
  .join(" ");

const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: { wsgirun: "main.ts", isolate_worker: "wasm/isolate_worker.ts" },
  outdir,
  bundle: true,
  format: "esm",
  platform: "neutral",
  target: "esnext",
  external: ["npm:*", "node:*"],
  loader: { ".py": "text" },
  plugins: [workerUrlPlugin],
  banner: { js: `if (false) { ${pyodideImports} }` },
  logLevel: "warning",
  metafile: true,
});
await esbuild.stop();

for (const [file, output] of Object.entries(result.metafile.outputs)) {
  console.log(`${file}  ${(output.bytes / 1024).toFixed(1)} KiB`);
}
