// Subscriptions against a real herald: backend publications reach the
// handler (text and binary), direct messages reach the `message` event,
// subscriptions made before connecting, and unsubscribing.
import assert from "node:assert/strict";
import test from "node:test";
import { collector, makeClient, nextEvent } from "./support/client.js";
import { startHerald } from "./support/herald.js";

test("a backend publication reaches the subscription's handler", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const publications = collector();
  const subscribedInfos = [];
  const sub = client.subscribe("chat:room", {
    onPublication: (publication) => publications.push(publication),
    onSubscribed: (info) => subscribedInfos.push(info),
  });
  assert.equal(sub.channel, "chat:room");
  assert.equal(sub.state, "subscribing");
  const info = await sub.subscribed();
  assert.equal(sub.state, "subscribed");
  assert.deepEqual(info, { resubscribed: false, recoverable: false, recovered: false, position: undefined });
  assert.deepEqual(subscribedInfos, [info]);

  await herald.publish("chat:room", "hello");
  const [publication] = await publications.until(1);
  assert.deepEqual(publication, {
    channel: "chat:room",
    content: { text: "hello" },
    text: "hello",
    offset: 0,
    epoch: "",
  });
});

test("binary content arrives as bytes, with its base64", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const publications = collector();
  await client.subscribe("chat:bytes", { onPublication: (p) => publications.push(p) }).subscribed();
  await herald.publish("chat:bytes", { binary: "AAEC/w==" });
  const [publication] = await publications.until(1);
  assert.deepEqual(publication.content, { binary: "AAEC/w==" });
  assert.deepEqual(publication.data, new Uint8Array([0, 1, 2, 255]));
  assert.equal(publication.text, undefined);
});

test("a backend's direct message reaches the message event", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const message = nextEvent(client, "message");
  await herald.broadcast("to everyone");
  assert.deepEqual(await message, { content: { text: "to everyone" }, text: "to everyone" });
});

test("a subscription made before connecting subscribes once connected", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl, { connect: false });
  const publications = collector();
  const sub = client.subscribe("chat:early", { onPublication: (p) => publications.push(p.text) });
  client.connect();
  await sub.subscribed();
  await herald.publish("chat:early", "made it");
  assert.deepEqual(await publications.until(1), ["made it"]);
});

test("after unsubscribe the handler gets nothing, and the channel can be subscribed again", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const seen = collector();
  const sub = client.subscribe("chat:a", { onPublication: (p) => seen.push(`a ${p.text}`) });
  client.subscribe("chat:b", { onPublication: (p) => seen.push(`b ${p.text}`) });
  await sub.subscribed();
  await herald.publish("chat:a", "1");
  await seen.until(1);

  await sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
  await herald.publish("chat:a", "2");
  // One publisher's messages reach a connection in order: once b's arrives, a's would have.
  await herald.publish("chat:b", "3");
  assert.deepEqual(await seen.until(2), ["a 1", "b 3"]);
  await assert.rejects(sub.publish("x"), { name: "HeraldError", code: 410 });

  const again = client.subscribe("chat:a", { onPublication: (p) => seen.push(`a again ${p.text}`) });
  await again.subscribed();
  await herald.publish("chat:a", "4");
  assert.deepEqual((await seen.until(3))[2], "a again 4");
});

test("unsubscribe right after subscribe, before the reply, leaves nothing behind", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const seen = collector();
  const sub = client.subscribe("chat:brief", { onPublication: (p) => seen.push(`brief ${p.text}`) });
  await sub.unsubscribe();
  await client.subscribe("chat:other", { onPublication: (p) => seen.push(`other ${p.text}`) }).subscribed();
  await herald.publish("chat:brief", "1");
  await herald.publish("chat:other", "2");
  assert.deepEqual(await seen.until(1), ["other 2"]);
  const again = client.subscribe("chat:brief", { onPublication: () => {} });
  await again.subscribed();
});
