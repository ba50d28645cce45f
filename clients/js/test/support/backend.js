/**
 * A herald backend for the tests: test/support/backend.py (Python grpcio,
 * stubs generated from proto/ at run time), serving calls (ServeCalls) and
 * consuming connection events (ConsumeEvents) on a herald's broker, stopped
 * when the test ends. Python is $HERALD_PYTHON, else `python3`, which must
 * have grpcio and grpcio-tools: the workspace's test venv has them (`source
 * .test-tools/env.sh` at the workspace root puts it on PATH).
 */

import { spawn } from "node:child_process";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { collector } from "./client.js";

const here = dirname(fileURLToPath(import.meta.url));
const PYTHON = process.env.HERALD_PYTHON ?? "python3";
const PROTO = resolve(here, "../../../../proto");
const STARTUP_TIMEOUT_MS = 20_000;

/**
 * Starts a backend on `herald`'s broker (see startHerald): with `serve`,
 * serving the methods backend.py lists; with `consume`, consuming that
 * group's events. It is stopped before herald is. Resolves once it serves
 * and consumes, with collectors of the calls and events it saw (as
 * backend.py prints them).
 */
export async function startBackend(herald, { serve = true, consume } = {}) {
  const args = [resolve(here, "backend.py"), "--proto", PROTO, "--broker", herald.broker];
  if (serve) args.push("--serve");
  if (consume !== undefined) args.push("--consume", consume);
  let stderr = "";
  const child = spawn(PYTHON, args, { stdio: ["pipe", "pipe", "pipe"] });
  const exited = new Promise((done) => child.once("exit", (code, signal) => done({ code, signal })));
  // A failed spawn (no such Python) is reported by the exit below.
  child.once("error", (error) => (stderr += `${error}\n`));
  // Before herald: a backend's open stream holds up herald's graceful shutdown.
  herald.beforeStop(async () => {
    child.stdin.end();
    child.kill("SIGTERM");
    await exited;
  });
  child.stderr.setEncoding("utf8").on("data", (chunk) => (stderr += chunk));
  const calls = collector();
  const events = collector();
  const ready = new Promise((done, fail) => {
    const timer = setTimeout(
      () => fail(new Error(`the backend did not start in time:\n${stderr}`)),
      STARTUP_TIMEOUT_MS,
    );
    createInterface({ input: child.stdout }).on("line", (line) => {
      const said = JSON.parse(line);
      if (said.ready) {
        clearTimeout(timer);
        done();
      } else if (said.call) {
        calls.push(said.call);
      } else if (said.event) {
        events.push(said.event);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      fail(
        new Error(
          `the backend (${PYTHON} backend.py) exited (${code ?? signal}) before it was ready; it needs grpcio and ` +
            `grpcio-tools (\`source .test-tools/env.sh\` at the workspace root, or set HERALD_PYTHON):\n${stderr}`,
        ),
      );
    });
  });
  await ready;
  return { calls, events };
}
