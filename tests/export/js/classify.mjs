// Classify sentences with an hf_compress ONNX export, through transformers.js, offline.
//
//   node classify.mjs MODEL_FOLDER [fp32|q8] "sentence one" "sentence two" ...
//
// MODEL_FOLDER is a transformers.js model repository on disk (config.json, tokenizer.json, onnx/model.onnx and
// onnx/model_quantized.onnx, as `hf_compress.export.export_onnx` writes it). Prints one JSON array on stdout:
// [{"label": ..., "score": ...}, ...], one object per sentence.
import path from "node:path";
import { env, pipeline } from "@huggingface/transformers";

const [folder, dtype, ...sentences] = process.argv.slice(2);
if (!folder || !["fp32", "q8"].includes(dtype) || sentences.length === 0) {
  console.error('usage: node classify.mjs MODEL_FOLDER fp32|q8 "sentence" ...');
  process.exit(2);
}
env.allowRemoteModels = false; // never the Hub: only the local folder
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(folder));

const classify = await pipeline("text-classification", path.basename(path.resolve(folder)), { dtype });
const results = [];
for (const sentence of sentences) {
  const [best] = await classify(sentence);
  results.push({ label: best.label, score: best.score });
}
console.log(JSON.stringify(results));
