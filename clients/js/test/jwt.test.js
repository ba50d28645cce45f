// Token: when a JWT is replaced, read from its exp and iat.
import assert from "node:assert/strict";
import test from "node:test";
import { Token } from "../dist/token.js";
import { jwt } from "./support/client.js";

const SECRET = "a-secret-of-at-least-32-bytes-for-hs256";

test("a JWT is replaced 10% of its lifetime before exp, at most 5 s before", () => {
  const short = new Token(jwt(SECRET, { sub: "ana", iat: 1_000, exp: 1_010 }));
  assert.equal(short.refreshAtMs, 1_009_000);
  const long = new Token(jwt(SECRET, { sub: "ana", iat: 1_000, exp: 4_600 }));
  assert.equal(long.refreshAtMs, 4_595_000);
  assert.equal(long.isStale(4_594_999), false);
  assert.equal(long.isStale(4_595_000), true);
});

test("without iat, the lifetime counts from when the token was received", () => {
  const token = new Token(jwt(SECRET, { sub: "ana", exp: 1_020 }), 1_000_000);
  assert.equal(token.refreshAtMs, 1_018_000);
});

test("a token without exp, or not a JWT, is never stale", () => {
  for (const value of [jwt(SECRET, { sub: "ana" }), "opaque-token", "a.b.c"]) {
    const token = new Token(value);
    assert.equal(token.refreshAtMs, undefined, value);
    assert.equal(token.isStale(), false, value);
  }
});
