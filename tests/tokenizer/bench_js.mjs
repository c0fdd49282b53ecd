// bench_js.mjs — encode throughput of the JavaScript reference (@huggingface/tokenizers), for
// `moe bench tokenize`: same corpus, same protocol as moe::bench_encode (one untimed pass, then
// timed passes until MIN_SECONDS). Prints one JSON line {bytes, seconds, tokens, mb_per_s}.
// usage: node bench_js.mjs TOKENIZER_DIR CORPUS.jsonl [MIN_SECONDS]
import fs from "fs";
import path from "path";
import { Tokenizer } from "@huggingface/tokenizers";

const [dir, corpusPath, minSecondsArg] = process.argv.slice(2);
if (!dir || !corpusPath) { console.error("usage: node bench_js.mjs TOKENIZER_DIR CORPUS.jsonl [MIN_SECONDS]"); process.exit(2); }
const minSeconds = Number(minSecondsArg ?? 2);
const tj = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer.json"), "utf8"));
const cfgPath = path.join(dir, "tokenizer_config.json");
const tc = fs.existsSync(cfgPath) ? JSON.parse(fs.readFileSync(cfgPath, "utf8")) : {};
const tok = new Tokenizer(tj, tc);
const texts = fs.readFileSync(corpusPath, "utf8").split("\n").filter((l) => l.length).map((l) => JSON.parse(l));
const enc = new TextEncoder();
const sizes = texts.map((t) => enc.encode(t).length);
for (const t of texts) tok.encode(t);
let bytes = 0, tokens = 0;
const t0 = process.hrtime.bigint();
let seconds = 0;
do {
  for (let i = 0; i < texts.length; ++i) {
    tokens += tok.encode(texts[i]).ids.length;
    bytes += sizes[i];
  }
  seconds = Number(process.hrtime.bigint() - t0) / 1e9;
} while (seconds < minSeconds);
console.log(JSON.stringify({ bytes, seconds, tokens, mb_per_s: bytes / seconds / 1e6 }));
