/**
 * Page map of a Pyodide memory snapshot: the 4 KiB pages that contain data.
 *
 * Pyodide restores a snapshot by copying its whole heap image into a fresh
 * wasm memory. About half of that image is zero pages, and writing zeros over
 * memory that already reads as zero commits resident memory for nothing. The
 * main thread keeps one map per snapshot and shares it with every isolate,
 * which then writes only the pages that contain data. Cache files store the
 * map and the data pages alone (packSnapshot), so the map comes with the file.
 */

export const PAGE_BYTES = 4096;

/** Returns the bytes before the heap image, a length that Pyodide's snapshot header records. */
export function snapshotHeaderBytes(snapshot: Uint8Array): number {
  return new DataView(snapshot.buffer, snapshot.byteOffset, 8).getUint32(4, true);
}

/** Computes one byte per page of the heap image: 1 when the page contains a non-zero byte. */
export function dataPages(snapshot: Uint8Array): Uint8Array<SharedArrayBuffer> {
  const image = snapshot.subarray(snapshotHeaderBytes(snapshot));
  const pages = Math.ceil(image.length / PAGE_BYTES);
  const map = new Uint8Array(new SharedArrayBuffer(pages));
  for (let page = 0; page < pages; page++) {
    const start = page * PAGE_BYTES;
    map[page] = isZero(image, start, Math.min(start + PAGE_BYTES, image.length)) ? 0 : 1;
  }
  return map;
}

const cache = new WeakMap<SharedArrayBuffer, Uint8Array<SharedArrayBuffer>>();

/** Bytes of heap image page `page`: a whole page, or what is left of the image. */
function pageLength(page: number, imageBytes: number): number {
  return Math.min(PAGE_BYTES, imageBytes - page * PAGE_BYTES);
}

/**
 * Packs a snapshot for the cache file: Pyodide's header, the page map, then
 * only the pages that contain data. About half of a heap image is zero pages,
 * so the file is about half as long, and reading and hashing it take half the
 * time.
 */
export function packSnapshot(snapshot: Uint8Array): Uint8Array<ArrayBuffer> {
  const headerBytes = snapshotHeaderBytes(snapshot);
  const image = snapshot.subarray(headerBytes);
  const map = dataPages(snapshot);
  let dataBytes = 0;
  for (let page = 0; page < map.length; page++) {
    if (map[page]) dataBytes += pageLength(page, image.length);
  }
  const packed = new Uint8Array(headerBytes + map.length + dataBytes);
  packed.set(snapshot.subarray(0, headerBytes));
  packed.set(map, headerBytes);
  let offset = headerBytes + map.length;
  for (let page = 0; page < map.length; page++) {
    if (!map[page]) continue;
    const start = page * PAGE_BYTES;
    const end = start + pageLength(page, image.length);
    packed.set(image.subarray(start, end), offset);
    offset += end - start;
  }
  return packed;
}

/**
 * Rebuilds a snapshot of `snapshotBytes` bytes from packSnapshot()'s output,
 * in shared memory for the isolates. Zero pages are never written, so they
 * take no resident memory. The page map comes with it, so dataPagesOf()
 * needs no scan. Throws a RangeError when `packed` does not fit that length.
 */
export function unpackSnapshot(packed: Uint8Array, snapshotBytes: number): SharedArrayBuffer {
  if (!Number.isSafeInteger(snapshotBytes)) {
    throw new RangeError(`no snapshot length (${snapshotBytes})`);
  }
  if (packed.length < 8) {
    throw new RangeError(`${packed.length} bytes are too short for a snapshot`);
  }
  const headerBytes = snapshotHeaderBytes(packed);
  if (headerBytes > packed.length || headerBytes > snapshotBytes) {
    throw new RangeError(`the snapshot header of ${headerBytes} bytes does not fit`);
  }
  const imageBytes = snapshotBytes - headerBytes;
  const pages = Math.ceil(imageBytes / PAGE_BYTES);
  const mapEnd = headerBytes + pages;
  if (mapEnd > packed.length) throw new RangeError(`the page map of ${pages} pages does not fit`);
  let dataBytes = 0;
  for (let page = 0; page < pages; page++) {
    const flag = packed[headerBytes + page];
    if (flag > 1) throw new RangeError(`page ${page} has the flag ${flag} in the page map`);
    if (flag) dataBytes += pageLength(page, imageBytes);
  }
  if (mapEnd + dataBytes !== packed.length) {
    throw new RangeError(
      `invalid page map: it counts ${dataBytes} bytes of data, the file contains ${
        packed.length - mapEnd
      }`,
    );
  }

  const snapshot = new SharedArrayBuffer(snapshotBytes);
  const bytes = new Uint8Array(snapshot);
  bytes.set(packed.subarray(0, headerBytes));
  const map = new Uint8Array(new SharedArrayBuffer(pages));
  map.set(packed.subarray(headerBytes, mapEnd));
  let offset = mapEnd;
  for (let page = 0; page < pages; page++) {
    if (!map[page]) continue;
    const length = pageLength(page, imageBytes);
    bytes.set(packed.subarray(offset, offset + length), headerBytes + page * PAGE_BYTES);
    offset += length;
  }
  cache.set(snapshot, map);
  return snapshot;
}

