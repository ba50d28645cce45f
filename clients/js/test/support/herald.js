/**
 * A real `herald standalone` process for the tests: started on free ports
 * (learnt from its stdout), reached through its HTTP API to publish and
 * control, and by backends through its broker's gRPC address; stopped with
 * SIGTERM, or killed as a crash would. The binary is $HERALD_BIN, else the
 * workspace's target/debug/herald; a missing binary fails the test.
 */

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** The herald binary the tests run. */
export const HERALD_BIN = process.env.HERALD_BIN ?? resolve(here, "../../../../target/debug/herald");

/** The namespaces the tests use. */
export const CHAT = "chat:subscribe=anyone,publish=subscribers,presence=on";
export const NEWS = "news:subscribe=anyone";
export const FEED = "feed:subscribe=anyone,history=1000,history_ttl=10m,recover=on";
export const ROOM = "room:subscribe=anyone,join_leave=on";

const STARTUP_TIMEOUT_MS = 10_000;

/**
 * Starts herald with these namespaces and extra arguments, and stops it when
 * the test ends. Resolves once its WebSocket and HTTP ports are known.
 */
export async function startHerald(t, { namespaces = [CHAT], args = [] } = {}) {
  if (!existsSync(HERALD_BIN)) {
    throw new Error(
      `no herald binary at ${HERALD_BIN}: build it with \`cargo build -p herald\` at the workspace root, or set HERALD_BIN`,
    );
  }
  const child = spawn(
    HERALD_BIN,
    [
      "standalone",
      ...["--broker-listen", "--ws-listen", "--http-listen", "--admin-listen"].flatMap((flag) => [flag, "127.0.0.1:0"]),
      ...namespaces.flatMap((namespace) => ["--namespace", namespace]),
      ...args,
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const exited = new Promise((done) => child.once("exit", (code, signal) => done({ code, signal })));
  // What must stop before herald does: its backends, whose open ServeCalls
  // and ConsumeEvents streams would hold up its graceful shutdown.
  const first = [];
  t.after(async () => {
    await Promise.all(first.map((stop) => stop()));
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    await exited;
    clearTimeout(timer);
  });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (chunk) => (stderr += chunk));

  const ports = await new Promise((done, fail) => {
    const found = {};
    let stdout = "";
    const timer = setTimeout(
      () => fail(new Error(`herald did not start in time:\n${stdout}${stderr}`)),
      STARTUP_TIMEOUT_MS,
    );
    child.stdout.setEncoding("utf8").on("data", (chunk) => {
      stdout += chunk;
      for (const [, role, port] of stdout.matchAll(/^herald: (broker|ws|http) listening on 127\.0\.0\.1:(\d+)$/gm)) {
        found[role] = Number(port);
      }
      if (found.broker && found.ws && found.http) {
        clearTimeout(timer);
        done(found);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      fail(new Error(`herald exited (${code ?? signal}) before listening:\n${stdout}${stderr}`));
    });
  });

  const http = `http://127.0.0.1:${ports.http}`;
  const post = async (path, body) => {
    const response = await fetch(`${http}${path}`, { method: "POST", body: JSON.stringify(body) });
    const answer = await response.text();
    if (!response.ok) throw new Error(`POST ${path} ${JSON.stringify(body)}: ${response.status} ${answer}`);
    return JSON.parse(answer);
  };
  return {
    wsUrl: `ws://127.0.0.1:${ports.ws}/`,
    /** The broker's gRPC address, host:port, for backends. */
    broker: `127.0.0.1:${ports.broker}`,
    /** Publishes to a channel as a backend: a string as text, else a Content object. */
    publish: (channel, content) =>
      post("/v1/publish", { target: { channel }, content: typeof content === "string" ? { text: content } : content }),
    /** Sends text to every connection directly. */
    broadcast: (text) => post("/v1/publish", { target: { broadcast: {} }, content: { text } }),
    /** Runs a connection control (POST /v1/control). */
    control: (body) => post("/v1/control", body),
    /** Has `stop` (async) run before herald is stopped at the test's end. */
    beforeStop: (stop) => first.push(stop),
    /** Kills herald at once (SIGKILL), as a crash would; resolves once it is gone. */
    kill: () => {
      child.kill("SIGKILL");
      return exited;
    },
  };
}
