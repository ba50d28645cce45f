// The client at the protocol level, against a scripted socket: what it sends
// on connect (its token, in a connect command) and resubscribe, which gateway
// it dials, how it hands recovered and live publications, joins and leaves
// on, and what becomes of an rpc or a send when the connection drops. (Against a real
// herald: recovery.test.js, failover.test.js, presence.test.js.)
import assert from "node:assert/strict";
import test from "node:test";
import { CloseCode, ErrorCode, HeraldClient, SUBPROTOCOL } from "../dist/index.js";
import { FakeSocket } from "./support/fake-socket.js";

const CONNECTED = { connected: { worker_id: "w1", connection_id: "1" } };
const publication = (offset, epoch = "e1") => ({
  publication: { channel: "feed:x", content: { text: `m${offset}` }, offset, epoch },
});

/** A client on fake sockets, connecting, with a feed:x subscription whose events are logged. */
function setUp(t, options = {}) {
  FakeSocket.made = [];
  const client = new HeraldClient("ws://herald.test/?x=1", {
    WebSocket: FakeSocket,
    minReconnectDelayMs: 1,
    maxReconnectDelayMs: 1,
    ...options,
  });
  t.after(() => client.disconnect());
  const log = [];
  client.on("disconnected", ({ code }) => log.push(`disconnected ${code}`));
  client.connect();
  const sub = client.subscribe("feed:x", {
    onPublication: (p) => log.push(`${p.text}@${p.epoch}`),
    onSubscribed: (info) => log.push(info),
    onJoin: (event) => log.push(["join", event]),
    onLeave: (event) => log.push(["leave", event]),
  });
  return { client, sub, log };
}

test("opens the socket with the subprotocol; the token goes in a connect command, the first frame", async (t) => {
  const { client, log } = setUp(t, { token: "t.o.k" });
  const socket = await FakeSocket.nth(0);
  assert.deepEqual(socket.protocols, [SUBPROTOCOL]);
  assert.equal(socket.url, "ws://herald.test/?x=1", "no token in the URL");
  assert.deepEqual(socket.sent, [], "nothing before the socket opens");
  socket.open();
  assert.deepEqual(socket.sent, [{ id: 1, connect: { token: "t.o.k" } }]);
  assert.equal(client.state, "connecting");
  socket.push({ id: 1, connected: { worker_id: "w1", connection_id: "1", user_id: "ana" } });
  assert.equal(client.state, "connected");
  assert.deepEqual(client.connection, { workerId: "w1", connectionId: "1", userId: "ana" });
  assert.deepEqual(socket.sent[1], { id: 2, subscribe: { channel: "feed:x" } }, "commands follow the connect");
  assert.deepEqual(log, []);
});

test("without a token, no connect command: the gateway's connected push opens the connection", async (t) => {
  const { client } = setUp(t);
  const socket = await FakeSocket.nth(0);
  socket.open();
  assert.deepEqual(socket.sent, []);
  socket.push(CONNECTED);
  assert.equal(client.state, "connected");
  assert.deepEqual(socket.sent, [{ id: 1, subscribe: { channel: "feed:x" } }]);
});

test("a gateway that checks no token greets at once and refuses the connect: no harm done", async (t) => {
  const { client, log } = setUp(t, { token: "t.o.k" });
  const errors = [];
  client.on("error", (error) => errors.push(error));
  const socket = await FakeSocket.nth(0);
  socket.open();
  socket.push(CONNECTED);
  socket.push({ id: 1, error: { code: 400, message: "already connected" } });
  assert.equal(client.state, "connected");
  assert.deepEqual(socket.sent.slice(1), [{ id: 2, subscribe: { channel: "feed:x" } }]);
  assert.deepEqual(errors, []);
  assert.deepEqual(log, []);
});

test("a refused connect token: the 4001 that follows gets a new token from getToken", async (t) => {
  let calls = 0;
  const { client } = setUp(t, { getToken: async () => `t.o.k${++calls}` });
  const first = await FakeSocket.nth(0);
  first.open();
  assert.deepEqual(first.sent, [{ id: 1, connect: { token: "t.o.k1" } }]);
  first.push({ id: 1, error: { code: 401, message: "token expired" } });
  first.end(CloseCode.TokenExpired, "token expired");
  const second = await FakeSocket.nth(1);
  assert.equal(second.url, "ws://herald.test/?x=1");
  second.open();
  assert.deepEqual(second.sent, [{ id: 2, connect: { token: "t.o.k2" } }]);
  second.push({ id: 2, connected: { worker_id: "w1", connection_id: "2" } });
  assert.equal(client.state, "connected");
});

