// Calls a running AuthPool server from Node.js, the way a TypeScript or
// JavaScript service would: @grpc/grpc-js for the transport, @grpc/proto-loader
// to read protos/authpool/v1/authpool.proto at run time (no generated code).
//
// Usage: AUTHPOOL_TARGET=127.0.0.1:50051 AUTHPOOL_TOKEN=... node authpool_interop.mjs [client_id]
//
// Prints one JSON document on stdout: the Allocate answer, the Status answer,
// the first events of WatchEvents (up to and including this lease's grant),
// and what a call without the token got. The token itself is never printed.

import path from "node:path";
import { fileURLToPath } from "node:url";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

const here = path.dirname(fileURLToPath(import.meta.url));
const PROTOS = path.resolve(here, "..", "..", "protos");

const target = process.env.AUTHPOOL_TARGET;
const token = process.env.AUTHPOOL_TOKEN;
if (!target || !token) {
  console.error("set AUTHPOOL_TARGET (host:port) and AUTHPOOL_TOKEN (an operator token)");
  process.exit(2);
}
const clientId = process.argv[2] ?? "node-worker-1";

// includeDirs: our protos/ root, so "authpool/v1/authpool.proto" resolves with its package path.
// The google/protobuf imports (timestamp, duration) are protobufjs's bundled well-known types.
const definition = protoLoader.loadSync("authpool/v1/authpool.proto", {
  includeDirs: [PROTOS],
  keepCase: true, // field names as in the .proto (lease_id), as grpcurl prints them
  longs: String, // uint64/int64 as decimal strings: no precision lost above 2^53
  enums: String, // enum names, not numbers
  defaults: true,
  oneofs: true,
});
const { AuthPool } = grpc.loadPackageDefinition(definition).authpool.v1;

const client = new AuthPool(target, grpc.credentials.createInsecure());

function bearer() {
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

const deadline = (seconds) => new Date(Date.now() + seconds * 1000);

function unary(method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadline(5) }, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

// Reads events from the start of the log until this lease's grant, then cancels the stream.
function watchUntilGranted(leaseId) {
  return new Promise((resolve, reject) => {
    const events = [];
    const stream = client.WatchEvents({ after_sequence: 0 }, bearer(), { deadline: deadline(10) });
    stream.on("data", (message) => {
      if (message.message !== "event") return;
      events.push(message.event);
      if (message.event.type === "EVENT_TYPE_LEASE_GRANTED" && message.event.lease_id === leaseId) {
        stream.cancel();
        resolve(events);
      }
    });
    stream.on("error", (error) => {
      if (error.code === grpc.status.CANCELLED) return; // our own cancel, after resolve
      reject(error);
    });
  });
}

async function main() {
  const allocate = await unary("Allocate", { client_id: clientId, labels: { lang: "node" } }, bearer());
  const status = await unary("Status", { include_clients: true }, bearer());
  const events = await watchUntilGranted(allocate.lease.lease_id);
  let unauthenticated = null;
  try {
    await unary("Allocate", { client_id: clientId }, new grpc.Metadata());
  } catch (error) {
    unauthenticated = { code: error.code, name: grpc.status[error.code], details: error.details };
  }
  process.stdout.write(JSON.stringify({ allocate, status, events, unauthenticated }) + "\n");
}

main()
  .catch((error) => {
    console.error(`interop failed: ${error.code ?? ""} ${error.details ?? error.message}`);
    process.exitCode = 1;
  })
  .finally(() => client.close());
