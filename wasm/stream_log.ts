/**
 * Line buffering for what Python writes to its standard streams in an
 * isolate or a snapshot build. Pyodide's own line buffering keeps text
 * without a final newline until a later write brings one, so an isolate
 * logged it with a later request's id, and a snapshot build never logged
 * it. A StreamLog is flushed when a request, an import or a build ends.
 */

/** Characters of one unfinished line that a StreamLog keeps before it passes them on. */
const STREAM_LINE_LIMIT = 65536;

/** Splits the bytes of one standard stream into lines for `emit`. */
export class StreamLog {
  #decoder = new TextDecoder();
  #pending = "";
  #emit: (line: string) => void;

  constructor(emit: (line: string) => void) {
    this.#emit = emit;
  }

  /** Takes bytes as Pyodide's `write` handler gets them; returns how many it took. */
  write(bytes: Uint8Array): number {
    const lines = (this.#pending + this.#decoder.decode(bytes, { stream: true })).split("\n");
    this.#pending = lines.pop()!;
    for (const line of lines) this.#emit(line);
    // A line without an end is passed on in pieces rather than held without limit.
    if (this.#pending.length >= STREAM_LINE_LIMIT) this.flush();
    return bytes.length;
  }

  /** Passes on the unfinished line, if there is one. */
  flush(): void {
    const rest = this.#pending + this.#decoder.decode();
    this.#pending = "";
    if (rest !== "") this.#emit(rest);
  }
}