test("a connect without a reply in time gives the connection up and tries again", async (t) => {
  const { client, log } = setUp(t, { token: "t.o.k", commandTimeoutMs: 20 });
  const first = await FakeSocket.nth(0);
  first.open();
  const second = await FakeSocket.nth(1);
  assert.equal(first.closedWith.code, CloseCode.Timeout);
  assert.match(first.closedWith.reason, /no reply to connect/);
  assert.deepEqual(log, [`disconnected ${CloseCode.Timeout}`]);
  second.open();
  second.push({ id: 2, connected: { worker_id: "w1", connection_id: "2" } });
  assert.equal(client.state, "connected");
});

test("an rpc or a send in flight when the connection drops fails with 499; neither is made again", async (t) => {
  const { client } = setUp(t);
  const first = await FakeSocket.nth(0);
  first.push(CONNECTED);
  first.push({ id: 1, subscribed: { channel: "feed:x" } });
  const call = client.rpc("math.add", '{"a":2,"b":3}');
  const sent = client.send(new Uint8Array([1, 2]));
  assert.deepEqual(first.sent.slice(1), [
    { id: 2, rpc: { method: "math.add", data: { text: '{"a":2,"b":3}' } } },
    { id: 3, send: { content: { binary: "AQI=" } } },
  ]);
  first.end(1006);
  await assert.rejects(call, {
    name: "HeraldError",
    code: ErrorCode.ConnectionClosed,
    message: /may or may not have handled/,
  });
  await assert.rejects(sent, { code: ErrorCode.ConnectionClosed, message: /may or may not get the message/ });
  const second = await FakeSocket.nth(1);
  second.push(CONNECTED);
  assert.deepEqual(second.sent, [{ id: 4, subscribe: { channel: "feed:x" } }], "neither is made again");
});

test("an rpc made while disconnected goes once connected; its answer is text or bytes", async (t) => {
  const { client } = setUp(t);
  const socket = await FakeSocket.nth(0);
  const text = client.rpc("echo", "hi");
  const bytes = client.rpc("echo", new Uint8Array([0, 255]));
  assert.deepEqual(socket.sent, []);
  socket.push(CONNECTED);
  assert.deepEqual(socket.sent.slice(0, 2), [
    { id: 1, rpc: { method: "echo", data: { text: "hi" } } },
    { id: 2, rpc: { method: "echo", data: { binary: "AP8=" } } },
  ]);
  socket.push({ id: 2, rpc: { data: { binary: "/wA=" } } });
  socket.push({ id: 1, rpc: { data: { text: "ih" } } });
  assert.equal(await text, "ih");
  assert.deepEqual(await bytes, new Uint8Array([255, 0]));
});

test("an rpc's own timeout overrides commandTimeoutMs; a late answer is dropped", async (t) => {
  const { client } = setUp(t);
  const socket = await FakeSocket.nth(0);
  socket.push(CONNECTED);
  const started = Date.now();
  await assert.rejects(client.rpc("slow", "x", { timeoutMs: 30 }), { code: ErrorCode.Timeout, message: /30 ms/ });
  assert.ok(Date.now() - started < 1_000);
  socket.push({ id: 2, rpc: { data: { text: "too late" } } });
  await assert.rejects(client.rpc("slow", "x", { timeoutMs: 0 }), RangeError);
});

test("a resubscribe recovers from the last publication handed on; duplicates are dropped", async (t) => {
  const { sub, log } = setUp(t);
  const first = await FakeSocket.nth(0);
  first.push(CONNECTED);
  assert.deepEqual(first.sent, [{ id: 1, subscribe: { channel: "feed:x" } }]);
  first.push({ id: 1, subscribed: { channel: "feed:x", position: { offset: 3, epoch: "e1" }, recoverable: true } });
  first.push(publication(4));
  first.push(publication(5));
  assert.deepEqual(sub.position, { offset: 5, epoch: "e1" });

  first.end(1006);
  assert.equal(sub.state, "subscribing");
  const second = await FakeSocket.nth(1);
  second.push(CONNECTED);
  assert.deepEqual(second.sent, [
    { id: 2, subscribe: { channel: "feed:x", recover: true, since: { offset: 5, epoch: "e1" } } },
  ]);
  second.push({
    id: 2,
    subscribed: {
      channel: "feed:x",
      position: { offset: 7, epoch: "e1" },
      recoverable: true,
      recovered: true,
      publications: [publication(5).publication, publication(6).publication, publication(7).publication],
    },
  });
  second.push(publication(7));
  second.push(publication(8));

  assert.deepEqual(log, [
    { resubscribed: false, recoverable: true, recovered: false, position: { offset: 3, epoch: "e1" } },
    "m4@e1",
    "m5@e1",
    "disconnected 1006",
    { resubscribed: true, recoverable: true, recovered: true, position: { offset: 7, epoch: "e1" } },
    "m6@e1",
    "m7@e1",
    "m8@e1",
  ]);
});

