// Connection tokens that expire: refreshed over the open connection before
// they do, renewed on reconnect after a 4001, or the end when there is no
// getToken.
import assert from "node:assert/strict";
import test from "node:test";
import { CloseCode } from "../dist/index.js";
import { jwt, makeClient, nextEvent, sleep } from "./support/client.js";
import { startHerald } from "./support/herald.js";

const SECRET = "a-secret-of-at-least-32-bytes-for-hs256";
const JWT_ARGS = ["--client-auth", "jwt", "--jwt-secret", SECRET];

/** A token for ana that expires in `seconds`. */
function tokenFor(seconds) {
  const now = Math.floor(Date.now() / 1000);
  return jwt(SECRET, { sub: "ana", iat: now, exp: now + seconds });
}

test("getToken is called before the token expires, and the connection stays open", async (t) => {
  const herald = await startHerald(t, { args: JWT_ARGS });
  let calls = 0;
  const client = await makeClient(t, herald.wsUrl, {
    token: tokenFor(2),
    getToken: async () => {
      calls++;
      return tokenFor(2);
    },
  });
  const connectionId = client.connection.connectionId;
  const disconnects = [];
  client.on("disconnected", (info) => disconnects.push(info));
  await sleep(3_500);
  assert.ok(calls >= 1, `getToken was called ${calls} times`);
  assert.deepEqual(disconnects, []);
  assert.equal(client.connection.connectionId, connectionId);
  await client.subscribe("chat:still", { onPublication: () => {} }).subscribed();
});

test("after a 4001 the client gets a new token and reconnects", async (t) => {
  const herald = await startHerald(t, { args: JWT_ARGS });
  let calls = 0;
  const client = await makeClient(t, herald.wsUrl, {
    token: tokenFor(2),
    getToken: async () => {
      calls++;
      if (calls === 1) throw new Error("token service down");
      return tokenFor(600);
    },
  });
  const errors = [];
  client.on("error", (error) => errors.push(error.message));
  const disconnected = nextEvent(client, "disconnected");
  const reconnected = nextEvent(client, "connected");
  assert.equal((await disconnected).code, CloseCode.TokenExpired);
  assert.equal((await reconnected).userId, "ana");
  assert.deepEqual(errors, ["token service down"]);
  assert.equal(calls, 2);
});

test("without getToken, a 4001 ends the connection for good", async (t) => {
  const herald = await startHerald(t, { args: JWT_ARGS });
  const client = await makeClient(t, herald.wsUrl, { token: tokenFor(2) });
  const info = await nextEvent(client, "disconnected");
  assert.equal(info.code, CloseCode.TokenExpired);
  assert.equal(info.reconnectDelayMs, undefined);
  assert.equal(client.state, "disconnected");
});
