/**
 * Key derivation for Python in an isolate: the `_wsgirun_crypto` module
 * behind `hashlib.pbkdf2_hmac` and `hashlib.scrypt`.
 *
 * Python 3.12 takes both functions from OpenSSL only, and Pyodide has no
 * OpenSSL, so its hashlib lacks them. Django hashes every password with
 * PBKDF2 (260 000 rounds of SHA-256 in Django 3.2), which in pure Python
 * under WebAssembly takes seconds. Deno's node:crypto computes them natively
 * and synchronously.
 */

import { pbkdf2Sync, scryptSync } from "node:crypto";
import type { PyBuffer } from "./host_socket.ts";

function copyBuffer(value: PyBuffer): Uint8Array {
  const buffer = value.getBuffer("u8");
  try {
    return new Uint8Array(buffer.data);
  } finally {
    buffer.release();
  }
}

/** Copies a node Buffer into a plain Uint8Array, the only kind Pyodide converts. */
function plain(bytes: Uint8Array): Uint8Array {
  return new Uint8Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
}

/** The `_wsgirun_crypto` module. */
export class CryptoModule {
  /** PBKDF2 with HMAC of `hashName` (an OpenSSL digest name such as "sha256"). */
  pbkdf2_hmac(
    hashName: string,
    password: PyBuffer,
    salt: PyBuffer,
    iterations: number,
    length: number,
  ): Uint8Array {
    return plain(pbkdf2Sync(copyBuffer(password), copyBuffer(salt), iterations, length, hashName));
  }

  /** scrypt with cost `n`, block size `r` and parallelization `p`; `maxmem` 0 keeps the default limit. */
  scrypt(
    password: PyBuffer,
    salt: PyBuffer,
    n: number,
    r: number,
    p: number,
    maxmem: number,
    length: number,
  ): Uint8Array {
    const options = maxmem > 0 ? { N: n, r, p, maxmem } : { N: n, r, p };
    return plain(scryptSync(copyBuffer(password), copyBuffer(salt), length, options));
  }
}
