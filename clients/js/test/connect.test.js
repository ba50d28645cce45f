// Connecting to a real herald: the connected push, the token in a connect
// command (never in the URL), a refused token, disconnecting, and a
// backend's close (4000) followed by a reconnect.
import assert from "node:assert/strict";
import test from "node:test";
import { CloseCode, HeraldClient } from "../dist/index.js";
import { jwt, makeClient, nextEvent } from "./support/client.js";
import { startHerald } from "./support/herald.js";

const SECRET = "a-secret-of-at-least-32-bytes-for-hs256";

test("connects and gets its address; disconnect() ends it for good", async (t) => {
  const herald = await startHerald(t);
  const client = new HeraldClient(herald.wsUrl);
  assert.equal(client.state, "disconnected");
  const connected = nextEvent(client, "connected");
  client.connect();
  assert.equal(client.state, "connecting");
  const info = await connected;
  assert.match(info.workerId, /.+/);
  assert.match(info.connectionId, /^\d+$/);
  assert.equal(info.userId, "");
  assert.equal(client.state, "connected");
  assert.deepEqual(client.connection, info);

  const disconnected = nextEvent(client, "disconnected");
  client.disconnect();
  assert.deepEqual(await disconnected, {
    code: CloseCode.Normal,
    reason: "client disconnected",
    reconnectDelayMs: undefined,
  });
  assert.equal(client.state, "disconnected");
  assert.equal(client.connection, undefined);
});

/** A WebSocket constructor that records the URLs it opens. */
function recordingWebSocket() {
  const urls = [];
  class RecordingWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(url);
    }
  }
  return { WebSocket: RecordingWebSocket, urls };
}

test("sends its token in a connect command, not in the URL; the user id comes from it", async (t) => {
  const herald = await startHerald(t, { args: ["--client-auth", "jwt", "--jwt-secret", SECRET] });
  const token = jwt(SECRET, { sub: "ana", exp: Math.floor(Date.now() / 1000) + 600 });
  const recording = recordingWebSocket();
  const client = await makeClient(t, herald.wsUrl, { token, WebSocket: recording.WebSocket });
  assert.equal(client.connection.userId, "ana");
  assert.deepEqual(recording.urls, [herald.wsUrl]);
  await client.subscribe("chat:signed-in", { onPublication: () => {} }).subscribed();
});

test("a token where the gateway checks none is harmless", async (t) => {
  const herald = await startHerald(t);
  const errors = [];
  const client = await makeClient(t, herald.wsUrl, { token: "not.a.jwt" });
  client.on("error", (error) => errors.push(error));
  assert.equal(client.connection.userId, "");
  await client.subscribe("chat:anyone", { onPublication: () => {} }).subscribed();
  assert.deepEqual(errors, []);
});

test("a refused token closes with 4001; without getToken the client stops there", async (t) => {
  const herald = await startHerald(t, { args: ["--client-auth", "jwt", "--jwt-secret", SECRET] });
  const token = jwt("another-secret-of-at-least-32-bytes!!", { sub: "eve", exp: Math.floor(Date.now() / 1000) + 600 });
  const client = await makeClient(t, herald.wsUrl, { token, connect: false });
  const disconnected = nextEvent(client, "disconnected");
  client.connect();
  const info = await disconnected;
  assert.equal(info.code, CloseCode.TokenExpired);
  assert.equal(info.reconnectDelayMs, undefined);
  assert.equal(client.state, "disconnected");
});

test("a refused token is replaced with getToken's, and the client connects", async (t) => {
  const herald = await startHerald(t, { args: ["--client-auth", "jwt", "--jwt-secret", SECRET] });
  let calls = 0;
  const client = await makeClient(t, herald.wsUrl, {
    token: jwt("another-secret-of-at-least-32-bytes!!", { sub: "eve", exp: Math.floor(Date.now() / 1000) + 600 }),
    getToken: async () => {
      calls++;
      return jwt(SECRET, { sub: "bob", exp: Math.floor(Date.now() / 1000) + 600 });
    },
    minReconnectDelayMs: 10,
  });
  assert.equal(client.connection.userId, "bob", "refused first, then connected with getToken's token");
  assert.equal(calls, 1);
});

test("gets its first token from getToken", async (t) => {
  const herald = await startHerald(t, { args: ["--client-auth", "jwt", "--jwt-secret", SECRET] });
  const client = await makeClient(t, herald.wsUrl, {
    getToken: async () => jwt(SECRET, { sub: "bob", exp: Math.floor(Date.now() / 1000) + 600 }),
  });
  assert.equal(client.connection.userId, "bob");
});

test("a backend's close is told with its code, and the client reconnects", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const first = client.connection;
  const disconnected = nextEvent(client, "disconnected");
  const reconnected = nextEvent(client, "connected");
  await herald.control({
    close: {
      selection: { connection: { worker_id: first.workerId, connection_id: first.connectionId } },
      reason: "bye",
    },
  });
  const info = await disconnected;
  assert.equal(info.code, CloseCode.ClosedByBackend);
  assert.equal(info.reason, "bye");
  assert.equal(typeof info.reconnectDelayMs, "number");
  assert.notEqual((await reconnected).connectionId, first.connectionId);
});

test("without a WebSocket to use, the constructor says how to get one", (t) => {
  const descriptor = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  delete globalThis.WebSocket;
  t.after(() => Object.defineProperty(globalThis, "WebSocket", descriptor));
  assert.throws(() => new HeraldClient("ws://127.0.0.1:1/"), /--experimental-websocket/);
});
