// Refused commands reject with a HeraldError carrying the server's code, and
// leave the connection usable; client-side failures have codes too.
import assert from "node:assert/strict";
import test from "node:test";
import { ErrorCode, HeraldClient } from "../dist/index.js";
import { collector, makeClient } from "./support/client.js";
import { NEWS, CHAT, startHerald } from "./support/herald.js";

test("subscribing in an unknown namespace is refused with 404; the connection stays", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const connection = client.connection;
  const errors = [];
  const sub = client.subscribe("nowhere:x", { onPublication: () => {}, onError: (error) => errors.push(error) });
  await assert.rejects(sub.subscribed(), { name: "HeraldError", code: ErrorCode.UnknownNamespace });
  assert.equal(sub.state, "unsubscribed");
  assert.equal(errors.length, 1);
  assert.equal(errors[0].code, 404);
  assert.match(errors[0].message, /.+/);

  const publications = collector();
  await client.subscribe("chat:ok", { onPublication: (p) => publications.push(p.text) }).subscribed();
  await herald.publish("chat:ok", "still here");
  assert.deepEqual(await publications.until(1), ["still here"]);
  assert.deepEqual(client.connection, connection);
});

test("a refused subscription without onError goes to the error event", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const error = new Promise((done) => client.on("error", done));
  client.subscribe("nowhere:y", { onPublication: () => {} });
  assert.equal((await error).code, 404);
});

test("publishing where the namespace does not allow it is refused with 403; the connection stays", async (t) => {
  const herald = await startHerald(t, { namespaces: [CHAT, NEWS] });
  const client = await makeClient(t, herald.wsUrl);
  const connection = client.connection;
  const news = client.subscribe("news:today", { onPublication: () => {} });
  await assert.rejects(news.publish("not mine to say"), { name: "HeraldError", code: ErrorCode.NotAllowed });
  assert.equal(news.state, "subscribed");

  const chat = client.subscribe("chat:ok", { onPublication: () => {} });
  await chat.publish("mine to say");
  assert.deepEqual(client.connection, connection);
});

test("presence where the namespace has it off is refused with 403", async (t) => {
  const herald = await startHerald(t, { namespaces: [NEWS] });
  const client = await makeClient(t, herald.wsUrl);
  const news = client.subscribe("news:today", { onPublication: () => {} });
  await assert.rejects(news.presence(), { code: ErrorCode.NotAllowed });
});

test("one subscription per channel", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  client.subscribe("chat:once", { onPublication: () => {} });
  assert.throws(() => client.subscribe("chat:once", { onPublication: () => {} }), /already subscribed to chat:once/);
});

test("a command that cannot be sent in time fails with Timeout; disconnect fails the rest", async () => {
  const client = new HeraldClient("ws://127.0.0.1:9/", { commandTimeoutMs: 100, minReconnectDelayMs: 1_000 });
  client.connect();
  const sub = client.subscribe("chat:x", { onPublication: () => {} });
  await assert.rejects(sub.publish("x"), { name: "HeraldError", code: ErrorCode.Timeout });
  const pending = sub.presence();
  client.disconnect();
  await assert.rejects(pending, { code: ErrorCode.ConnectionClosed });
});
