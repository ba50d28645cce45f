// rpc and send against a real herald and a real backend
// (support/backend.py, Python grpcio): answers in text and in bytes, the
// refusals (no backend, the backend's own, a backend too slow), and a send
// reaching a ConsumeEvents consumer as a message event of the connection.
import assert from "node:assert/strict";
import test from "node:test";
import { ErrorCode, HeraldError } from "../dist/index.js";
import { startBackend } from "./support/backend.js";
import { jwt, makeClient, nextEvent } from "./support/client.js";
import { startHerald } from "./support/herald.js";

const SECRET = "a-secret-of-at-least-32-bytes-for-hs256";

test("an rpc is answered by the backend serving its method, in text or in bytes", async (t) => {
  const herald = await startHerald(t);
  const backend = await startBackend(herald);
  const client = await makeClient(t, herald.wsUrl);

  assert.equal(await client.rpc("echo.reverse", "herald"), "dlareh");
  assert.equal(await client.rpc("math.add", JSON.stringify({ a: 2, b: 3 })), "5");
  const bytes = await client.rpc("echo.reverse", new Uint8Array([0, 1, 2, 255]));
  assert.ok(bytes instanceof Uint8Array, `bytes come back as a Uint8Array: ${bytes}`);
  assert.deepEqual(bytes, new Uint8Array([255, 2, 1, 0]));
  assert.equal(await client.rpc("echo.reverse", ""), "", "empty text");

  const calls = await backend.calls.until(4);
  assert.deepEqual(
    calls.map((call) => call.method),
    ["echo.reverse", "math.add", "echo.reverse", "echo.reverse"],
  );
  const { workerId, connectionId } = client.connection;
  assert.deepEqual(calls[0].connection, { worker_id: workerId, connection_id: connectionId });
  assert.equal(calls[0].user_id, "");
});

test("several rpcs at once are each answered", async (t) => {
  const herald = await startHerald(t);
  await startBackend(herald);
  const client = await makeClient(t, herald.wsUrl);
  const words = Array.from({ length: 20 }, (_, i) => `word-${i}`);
  const answers = await Promise.all(words.map((word) => client.rpc("echo.reverse", word)));
  assert.deepEqual(
    answers,
    words.map((word) => [...word].reverse().join("")),
  );
});

test("the caller's user, from the token given with connect, reaches the backend", async (t) => {
  const herald = await startHerald(t, { args: ["--client-auth", "jwt", "--jwt-secret", SECRET] });
  const backend = await startBackend(herald);
  const token = jwt(SECRET, { sub: "ana", exp: Math.floor(Date.now() / 1000) + 600 });
  const client = await makeClient(t, herald.wsUrl, { token });
  assert.equal(await client.rpc("echo.reverse", "ana"), "ana");
  const [call] = await backend.calls.until(1);
  assert.equal(call.user_id, "ana");
});

test("an rpc no backend serves is refused with 404; the connection stays", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  const connection = client.connection;
  const refused = client.rpc("nobody.home", "anyone?");
  await assert.rejects(refused, { name: "HeraldError", code: ErrorCode.NoBackend });
  await assert.rejects(refused, (error) => error instanceof HeraldError && /.+/.test(error.message));
  await assert.rejects(client.rpc("bad method!", "x"), { code: ErrorCode.BadCommand });
  await startBackend(herald);
  assert.equal(await client.rpc("echo.reverse", "still here"), "ereh llits");
  assert.deepEqual(client.connection, connection);
});

test("a backend's refusal reaches the caller with its code and message", async (t) => {
  const herald = await startHerald(t);
  await startBackend(herald);
  const client = await makeClient(t, herald.wsUrl);
  await assert.rejects(client.rpc("refuse.always", "please"), {
    name: "HeraldError",
    code: 422,
    message: "the backend says no",
  });
  // A code clients may not see (not 400-599 nor 1000 and up) arrives as 500.
  await assert.rejects(client.rpc("refuse.oddly", "please"), { code: ErrorCode.Internal });
  assert.equal(await client.rpc("math.add", '{"a":40,"b":2}'), "42");
});

test("an rpc no backend answers in time fails with 504 after the gateway's --rpc-timeout", async (t) => {
  const herald = await startHerald(t, { args: ["--rpc-timeout", "300ms"] });
  const backend = await startBackend(herald);
  const client = await makeClient(t, herald.wsUrl);
  const started = Date.now();
  await assert.rejects(client.rpc("never.answers", "hello?"), { name: "HeraldError", code: ErrorCode.BackendTimeout });
  const took = Date.now() - started;
  assert.ok(took >= 250 && took < 3_000, `504 after ${took} ms`);
  const [call] = await backend.calls.until(1);
  assert.equal(call.timeout_ms, 300);
  // The client's own, shorter timeout comes first: 408.
  await assert.rejects(client.rpc("never.answers", "hello?", { timeoutMs: 50 }), { code: ErrorCode.Timeout });
  assert.equal(await client.rpc("echo.reverse", "ok"), "ko");
});

test("an rpc in flight when the connection drops fails with 499; after the reconnect rpcs work again", async (t) => {
  // The gateway is killed: its connection ends at once, whatever it was doing.
  const [doomed, survivor] = [await startHerald(t), await startHerald(t)];
  const backend = await startBackend(doomed);
  await startBackend(survivor);
  const client = await makeClient(t, [doomed.wsUrl, survivor.wsUrl], {
    minReconnectDelayMs: 50,
    maxReconnectDelayMs: 300,
  });
  const call = client.rpc("never.answers", "hello?");
  await backend.calls.until(1);
  const reconnected = nextEvent(client, "connected");
  const failed = assert.rejects(call, {
    name: "HeraldError",
    code: ErrorCode.ConnectionClosed,
    message: /the backend may or may not have handled the call/,
  });
  await doomed.kill();
  await failed;
  await reconnected;
  assert.equal(await client.rpc("echo.reverse", "again"), "niaga");
  assert.equal(backend.calls.items.length, 1, "the call in flight was not made again");
});

test("a send reaches a ConsumeEvents consumer as a message event of the connection", async (t) => {
  const herald = await startHerald(t, { args: ["--events", "message"] });
  const backend = await startBackend(herald, { serve: false, consume: "js-tests" });
  const client = await makeClient(t, herald.wsUrl);
  await client.send("hello backends");
  await client.send(new Uint8Array([0, 1, 2, 255]));
  const events = await backend.events.until(2);
  const { workerId, connectionId } = client.connection;
  const address = { worker_id: workerId, connection_id: connectionId };
  assert.deepEqual(events, [
    { kind: "message", connection: address, user_id: "", content: { text: "hello backends" } },
    { kind: "message", connection: address, user_id: "", content: { binary: "AAEC/w==" } },
  ]);
});

test("a send where the gateway passes no messages to backends is refused with 403", async (t) => {
  const herald = await startHerald(t);
  const client = await makeClient(t, herald.wsUrl);
  await assert.rejects(client.send("anyone?"), { name: "HeraldError", code: ErrorCode.NotAllowed });
  assert.equal(client.state, "connected");
});
