// Base64 without Buffer, checked against Node's Buffer.
import assert from "node:assert/strict";
import test from "node:test";
import { decodeBase64, encodeBase64 } from "../dist/base64.js";

test("encodes like Buffer, for every length remainder", () => {
  for (let length = 0; length < 70; length++) {
    const bytes = Uint8Array.from({ length }, (_, i) => (i * 97 + length * 13) & 0xff);
    assert.equal(encodeBase64(bytes), Buffer.from(bytes).toString("base64"), `length ${length}`);
  }
});

test("decodes standard and URL-safe base64, padded or not", () => {
  for (let length = 0; length < 70; length++) {
    const bytes = Uint8Array.from({ length }, (_, i) => (i * 31 + 200) & 0xff);
    const buffer = Buffer.from(bytes);
    assert.deepEqual(decodeBase64(buffer.toString("base64")), bytes);
    assert.deepEqual(decodeBase64(buffer.toString("base64url")), bytes);
  }
});

test("refuses what is not base64", () => {
  assert.throws(() => decodeBase64("ab!d"), SyntaxError);
  assert.throws(() => decodeBase64("abcde"), SyntaxError);
});
