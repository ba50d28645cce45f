// Reconnecting after a connection lost under the client's feet: subscriptions
// are made again, and in a namespace with recovery every publication reaches
// the handler exactly once, in order.
import assert from "node:assert/strict";
import test from "node:test";
import { collector, cuttableNetwork, makeClient, nextEvent } from "./support/client.js";
import { FEED, startHerald } from "./support/herald.js";

const FAST_RECONNECT = { minReconnectDelayMs: 50, maxReconnectDelayMs: 300 };

test("after a lost connection the client reconnects and subscribes again", async (t) => {
  const herald = await startHerald(t);
  const network = cuttableNetwork();
  const client = await makeClient(t, herald.wsUrl, { WebSocket: network.WebSocket, ...FAST_RECONNECT });
  const seen = collector();
  const infos = collector();
  const sub = client.subscribe("chat:x", {
    onPublication: (p) => seen.push(p.text),
    onSubscribed: (i) => infos.push(i),
  });
  await infos.until(1);

  const disconnected = nextEvent(client, "disconnected");
  network.drop();
  const { code, reconnectDelayMs } = await disconnected;
  assert.notEqual(code, 1000);
  assert.equal(typeof reconnectDelayMs, "number");
  assert.equal(sub.state, "subscribing");

  network.restore();
  const [, info] = await infos.until(2);
  assert.deepEqual(info, { resubscribed: true, recoverable: false, recovered: false, position: undefined });
  await herald.publish("chat:x", "after");
  assert.deepEqual(await seen.until(1), ["after"]);
});

test("in a namespace with recovery, what was published meanwhile arrives once, in order", async (t) => {
  const herald = await startHerald(t, { namespaces: [FEED] });
  const network = cuttableNetwork();
  const client = await makeClient(t, herald.wsUrl, { WebSocket: network.WebSocket, ...FAST_RECONNECT });
  const seen = collector();
  const infos = collector();
  client.subscribe("feed:x", { onPublication: (p) => seen.push(p), onSubscribed: (i) => infos.push(i) });
  await infos.until(1);
  for (const n of [1, 2, 3]) await herald.publish("feed:x", `m${n}`);
  await seen.until(3);

  const disconnected = nextEvent(client, "disconnected");
  network.drop();
  await disconnected;
  for (const n of [4, 5, 6]) await herald.publish("feed:x", `m${n}`);
  network.restore();

  const [, info] = await infos.until(2);
  assert.equal(info.resubscribed, true);
  assert.equal(info.recoverable, true);
  assert.equal(info.recovered, true);
  for (const n of [7, 8]) await herald.publish("feed:x", `m${n}`);

  const all = await seen.until(8);
  assert.deepEqual(
    all.map((p) => p.text),
    ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"],
  );
  for (let i = 1; i < all.length; i++) {
    assert.ok(all[i].epoch === all[0].epoch && all[i].offset > all[i - 1].offset, `offsets grow at ${i}`);
  }
  await new Promise((done) => setTimeout(done, 200));
  assert.equal(seen.items.length, 8, "nothing twice");
});
