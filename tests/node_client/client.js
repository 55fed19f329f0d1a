// A tokenpool client in JavaScript: loads the public .proto alone and streams one
// completion. Usage: node client.js HOST:PORT MODEL MAX_TOKENS PROMPT
// Prints one JSON line: {"token_ids": [...], "text": "...", "finish_reason": "...", "usage": {...}}
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, model, maxTokens, prompt] = process.argv.slice(2);
const protos = path.resolve(__dirname, "../../protos");
const definition = protoLoader.loadSync(path.join(protos, "v1/inference.proto"), {
  includeDirs: [protos], keepCase: true, longs: Number, enums: String, defaults: true,
});
const { Inference } = grpc.loadPackageDefinition(definition).tokenpool.v1;
const client = new Inference(address, grpc.credentials.createInsecure());

const result = { token_ids: [], text: "", finish_reason: null, usage: null };
const call = client.Generate({ model, text: prompt, sampling: { max_tokens: Number(maxTokens), ignore_eos: true } });
call.on("data", (r) => {
  result.token_ids.push(...r.token_ids);
  result.text += r.text;
  if (r.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
    result.finish_reason = r.finish_reason;
    result.usage = r.usage;
  }
});
call.on("error", (e) => { console.error(`${e.code}: ${e.details}`); process.exit(2); });
call.on("end", () => { console.log(JSON.stringify(result)); client.close(); });
