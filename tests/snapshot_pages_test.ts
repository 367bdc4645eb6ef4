/**
 * The page map of a memory snapshot and the sparse restore that uses it,
 * checked against a real wasm memory.
 */

import assert from "node:assert/strict";
import {
  dataPages,
  dataPagesOf,
  packSnapshot,
  PAGE_BYTES,
  unpackSnapshot,
  writeDataPages,
} from "../wasm/snapshot_pages.ts";

const HEADER_BYTES = 32;
const PAGES = 6;

/** Builds a snapshot in Pyodide's layout: a header that records its own length, then the heap image. */
function fakeSnapshot(image: Uint8Array): Uint8Array {
  const snapshot = new Uint8Array(HEADER_BYTES + image.length);
  new DataView(snapshot.buffer).setUint32(4, HEADER_BYTES, true);
  snapshot.set(image, HEADER_BYTES);
  return snapshot;
}

/** Builds an image whose pages 1 and 4 contain data, page 1 a single byte at its end. */
function sampleImage(): Uint8Array {
  const image = new Uint8Array(PAGES * PAGE_BYTES);
  image[2 * PAGE_BYTES - 1] = 7;
  image.fill(0xab, 4 * PAGE_BYTES, 4 * PAGE_BYTES + 100);
  return image;
}

Deno.test("page map marks exactly the pages that hold data", () => {
  const map = dataPages(fakeSnapshot(sampleImage()));
  assert.deepEqual([...map], [0, 1, 0, 0, 1, 0]);
});

Deno.test("page map counts a short last page", () => {
  const image = new Uint8Array(PAGE_BYTES + 10);
  image[PAGE_BYTES + 9] = 1;
  assert.deepEqual([...dataPages(fakeSnapshot(image))], [0, 1]);
});

Deno.test("sparse restore gives the same memory as a full copy", () => {
  const image = sampleImage();
  const memory = new WebAssembly.Memory({ initial: 1 });
  const bytes = new Uint8Array(memory.buffer);
  // What a module's data segments and constructors leave before a restore:
  // non-zero bytes where the image has zero pages and where it has data.
  bytes.fill(0x11, 0, 10);
  bytes[3 * PAGE_BYTES + 500] = 0x22;
  bytes.fill(0x33, 4 * PAGE_BYTES + 200, 4 * PAGE_BYTES + 300);

  writeDataPages(memory, image, dataPages(fakeSnapshot(image)));

  assert.deepEqual(new Uint8Array(memory.buffer, 0, image.length), image);
});

function residentBytes(): number {
  const status = Deno.readTextFileSync("/proc/self/status");
  return Number(status.match(/VmRSS:\s+(\d+) kB/)![1]) * 1024;
}

Deno.test("sparse restore commits no memory for zero pages", () => {
  const MiB = 1024 * 1024;
  // Written whole, as a snapshot read from a file is: copying it would commit every page.
  const image = new Uint8Array(64 * MiB).fill(1);
  image.fill(0, PAGE_BYTES);
  const map = dataPages(fakeSnapshot(image));
  const memory = new WebAssembly.Memory({ initial: (64 * MiB) / 65536 });
  const before = residentBytes();

  writeDataPages(memory, image, map);

  const growth = residentBytes() - before;
  // A full copy would make all 64 MiB of the memory resident.
  assert.ok(growth < 16 * MiB, `resident memory grew by ${Math.round(growth / MiB)} MiB`);
  assert.equal(new Uint8Array(memory.buffer)[PAGE_BYTES - 1], 1);
});

Deno.test("packed snapshot holds only data pages and unpacks to the same bytes", () => {
  // A short last page with data, as a heap image whose length is not a page multiple has.
  const image = new Uint8Array(PAGES * PAGE_BYTES + 10);
  image.set(sampleImage());
  image[PAGES * PAGE_BYTES + 3] = 9;
  const snapshot = fakeSnapshot(image);

  const packed = packSnapshot(snapshot);
  // Header, one map byte per page, pages 1 and 4 whole, and the 10 bytes of the last page.
  assert.equal(packed.length, HEADER_BYTES + (PAGES + 1) + 2 * PAGE_BYTES + 10);

  const unpacked = unpackSnapshot(packed, snapshot.length);
  assert.deepEqual(new Uint8Array(unpacked), snapshot);
  // The map travels with the file, and is the one a scan finds.
  assert.deepEqual([...dataPagesOf(unpacked)], [0, 1, 0, 0, 1, 0, 1]);
});

Deno.test("unpacking rejects a page map that does not match the data", () => {
  const snapshot = fakeSnapshot(sampleImage());
  const packed = packSnapshot(snapshot);

  const flagged = packed.slice();
  flagged[HEADER_BYTES + 2] = 1; // one page more than the data contains
  assert.throws(() => unpackSnapshot(flagged, snapshot.length), /invalid page map/);

  const badFlag = packed.slice();
  badFlag[HEADER_BYTES] = 7;
  assert.throws(() => unpackSnapshot(badFlag, snapshot.length), /flag 7/);

  assert.throws(
    () => unpackSnapshot(packed, snapshot.length + PAGE_BYTES),
    /invalid page map|does not fit/,
  );
  assert.throws(() => unpackSnapshot(packed.subarray(0, 6), snapshot.length), /too short/);
});
