/**
 * The send timeout of a streamed response body. Deno pulls the next piece of
 * a body once the client's socket has taken the last one, so a body whose
 * last piece Deno took without pulling again for the whole timeout has a
 * client that reads nothing. Stopping such a body frees what it holds: an
 * isolate for an application's response, an open file for a static one.
 */
export class SendTimer {
  #timeoutMs: number;
  #onStall: (reason: string) => void;
  /** performance.now() when the last piece went out, or undefined while a pull is pending. */
  #waitingSince: number | undefined;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;

  /** `timeoutMs` of 0 turns the timer off. `onStall` runs at most once. */
  constructor(timeoutMs: number, onStall: (reason: string) => void) {
    this.#timeoutMs = timeoutMs;
    this.#onStall = onStall;
  }

  /** Marks the start of a pull: the client has taken the last piece. */
  pullStarted(): void {
    this.#waitingSince = undefined;
  }

  /** Marks the end of a pull that handed Deno a piece for the client. */
  pieceQueued(): void {
    if (this.#timeoutMs <= 0 || this.#stopped) return;
    this.#waitingSince = performance.now();
    this.#arm(this.#timeoutMs);
  }

  /** Stops the timer for good, when the body has ended. */
  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }

  /** One timer per body, armed again for the remaining time until the body ends. */
  #arm(delayMs: number): void {
    if (this.#timer !== undefined) return;
    this.#timer = setTimeout(() => {
      this.#timer = undefined;
      if (this.#stopped || this.#waitingSince === undefined) return;
      const waited = performance.now() - this.#waitingSince;
      if (waited < this.#timeoutMs) {
        this.#arm(Math.max(1, this.#timeoutMs - waited));
        return;
      }
      this.stop();
      this.#onStall(
        `the client's socket took no more response bytes for ${
          this.#timeoutMs / 1000
        } s (--send-timeout)`,
      );
    }, delayMs);
  }
}
