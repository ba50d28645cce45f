/**
 * Client-side helpers for the tests: a connected HeraldClient that is
 * disconnected when the test ends, waiting for events and publications, a
 * WebSocket whose network can be cut, and HS256 JWTs.
 */

import { createHmac } from "node:crypto";
import { HeraldClient } from "../../dist/index.js";

/** Resolves with the next value of a client event. */
export function nextEvent(client, event) {
  return new Promise((done) => {
    const off = client.on(event, (value) => {
      off();
      done(value);
    });
  });
}

/** Makes a client (connected unless `connect: false`), disconnected when the test ends. */
export async function makeClient(t, url, { connect = true, ...options } = {}) {
  const client = new HeraldClient(url, { commandTimeoutMs: 5_000, ...options });
  t.after(() => client.disconnect());
  if (connect) {
    const connected = nextEvent(client, "connected");
    client.connect();
    await connected;
  }
  return client;
}

/** Collects what a handler is given; until(n) resolves once it holds n items. */
export function collector() {
  const items = [];
  const waiting = [];
  const check = () => {
    for (const wait of [...waiting]) {
      if (items.length >= wait.n) {
        waiting.splice(waiting.indexOf(wait), 1);
        wait.done(items.slice());
      }
    }
  };
  return {
    items,
    push(item) {
      items.push(item);
      check();
    },
    until(n, timeoutMs = 5_000) {
      return new Promise((done, fail) => {
        const timer = setTimeout(
          () => fail(new Error(`got ${items.length} of ${n} in ${timeoutMs} ms: ${JSON.stringify(items)}`)),
          timeoutMs,
        );
        waiting.push({ n, done: (value) => (clearTimeout(timer), done(value)) });
        check();
      });
    },
  };
}

/**
 * A WebSocket constructor for the client whose network the test controls:
 * drop() closes the open socket under the client's feet and makes every new
 * one fail to connect, until restore().
 */
export function cuttableNetwork() {
  let down = false;
  let last;
  class CuttableWebSocket extends WebSocket {
    constructor(url, protocols) {
      // Port 9 (discard) on loopback: nothing listens, so the attempt fails at once.
      super(down ? "ws://127.0.0.1:9/" : url, protocols);
      last = this;
    }
  }
  return {
    WebSocket: CuttableWebSocket,
    drop() {
      down = true;
      last.close();
    },
    restore() {
      down = false;
    },
  };
}

/** An HS256 JWT with these claims. */
export function jwt(secret, claims) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const unsigned = `${encode({ alg: "HS256", typ: "JWT" })}.${encode(claims)}`;
  return `${unsigned}.${createHmac("sha256", secret).update(unsigned).digest("base64url")}`;
}

export const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
