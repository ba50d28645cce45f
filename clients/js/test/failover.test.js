// A client given several gateways: when the one it is on dies, it
// reconnects to the next one and subscribes there again.
import assert from "node:assert/strict";
import test from "node:test";
import { collector, makeClient, nextEvent } from "./support/client.js";
import { startHerald } from "./support/herald.js";

test("a client whose gateway dies reconnects to the next gateway and subscribes there", async (t) => {
  const [first, second] = await Promise.all([startHerald(t), startHerald(t)]);
  const client = await makeClient(t, [first.wsUrl, second.wsUrl], {
    minReconnectDelayMs: 50,
    maxReconnectDelayMs: 300,
  });
  const firstWorker = client.connection.workerId;
  const seen = collector();
  const infos = collector();
  client.subscribe("chat:x", { onPublication: (p) => seen.push(p.text), onSubscribed: (i) => infos.push(i) });
  await infos.until(1);
  await first.publish("chat:x", "on the first");
  await seen.until(1);

  const reconnected = nextEvent(client, "connected");
  await first.kill();
  const { workerId } = await reconnected;
  assert.notEqual(workerId, firstWorker, "on the other gateway");
  const [, info] = await infos.until(2);
  assert.equal(info.resubscribed, true);
  await second.publish("chat:x", "on the second");
  assert.deepEqual(await seen.until(2), ["on the first", "on the second"]);
});
