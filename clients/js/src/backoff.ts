/**
 * Reconnect and retry delays: exponential backoff with full jitter. Each
 * delay is drawn uniformly below a ceiling that starts at the minimum and
 * doubles up to the maximum; reset() starts over after a success.
 */

export class Backoff {
  readonly #minMs: number;
  readonly #maxMs: number;
  readonly #random: () => number;
  #ceilingMs: number;

  constructor(minMs: number, maxMs: number, random: () => number = Math.random) {
    if (!(minMs > 0 && maxMs >= minMs)) throw new RangeError("backoff needs 0 < min <= max");
    this.#minMs = minMs;
    this.#maxMs = maxMs;
    this.#random = random;
    this.#ceilingMs = minMs;
  }

  /** The next delay, in milliseconds. */
  next(): number {
    const delay = Math.round(this.#random() * this.#ceilingMs);
    this.#ceilingMs = Math.min(this.#maxMs, this.#ceilingMs * 2);
    return delay;
  }

  /** Starts again from the minimum. */
  reset(): void {
    this.#ceilingMs = this.#minMs;
  }
}
