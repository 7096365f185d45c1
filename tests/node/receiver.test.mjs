// examples/node/pgt_recv.mjs — a Node rank that receives checkpoints with pgt's wasm module — against the
// real `pgt` binary over TCP (subprocesses on loopback, a fresh port and token each): from `pgt send`
// directly, as the relay of a chain to a Rust `pgt recv`, beside a Rust receiver in direct fan-out with
// many small messages, and with a wrong job token (a clean exit 3). Every tensor of every output is
// compared byte for byte with the input file.
//
// Needs the debug `pgt` binary ($PGT_BIN, else $CARGO_TARGET_DIR/debug/pgt: scripts/test.sh builds it
// with `cargo test --workspace` first), wasm/pkg-node (scripts/build-wasm.sh) and
// examples/node/node_modules (`npm ci --prefix examples/node`).
//
// Run: node --test tests/node/
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import crypto from "node:crypto";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.join(here, "..", "..");
const RECV = path.join(root, "examples", "node", "pgt_recv.mjs");
const target = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, "target");
const PGT = process.env.PGT_BIN || path.join(target, "debug", "pgt");
const JOB_MS = 60_000;

if (!existsSync(PGT)) throw new Error(`the pgt binary is missing at ${PGT}: cargo build -p pgt-host (or set PGT_BIN)`);

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Runs every rank of a job ({rank: [command, ...args]}); resolves to {rank: {code, stderr}}. */
async function runJob(ranks, { world, token = crypto.randomBytes(8).toString("hex"), tokens = {} } = {}) {
  const port = await freePort();
  const procs = Object.entries(ranks).map(([rank, [cmd, ...args]]) => {
    const env = {
      ...process.env,
      MASTER_ADDR: "127.0.0.1",
      MASTER_PORT: String(port),
      RANK: rank,
      WORLD_SIZE: String(world ?? Object.keys(ranks).length),
      PGT_TOKEN: tokens[rank] ?? token,
      PGT_TIMEOUT_SECS: "20",
    };
    delete env.RUST_LOG;
    const child = spawn(cmd, args, { env, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d) => (stderr += d));
    const killer = setTimeout(() => child.kill("SIGKILL"), JOB_MS);
    return new Promise((resolve) =>
      child.on("close", (code) => {
        clearTimeout(killer);
        resolve([rank, { code, stderr }]);
      }),
    );
  });
  return Object.fromEntries(await Promise.all(procs));
}

/** {name: {dtype, shape, bytes}} and the metadata of a safetensors file. */
function readSafetensors(file) {
  const b = readFileSync(file);
  const n = Number(b.readBigUInt64LE(0));
  const header = JSON.parse(b.subarray(8, 8 + n).toString("utf8"));
  const data = b.subarray(8 + n);
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    tensors[name] = { dtype: t.dtype, shape: t.shape, bytes: data.subarray(t.data_offsets[0], t.data_offsets[1]) };
  }
  return { tensors, metadata: header.__metadata__ ?? null };
}

/** A checkpoint of several dtypes, one of them large enough to need several chunks. */
function writeCheckpoint(file) {
  const specs = [
    ["model.layers.0.weight", "F32", [512, 300], 4],
    ["model.layers.0.bias", "BF16", [300], 2],
    ["model.embed", "F16", [64, 33], 2],
    ["ids", "I64", [1000], 8],
    ["mask", "BOOL", [17], 1],
    ["empty", "F32", [0, 4], 4],
  ];
  const header = { __metadata__: { "pgt.step": "42" } };
  const blobs = [];
  let off = 0;
  for (const [name, dtype, shape, es] of specs) {
    const n = shape.reduce((a, b) => a * b, es);
    const bytes = crypto.randomBytes(n);
    if (dtype === "BOOL") for (let i = 0; i < n; i++) bytes[i] &= 1;
    header[name] = { dtype, shape, data_offsets: [off, off + n] };
    blobs.push(bytes);
    off += n;
  }
  let h = Buffer.from(JSON.stringify(header));
  h = Buffer.concat([h, Buffer.alloc((8 - (h.length % 8)) % 8, " ")]);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(h.length));
  writeFileSync(file, Buffer.concat([size, h, ...blobs]));
}

function assertSameTensors(got, want) {
  const a = readSafetensors(got);
  const b = readSafetensors(want);
  assert.deepEqual(Object.keys(a.tensors).sort(), Object.keys(b.tensors).sort(), got);
  for (const [name, t] of Object.entries(b.tensors)) {
    assert.equal(a.tensors[name].dtype, t.dtype, `${got}: ${name}`);
    assert.deepEqual(a.tensors[name].shape, t.shape, `${got}: ${name}`);
    assert.ok(a.tensors[name].bytes.equals(t.bytes), `${got}: ${name} bytes differ`);
  }
  assert.equal(a.metadata?.["pgt.step"], "42", `${got}: step`);
}

function setup() {
  const dir = mkdtempSync(path.join(os.tmpdir(), "pgt-node-"));
  const input = path.join(dir, "in.safetensors");
  writeCheckpoint(input);
  return { dir, input };
}

const ok = (res) => {
  for (const [rank, r] of Object.entries(res)) assert.equal(r.code, 0, `rank ${rank}: ${r.stderr}`);
};

test("a Node rank receives a checkpoint from pgt send", async () => {
  const { dir, input } = setup();
  const out = path.join(dir, "node.safetensors");
  ok(await runJob({ 0: [PGT, "send", input, "--quiet"], 1: ["node", RECV, "--out", out, "-q"] }));
  assertSameTensors(out, input);
});

test("a Node rank relays a chain to a Rust receiver", async () => {
  const { dir, input } = setup();
  const node = path.join(dir, "node.safetensors");
  const rust = path.join(dir, "rust.safetensors");
  ok(
    await runJob({
      0: [PGT, "send", input, "--dst", "1,2", "--fanout", "chain", "--chunk-size", "64KiB", "--bucket-size", "16KiB", "--quiet"],
      1: ["node", RECV, "--out", node, "-q"],
      2: [PGT, "recv", "--out", rust, "--quiet"],
    }),
  );
  assertSameTensors(node, input);
  assertSameTensors(rust, input);
});

test("direct fan-out in many small messages, beside a Rust receiver", async () => {
  const { dir, input } = setup();
  const node = path.join(dir, "node.safetensors");
  const rust = path.join(dir, "rust.safetensors");
  ok(
    await runJob({
      0: [PGT, "send", input, "--fanout", "direct", "--chunk-size", "4KiB", "--bucket-size", "1KiB", "--quiet"],
      1: [PGT, "recv", "--out", rust, "--quiet"],
      2: ["node", RECV, "--out", node, "-q"],
    }),
  );
  assertSameTensors(node, input);
  assertSameTensors(rust, input);
});

test("a wrong job token fails cleanly", async () => {
  const { dir, input } = setup();
  const res = await runJob(
    { 0: [PGT, "send", input, "--quiet", "--timeout", "5"], 1: ["node", RECV, "--out", path.join(dir, "x.safetensors"), "-q"] },
    { tokens: { 1: "not-the-token" } },
  );
  assert.equal(res[1].code, 3, res[1].stderr);
  assert.match(res[1].stderr, /auth/);
  assert.notEqual(res[0].code, 0);
});
