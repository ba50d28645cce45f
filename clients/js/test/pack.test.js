// The package as an app gets it: `npm pack` (whose prepack builds dist/) in
// a copy of the sources, the tarball installed offline into a fresh project,
// then imported there, type-checked, and used against a real herald.
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import test from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { startHerald } from "./support/herald.js";

const run = promisify(execFile);
const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");

const APP = `
import { HeraldClient } from "herald-client";

const client = new HeraldClient(process.argv[2]);
client.on("error", (error) => {
  console.error(error);
  process.exit(1);
});
client.subscribe("chat:pack", {
  onSubscribed: () => console.log("subscribed"),
  onPublication: (publication) => {
    console.log("got " + publication.text);
    client.disconnect();
  },
});
client.connect();
`;

const TYPED_APP = `
import {
  ErrorCode,
  HeraldClient,
  HeraldError,
  type PresenceEvent,
  type Publication,
  type RpcOptions,
  type SubscribedInfo,
} from "herald-client";

const urls = ["wss://push-a.example.com/", "wss://push-b.example.com/"];
const client = new HeraldClient(urls, { WebSocket, getToken: async () => "jwt" });
const sub = client.subscribe("chat:room", {
  onPublication: (publication: Publication) => console.log(publication.text ?? publication.data),
  onSubscribed: (info: SubscribedInfo) => console.log(info.recovered),
  onJoin: (event: PresenceEvent) => console.log(event.userId, "joined", event.channel),
  onLeave: ({ workerId, connectionId }: PresenceEvent) => console.log(workerId, connectionId, "left"),
});
sub.publish("hi").catch((error: HeraldError) => console.log(error.code));
const answer: Promise<string | Uint8Array> = client.rpc("math.add", new Uint8Array([2, 3]), { timeoutMs: 1_000 });
answer.then((sum) => console.log(typeof sum === "string" ? sum : sum.length));
const options: RpcOptions = {};
client.send("typing").then((nothing: void) => nothing, (error: HeraldError) => error.code === ErrorCode.NoBackend);
client.rpc("echo", "x", options);
client.connect();
`;

test("npm pack makes a tarball that installs offline and works in a fresh project", async (t) => {
  const work = await mkdtemp(join(tmpdir(), "herald-client-pack-"));
  t.after(() => rm(work, { recursive: true, force: true }));

  // Packed from a copy, so that prepack's build does not rewrite the dist/ other tests are reading.
  const pkg = join(work, "pkg");
  for (const file of ["package.json", "package-lock.json", "tsconfig.json", "README.md", "src"]) {
    await cp(join(root, file), join(pkg, file), { recursive: true });
  }
  await symlink(join(root, "node_modules"), join(pkg, "node_modules"), "dir");
  const { stdout } = await run("npm", ["pack", "--json", "--pack-destination", work], { cwd: pkg });
  const [packed] = JSON.parse(stdout);
  const files = packed.files.map((file) => file.path);
  for (const file of ["package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/client.js"]) {
    assert.ok(files.includes(file), `${file} is in the tarball: ${files.join(", ")}`);
  }
  assert.ok(!files.some((file) => file.startsWith("src/") || file.startsWith("test/")), files.join(", "));

  const app = join(work, "app");
  await mkdir(app);
  await writeFile(join(app, "package.json"), JSON.stringify({ name: "pack-test-app", private: true, type: "module" }));
  await run(
    "npm",
    [
      "install",
      "--offline",
      "--no-audit",
      "--no-fund",
      "--cache",
      join(work, "npm-cache"),
      join(work, packed.filename),
    ],
    { cwd: app },
  );
  const installed = JSON.parse(await readFile(join(app, "node_modules", "herald-client", "package.json"), "utf8"));
  assert.equal(installed.version, packed.version);

  await writeFile(join(app, "typed.ts"), TYPED_APP);
  await run(
    join(root, "node_modules", ".bin", "tsc"),
    ["--noEmit", "--strict", "--target", "es2022", "--module", "nodenext", "--lib", "es2022,dom", "typed.ts"],
    { cwd: app },
  );

  const herald = await startHerald(t);
  await writeFile(join(app, "main.js"), APP);
  const child = spawn(process.execPath, ["--experimental-websocket", "main.js", herald.wsUrl], { cwd: app });
  t.after(() => child.kill());
  let output = "";
  child.stderr.on("data", (chunk) => (output += chunk));
  const exited = new Promise((done) => child.once("exit", done));
  await new Promise((done, fail) => {
    child.stdout.on("data", (chunk) => {
      output += chunk;
      if (output.includes("subscribed")) done();
    });
    exited.then(() => fail(new Error(`the app exited early:\n${output}`)));
  });
  await herald.publish("chat:pack", "from the tarball");
  assert.equal(await exited, 0, output);
  assert.equal(output, "subscribed\ngot from the tarball\n");
});
