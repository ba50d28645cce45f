// History in a namespace that keeps one (feed:, history=1000), read by a
// subscriber of the channel.
import assert from "node:assert/strict";
import test from "node:test";
import { ErrorCode } from "../dist/index.js";
import { makeClient } from "./support/client.js";
import { CHAT, FEED, startHerald } from "./support/herald.js";

test("history returns the stored publications, oldest first, and the position", async (t) => {
  const herald = await startHerald(t, { namespaces: [FEED] });
  const client = await makeClient(t, herald.wsUrl);
  for (const text of ["one", "two", "three"]) await herald.publish("feed:h", text);
  const live = [];
  const sub = client.subscribe("feed:h", { onPublication: (p) => live.push(p) });

  // Asked before the subscription is in effect: sent once it is.
  const all = await sub.history({ limit: 10 });
  assert.equal(all.channel, "feed:h");
  assert.deepEqual(
    all.publications.map((p) => p.text),
    ["one", "two", "three"],
  );
  const [first, second, third] = all.publications;
  assert.match(first.epoch, /.+/);
  assert.ok(first.offset < second.offset && second.offset < third.offset, "offsets grow");
  assert.ok(all.publications.every((p) => p.epoch === first.epoch && p.channel === "feed:h"));
  assert.deepEqual(all.position, { offset: third.offset, epoch: first.epoch });
  assert.deepEqual(live, [], "history is not handed to the subscription");

  const since = await sub.history({ limit: 10, since: { offset: first.offset, epoch: first.epoch } });
  assert.deepEqual(
    since.publications.map((p) => p.text),
    ["two", "three"],
  );
  assert.equal(since.complete, true);

  const newest = await sub.history({ limit: 1 });
  assert.deepEqual(
    newest.publications.map((p) => p.text),
    ["three"],
  );

  const positionOnly = await sub.history();
  assert.deepEqual(positionOnly.publications, []);
  assert.deepEqual(positionOnly.position, all.position);
});

test("a subscription's reply and publications carry positions", async (t) => {
  const herald = await startHerald(t, { namespaces: [FEED] });
  const client = await makeClient(t, herald.wsUrl);
  await herald.publish("feed:s", "before");
  const live = [];
  const sub = client.subscribe("feed:s", { onPublication: (p) => live.push(p) });
  const info = await sub.subscribed();
  assert.equal(info.recoverable, true);
  assert.equal(info.position.offset > 0, true);
  assert.deepEqual(sub.position, info.position);
  await herald.publish("feed:s", "after");
  await sub.history(); // a round trip: the publication has arrived by its reply
  assert.deepEqual(
    live.map((p) => [p.text, p.offset, p.epoch]),
    [["after", info.position.offset + 1, info.position.epoch]],
  );
  assert.deepEqual(sub.position, { offset: info.position.offset + 1, epoch: info.position.epoch });
});

test("history where the namespace keeps none is refused with 403", async (t) => {
  const herald = await startHerald(t, { namespaces: [CHAT] });
  const client = await makeClient(t, herald.wsUrl);
  const sub = client.subscribe("chat:room", { onPublication: () => {} });
  await assert.rejects(sub.history({ limit: 1 }), { name: "HeraldError", code: ErrorCode.NotAllowed });
});
