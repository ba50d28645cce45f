// Client publish, presence, and joins and leaves, between real connections.
import assert from "node:assert/strict";
import test from "node:test";
import { collector, makeClient } from "./support/client.js";
import { ROOM, startHerald } from "./support/herald.js";

test("a client's publication reaches every subscriber, itself included", async (t) => {
  const herald = await startHerald(t);
  const [ana, bob] = await Promise.all([makeClient(t, herald.wsUrl), makeClient(t, herald.wsUrl)]);
  const anaSees = collector();
  const bobSees = collector();
  const anaRoom = ana.subscribe("chat:room", { onPublication: (p) => anaSees.push(p.text) });
  await bob.subscribe("chat:room", { onPublication: (p) => bobSees.push(p.data) }).subscribed();

  await anaRoom.publish("hi all");
  await anaRoom.publish(new TextEncoder().encode("bytes"));
  assert.deepEqual(await anaSees.until(2), ["hi all", undefined]);
  const [, bytes] = await bobSees.until(2);
  assert.equal(new TextDecoder().decode(bytes), "bytes");
});

test("presence lists the subscribers; presence_stats counts them", async (t) => {
  const herald = await startHerald(t);
  const [ana, bob] = await Promise.all([makeClient(t, herald.wsUrl), makeClient(t, herald.wsUrl)]);
  const anaRoom = ana.subscribe("chat:presence", { onPublication: () => {} });
  const bobRoom = bob.subscribe("chat:presence", { onPublication: () => {} });
  await Promise.all([anaRoom.subscribed(), bobRoom.subscribed()]);

  const presence = await anaRoom.presence();
  assert.equal(presence.channel, "chat:presence");
  assert.deepEqual(presence.missingWorkers, []);
  const byConnection = (a, b) => a.connectionId.localeCompare(b.connectionId);
  assert.deepEqual(
    [...presence.clients].sort(byConnection),
    [ana.connection, bob.connection]
      .map(({ workerId, connectionId, userId }) => ({ workerId, connectionId, userId }))
      .sort(byConnection),
  );

  const stats = await bobRoom.presenceStats();
  assert.equal(stats.channel, "chat:presence");
  assert.equal(stats.connections, 2);
  assert.equal(stats.users, 0, "anonymous connections have no user");
  assert.deepEqual(stats.missingWorkers, []);
});

test("in a namespace with join_leave on, subscribers see who joins and leaves", async (t) => {
  const herald = await startHerald(t, { namespaces: [ROOM] });
  const [ana, bob] = await Promise.all([makeClient(t, herald.wsUrl), makeClient(t, herald.wsUrl)]);
  const anaSees = collector();
  const noted = (kind) => (event) => anaSees.push([kind, event]);
  const room = { onPublication: () => {}, onJoin: noted("join"), onLeave: noted("leave") };
  await ana.subscribe("room:a", room).subscribed();
  const asEvent = ({ workerId, connectionId, userId }) => ({ channel: "room:a", workerId, connectionId, userId });
  assert.deepEqual(await anaSees.until(1), [["join", asEvent(ana.connection)]], "its own join first");

  const bobInRoom = bob.subscribe("room:a", { onPublication: () => {} });
  await bobInRoom.subscribed();
  const bobAsEvent = asEvent(bob.connection);
  await anaSees.until(2);
  await bobInRoom.unsubscribe();
  await anaSees.until(3);
  await bob.subscribe("room:a", { onPublication: () => {} }).subscribed();
  await anaSees.until(4);
  bob.disconnect();
  assert.deepEqual((await anaSees.until(5)).slice(1), [
    ["join", bobAsEvent],
    ["leave", bobAsEvent],
    ["join", bobAsEvent],
    ["leave", bobAsEvent],
  ]);
});
