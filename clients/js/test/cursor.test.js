// StreamCursor: the position a subscription recovers from, and duplicates dropped.
import assert from "node:assert/strict";
import test from "node:test";
import { StreamCursor } from "../dist/cursor.js";

test("a channel without history: everything is handed on, nothing to recover", () => {
  const cursor = new StreamCursor();
  cursor.subscribed(false, undefined);
  assert.equal(cursor.admit({ offset: 0, epoch: "" }), true);
  assert.equal(cursor.admit({ offset: 0, epoch: "" }), true);
  assert.equal(cursor.recoverFrom(), undefined);
});

test("recovers from the subscribe reply's position until a publication comes", () => {
  const cursor = new StreamCursor();
  cursor.subscribed(true, { offset: 4, epoch: "e1" });
  assert.deepEqual(cursor.recoverFrom(), { offset: 4, epoch: "e1" });
  assert.equal(cursor.admit({ offset: 5, epoch: "e1" }), true);
  assert.deepEqual(cursor.recoverFrom(), { offset: 5, epoch: "e1" });
});

test("a recoverable channel with nothing published yet recovers from the start", () => {
  const cursor = new StreamCursor();
  cursor.subscribed(true, undefined);
  assert.deepEqual(cursor.recoverFrom(), { offset: 0, epoch: "" });
});

test("drops a publication at or before the last one of the same epoch", () => {
  const cursor = new StreamCursor();
  cursor.subscribed(true, { offset: 0, epoch: "" });
  assert.equal(cursor.admit({ offset: 1, epoch: "e1" }), true);
  assert.equal(cursor.admit({ offset: 2, epoch: "e1" }), true);
  assert.equal(cursor.admit({ offset: 2, epoch: "e1" }), false);
  assert.equal(cursor.admit({ offset: 1, epoch: "e1" }), false);
  assert.equal(cursor.admit({ offset: 1, epoch: "e2" }), true, "a new epoch starts over");
  assert.deepEqual(cursor.position, { offset: 1, epoch: "e2" });
});

test("a resubscribe reply moves the position ahead, never back", () => {
  const cursor = new StreamCursor();
  cursor.subscribed(true, { offset: 3, epoch: "e1" });
  cursor.admit({ offset: 7, epoch: "e1" });
  cursor.subscribed(true, { offset: 5, epoch: "e1" });
  assert.deepEqual(cursor.recoverFrom(), { offset: 7, epoch: "e1" });
  cursor.subscribed(true, { offset: 9, epoch: "e1" });
  assert.deepEqual(cursor.recoverFrom(), { offset: 9, epoch: "e1" });
  cursor.subscribed(true, { offset: 2, epoch: "e2" });
  assert.deepEqual(cursor.recoverFrom(), { offset: 2, epoch: "e2" }, "another epoch is taken as it is");
});