/** Returns the page map of a shared snapshot, computed on first use. */
export function dataPagesOf(snapshot: SharedArrayBuffer): Uint8Array<SharedArrayBuffer> {
  let map = cache.get(snapshot);
  if (!map) {
    map = dataPages(new Uint8Array(snapshot));
    cache.set(snapshot, map);
  }
  return map;
}

/**
 * A wasm function over an imported memory, `zero(start, end)`: 1 when the
 * bytes from start to end (a multiple of 8 apart) are all zero, else 0. A
 * worker runs this scan once, before any JavaScript loop would be compiled.
 * The same scan in JavaScript took 77 to 160 ms per restore with 4 isolates
 * starting on 2 cores, and this one scans 32 MB in about 10 ms.
 * The module is written out by hand below; its text form:
 *
 *   (module (import "m" "memory" (memory 0))
 *     (func (export "zero") (param $p i32) (param $end i32) (result i32)
 *       (block $done (loop $next
 *         (br_if $done (i32.ge_u (local.get $p) (local.get $end)))
 *         (if (i64.ne (i64.load (local.get $p)) (i64.const 0))
 *           (then (return (i32.const 0))))
 *         (local.set $p (i32.add (local.get $p) (i32.const 8)))
 *         (br $next)))
 *       (i32.const 1)))
 */
// deno-fmt-ignore
const ZERO_SCAN_WASM = new Uint8Array([
  0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00,
  // type: (i32, i32) -> i32
  0x01, 0x07, 0x01, 0x60, 0x02, 0x7f, 0x7f, 0x01, 0x7f,
  // import "m" "memory", a memory of at least 0 pages
  0x02, 0x0d, 0x01, 0x01, 0x6d, 0x06, 0x6d, 0x65, 0x6d, 0x6f, 0x72, 0x79, 0x02, 0x00, 0x00,
  // one function of type 0, exported as "zero"
  0x03, 0x02, 0x01, 0x00,
  0x07, 0x08, 0x01, 0x04, 0x7a, 0x65, 0x72, 0x6f, 0x00, 0x00,
  // its body
  0x0a, 0x2a, 0x01, 0x28, 0x00,
  0x02, 0x40, 0x03, 0x40, 0x20, 0x00, 0x20, 0x01, 0x4f, 0x0d, 0x01,
  0x20, 0x00, 0x29, 0x03, 0x00, 0x42, 0x00, 0x52, 0x04, 0x40, 0x41, 0x00, 0x0f, 0x0b,
  0x20, 0x00, 0x41, 0x08, 0x6a, 0x21, 0x00, 0x0c, 0x00, 0x0b, 0x0b, 0x41, 0x01, 0x0b,
]);

let zeroScanModule: WebAssembly.Module | null = null;

/** Returns a zero test over ranges of `memory`, run in wasm when the memory is not shared. */
function zeroTest(memory: WebAssembly.Memory): (start: number, end: number) => boolean {
  if (memory.buffer instanceof SharedArrayBuffer) {
    return (start, end) => isZero(new Uint8Array(memory.buffer), start, end);
  }
  zeroScanModule ??= new WebAssembly.Module(ZERO_SCAN_WASM);
  const instance = new WebAssembly.Instance(zeroScanModule, { m: { memory } });
  const zero = instance.exports.zero as (start: number, end: number) => number;
  return (start, end) => zero(start, end) === 1;
}

/**
 * Copies the heap image into `memory`, writing only the pages that contain
 * data. A page that is zero in the image is cleared only when the memory's
 * page is not zero, because the module's data segments and constructors wrote
 * some pages before the restore. Reading a page that nothing wrote costs no RSS.
 */
export function writeDataPages(
  memory: WebAssembly.Memory,
  image: Uint8Array,
  map: Uint8Array,
): void {
  const isZeroPage = zeroTest(memory);
  const bytes = new Uint8Array(memory.buffer);
  for (let page = 0; page < map.length; page++) {
    const start = page * PAGE_BYTES;
    const end = Math.min(start + PAGE_BYTES, image.length);
    // The scan reads 8 bytes at a time, so a short last page is copied instead.
    const scannable = (end - start) % 8 === 0;
    if (map[page] || !scannable) bytes.set(image.subarray(start, end), start);
    else if (!isZeroPage(start, end)) bytes.fill(0, start, end);
  }
}

function isZero(bytes: Uint8Array, start: number, end: number): boolean {
  // Pages of a snapshot and of wasm memory are 4-byte aligned: compare 4 bytes at a time.
  if ((bytes.byteOffset + start) % 4 === 0 && (end - start) % 4 === 0) {
    const words = new Int32Array(bytes.buffer, bytes.byteOffset + start, (end - start) / 4);
    for (let i = 0; i < words.length; i++) if (words[i] !== 0) return false;
    return true;
  }
  for (let i = start; i < end; i++) if (bytes[i] !== 0) return false;
  return true;
}