test("a resubscribe that could not recover says so, and goes on from the new epoch", async (t) => {
  const { log } = setUp(t);
  const first = await FakeSocket.nth(0);
  first.push(CONNECTED);
  first.push({ id: 1, subscribed: { channel: "feed:x", position: { offset: 2, epoch: "e1" }, recoverable: true } });
  first.end(1001);
  const second = await FakeSocket.nth(1);
  second.push(CONNECTED);
  second.push({ id: 2, subscribed: { channel: "feed:x", position: { offset: 9, epoch: "e2" }, recoverable: true } });
  second.push(publication(10, "e2"));
  second.end(1006);
  const third = await FakeSocket.nth(2);
  third.push(CONNECTED);
  assert.deepEqual(third.sent, [
    { id: 3, subscribe: { channel: "feed:x", recover: true, since: { offset: 10, epoch: "e2" } } },
  ]);
  assert.deepEqual(log.slice(1), [
    "disconnected 1001",
    { resubscribed: true, recoverable: true, recovered: false, position: { offset: 9, epoch: "e2" } },
    "m10@e2",
    "disconnected 1006",
  ]);
});

test("a channel without recovery is subscribed again plainly", async (t) => {
  setUp(t);
  const first = await FakeSocket.nth(0);
  first.push(CONNECTED);
  first.push({ id: 1, subscribed: { channel: "feed:x" } });
  first.end(1006);
  const second = await FakeSocket.nth(1);
  second.push(CONNECTED);
  assert.deepEqual(second.sent, [{ id: 2, subscribe: { channel: "feed:x" } }]);
});

test("a 503 on subscribe is retried; other refusals end the subscription", async (t) => {
  const { sub, client } = setUp(t);
  const errors = [];
  client.on("error", (error) => errors.push(error.code));
  const socket = await FakeSocket.nth(0);
  socket.push(CONNECTED);
  socket.push({ id: 1, error: { code: 503, message: "broker away" } });
  while (socket.sent.length < 2) await new Promise((done) => setTimeout(done, 1));
  assert.deepEqual(socket.sent[1], { id: 2, subscribe: { channel: "feed:x" } });
  assert.equal(sub.state, "subscribing");
  const ended = sub.subscribed();
  socket.push({ id: 2, error: { code: 403, message: "not for you" } });
  await assert.rejects(ended, { name: "HeraldError", code: 403, message: "not for you" });
  assert.equal(sub.state, "unsubscribed");
  assert.deepEqual(errors, [403], "a refusal without onError goes to the error event");
});

test("after a 4002 the client reports a bug and waits the longest delay", async (t) => {
  const { client } = setUp(t, { maxReconnectDelayMs: 50 });
  const delays = [];
  client.on("disconnected", ({ reconnectDelayMs }) => delays.push(reconnectDelayMs));
  const errors = [];
  client.on("error", (error) => errors.push(error.message));
  const socket = await FakeSocket.nth(0);
  socket.push(CONNECTED);
  socket.end(4002, "not JSON");
  assert.deepEqual(delays, [50]);
  assert.match(errors[0], /4002: not JSON/);
});

test("told to resubscribe, the subscription recovers from where it stands", async (t) => {
  const { sub, log } = setUp(t);
  const socket = await FakeSocket.nth(0);
  socket.push(CONNECTED);
  socket.push({ id: 1, subscribed: { channel: "feed:x", position: { offset: 3, epoch: "e1" }, recoverable: true } });
  socket.push(publication(4));
  socket.push({ unsubscribed: { channel: "feed:x", resubscribe: true, reason: "a publication was missed" } });
  assert.equal(sub.state, "subscribing");
  assert.deepEqual(socket.sent[1], {
    id: 2,
    subscribe: { channel: "feed:x", recover: true, since: { offset: 4, epoch: "e1" } },
  });
  socket.push({
    id: 2,
    subscribed: {
      channel: "feed:x",
      position: { offset: 6, epoch: "e1" },
      recoverable: true,
      recovered: true,
      publications: [publication(5).publication, publication(6).publication],
    },
  });
  socket.push(publication(7));
  assert.deepEqual(log.slice(1), [
    "m4@e1",
    { resubscribed: true, recoverable: true, recovered: true, position: { offset: 6, epoch: "e1" } },
    "m5@e1",
    "m6@e1",
    "m7@e1",
  ]);
});

