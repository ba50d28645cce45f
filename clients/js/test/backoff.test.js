// Backoff: full jitter below a ceiling that doubles up to the maximum.
import assert from "node:assert/strict";
import test from "node:test";
import { Backoff } from "../dist/backoff.js";

test("the ceiling doubles from the minimum to the maximum, and reset starts over", () => {
  const ceilings = new Backoff(100, 1_000, () => 1);
  assert.deepEqual(
    Array.from({ length: 6 }, () => ceilings.next()),
    [100, 200, 400, 800, 1_000, 1_000],
  );
  ceilings.reset();
  assert.equal(ceilings.next(), 100);
});

test("each delay is drawn below the ceiling", () => {
  const backoff = new Backoff(100, 1_000, () => 0.25);
  assert.deepEqual([backoff.next(), backoff.next(), backoff.next()], [25, 50, 100]);
});