test("a subscription the server ends on its own is over", async (t) => {
  const { sub, client } = setUp(t);
  const errors = [];
  client.on("error", (error) => errors.push(error));
  const socket = await FakeSocket.nth(0);
  socket.push(CONNECTED);
  socket.push({ id: 1, subscribed: { channel: "feed:x" } });
  socket.push({ unsubscribed: { channel: "feed:x", reason: "gone" } });
  assert.equal(sub.state, "unsubscribed");
  assert.deepEqual(
    errors.map((e) => [e.code, e.message]),
    [[410, "gone"]],
  );
  await sub.unsubscribe();
  assert.equal(socket.sent.length, 1, "nothing left to unsubscribe from");
});

test("a socket that fails without a close event is given up and replaced", async (t) => {
  const { log } = setUp(t);
  const first = await FakeSocket.nth(0);
  first.fail();
  assert.deepEqual(log, ["disconnected 1006"]);
  assert.deepEqual(first.closedWith, { code: undefined, reason: undefined });
  const second = await FakeSocket.nth(1);
  second.push(CONNECTED);
  assert.deepEqual(second.sent, [{ id: 1, subscribe: { channel: "feed:x" } }]);
});

test("with several gateways, each connection attempt goes to the next one, in turn", async (t) => {
  FakeSocket.made = [];
  const urls = ["ws://a.test/", "ws://b.test/?x=1", "ws://c.test/"];
  const client = new HeraldClient(urls, {
    WebSocket: FakeSocket,
    token: "t.o.k",
    minReconnectDelayMs: 1,
    maxReconnectDelayMs: 1,
  });
  t.after(() => client.disconnect());
  client.connect();
  const first = await FakeSocket.nth(0);
  first.push(CONNECTED);
  first.end(1006);
  (await FakeSocket.nth(1)).fail();
  (await FakeSocket.nth(2)).end(1006);
  const fourth = await FakeSocket.nth(3);
  fourth.push(CONNECTED);
  assert.equal(client.state, "connected");
  assert.deepEqual(
    FakeSocket.made.map((socket) => socket.url),
    ["ws://a.test/", "ws://b.test/?x=1", "ws://c.test/", "ws://a.test/"],
  );
});

test("without a gateway URL, the constructor refuses", () => {
  assert.throws(() => new HeraldClient([], { WebSocket: FakeSocket }), /no gateway URL/);
});

test("joins and leaves reach the handlers of their channel's subscription, while it holds", async (t) => {
  const { client, sub, log } = setUp(t);
  const other = client.subscribe("room:y", { onPublication: () => {}, onJoin: (e) => log.push(["other join", e]) });
  client.subscribe("feed:z", { onPublication: () => {} });
  const socket = await FakeSocket.nth(0);
  const subscribed = sub.subscribed();
  socket.push(CONNECTED);
  const join = (channel) => ({ join: { channel, info: { worker_id: "w2", connection_id: "7", user_id: "ana" } } });
  socket.push(join("feed:x"));
  assert.equal(log.length, 0, "not before the subscription holds");
  socket.push({ id: 1, subscribed: { channel: "feed:x" } });
  await subscribed;
  socket.push({ id: 2, subscribed: { channel: "room:y" } });
  socket.push({ id: 3, subscribed: { channel: "feed:z" } });
  socket.push(join("feed:x"));
  socket.push(join("room:y"));
  socket.push(join("feed:z"));
  socket.push({ leave: { channel: "feed:x", info: { worker_id: "w2", connection_id: "7" } } });
  other.unsubscribe();
  socket.push(join("room:y"));

  const event = { channel: "feed:x", workerId: "w2", connectionId: "7", userId: "ana" };
  assert.deepEqual(log.slice(1), [
    ["join", event],
    ["other join", { ...event, channel: "room:y" }],
    ["leave", { ...event, userId: "" }],
  ]);
});
