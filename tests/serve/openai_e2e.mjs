// openai_e2e.mjs — end-to-end checks of `moe serve` through the official `openai` npm client.
// usage: node openai_e2e.mjs BASE_URL API_KEY MODEL SERVER_PID
// Prints one "ok:"/"FAIL:" line per check and a final JSON line with the load-test numbers;
// exits 1 if any check failed. Run by tests/cli/serve_openai.sh.
import OpenAI from "openai";
import { readFileSync } from "node:fs";

const [baseURL, apiKey, model, pidArg] = process.argv.slice(2);
const pid = Number(pidArg);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120000 });
let fails = 0;
const check = (cond, what) => {
  console.log(`${cond ? "ok:  " : "FAIL:"} ${what}`);
  if (!cond) fails++;
};
const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
// The server hands freed memory back after 0.2 s idle (malloc_trim); the resident set of an idle
// server is the smallest of samples over the next 2 s (a leak stays in every sample).
const idleRssKiB = async () => {
  let low = Infinity;
  for (let i = 0; i < 20; i++) { low = Math.min(low, rssKiB()); await new Promise((r) => setTimeout(r, 100)); }
  return low;
};
const metrics = async () => (await fetch(baseURL.replace(/\/v1$/, "") + "/metrics", { headers: { Authorization: `Bearer ${apiKey}` } })).text();
const gauge = (text, name) => Number(new RegExp(`^${name} (\\S+)$`, "m").exec(text)?.[1]);

async function streamText(params) {
  const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let text = "", finish = null, usage = null, chunks = 0;
  for await (const c of stream) {
    chunks++;
    if (c.usage) usage = c.usage;
    for (const ch of c.choices) {
      text += ch.delta?.content ?? "";
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  return { text, finish, usage, chunks };
}

const user = (content) => [{ role: "user", content }];

// 1. models
const models = await client.models.list();
check(models.data.some((m) => m.id === model), `models.list has '${model}'`);

// 2. chat: whole vs streamed (greedy)
const base = { model, messages: user("Tell me about the sea."), max_tokens: 12, temperature: 0 };
const whole = await client.chat.completions.create(base);
const wtext = whole.choices[0].message.content;
check(whole.object === "chat.completion" && whole.choices[0].message.role === "assistant", "chat completion object");
check(whole.usage.completion_tokens === 12 && whole.usage.prompt_tokens > 0, `usage ${JSON.stringify(whole.usage)}`);
check(whole.usage.total_tokens === whole.usage.prompt_tokens + whole.usage.completion_tokens, "usage total");
check(whole.choices[0].finish_reason === "length", "finish_reason length at max_tokens");
const streamed = await streamText(base);
check(streamed.text === wtext, `streamed deltas equal the whole text (${JSON.stringify(wtext)})`);
check(streamed.finish === "length", "streamed finish_reason");
check(streamed.usage && streamed.usage.completion_tokens === 12 && streamed.usage.prompt_tokens === whole.usage.prompt_tokens,
  "stream_options.include_usage: a final usage chunk");

// 3. completions: whole vs streamed
const cbase = { model, prompt: "The quick brown fox", max_tokens: 10, temperature: 0 };
const cwhole = await client.completions.create(cbase);
let ctext = "";
for await (const c of await client.completions.create({ ...cbase, stream: true })) ctext += c.choices[0]?.text ?? "";
check(cwhole.object === "text_completion" && ctext === cwhole.choices[0].text, "completions: streamed text equals whole text");

// 4. stop sequences: stop at a piece of the greedy text
const cut = [...wtext].slice(3, 5).join("");
if (cut.length > 0 && wtext.indexOf(cut) > 0) {
  const stopped = await client.chat.completions.create({ ...base, stop: [cut] });
  check(stopped.choices[0].message.content === wtext.slice(0, wtext.indexOf(cut)), `stop ${JSON.stringify(cut)} ends the text before it`);
  check(stopped.choices[0].finish_reason === "stop", "finish_reason stop");
  const sstop = await streamText({ ...base, stop: [cut] });
  check(sstop.text === wtext.slice(0, wtext.indexOf(cut)), "stop while streaming");
} else {
  check(false, `greedy text too short for a stop test: ${JSON.stringify(wtext)}`);
}

// 5. seed reproducibility (sampling at temperature 1)
const sampled = { model, messages: user("Write a word."), max_tokens: 10, temperature: 1.0, top_p: 0.95, seed: 42 };
const s1 = (await client.chat.completions.create(sampled)).choices[0].message.content;
const s2 = (await client.chat.completions.create(sampled)).choices[0].message.content;
const s3 = (await streamText(sampled)).text;
check(s1 === s2 && s2 === s3, "the same seed gives the same sampled text (whole and streamed)");

// 6. logprobs
const lp = await client.chat.completions.create({ ...base, logprobs: true, top_logprobs: 3 });
const content = lp.choices[0].logprobs?.content ?? [];
check(content.length === 12, `logprobs for every token (${content.length})`);
check(content.every((t) => t.top_logprobs.length === 3 && t.logprob <= 0), "3 top_logprobs each, logprob <= 0");
check(content.every((t) => t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob && t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob),
  "top_logprobs sorted");
check(content.every((t) => Math.abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6), "greedy picks the most likely token");
check(content.map((t) => t.token).join("") === lp.choices[0].message.content, "token strings concatenate to the text");
const clp = await client.completions.create({ ...cbase, logprobs: 2 });
check(clp.choices[0].logprobs.tokens.length === 10 && clp.choices[0].logprobs.top_logprobs.every((m) => Object.keys(m).length >= 1),
  "completions logprobs");

// 7. errors
const errOf = async (f) => { try { await f(); return null; } catch (e) { return e; } };
let e = await errOf(() => new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).models.list());
check(e && e.status === 401, `wrong API key: 401 (${e?.status})`);
e = await errOf(() => client.chat.completions.create({ ...base, temperature: 5 }));
check(e && e.status === 400 && e.error?.param === "temperature", `temperature 5: 400 naming the param (${e?.status} ${e?.error?.param})`);
e = await errOf(() => client.chat.completions.create({ ...base, max_tokens: 100000 }));
check(e && e.status === 400, `max_tokens over the limit: 400 (${e?.status})`);
e = await errOf(() => client.chat.completions.create({ ...base, model: "no-such-model" }));
check(e && e.status === 404, `unknown model: 404 (${e?.status})`);
const raw = await fetch(baseURL + "/chat/completions", { method: "POST", headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" }, body: "{\"messages\": [" });
const rawBody = await raw.json();
check(raw.status === 400 && typeof rawBody.error?.message === "string" && "type" in rawBody.error && "param" in rawBody.error && "code" in rawBody.error,
  "malformed JSON: 400 with an OpenAI error object");

// 8. batched greedy = one at a time, over HTTP (different prompt lengths, staggered arrivals)
const prompts = ["Hi", "What is the capital of France? Answer in one word.", "Count: one two three four five six seven",
  "A", "Tell me about the sea.", "Why is the sky blue?", "Once upon a time, in a land far away, there lived", "Hello there"];
const alone = [];
for (const p of prompts) alone.push((await client.chat.completions.create({ model, messages: user(p), max_tokens: 10, temperature: 0 })).choices[0].message.content);
const together = await Promise.all(prompts.map((p, i) => new Promise((r) => setTimeout(r, 15 * i)).then(() =>
  client.chat.completions.create({ model, messages: user(p), max_tokens: 10, temperature: 0 })).then((x) => x.choices[0].message.content)));
check(together.every((t, i) => t === alone[i]), "concurrent greedy requests give the one-at-a-time texts");

// 9. bounded load test: 64 concurrent clients, a fixed number of requests, three rounds
const CLIENTS = 64, PER_CLIENT = 2, MAX_TOKENS = 8;
const rounds = [];
for (let round = 0; round < 6; round++) {
  const lat = [];
  let failed = 0, tokens = 0;
  const t0 = performance.now();
  await Promise.all(Array.from({ length: CLIENTS }, async (_, c) => {
    for (let k = 0; k < PER_CLIENT; k++) {
      const t = performance.now();
      try {
        const msg = user(`Client ${c} request ${k}: say something.`);
        if ((c + k) % 2) {
          const s = await streamText({ model, messages: msg, max_tokens: MAX_TOKENS, temperature: 0.8, seed: c });
          tokens += s.usage.completion_tokens;
        } else {
          const r = await client.chat.completions.create({ model, messages: msg, max_tokens: MAX_TOKENS, temperature: 0.8, seed: c });
          tokens += r.usage.completion_tokens;
        }
        lat.push(performance.now() - t);
      } catch (err) {
        failed++;
        console.log(`load error: ${err}`);
      }
    }
  }));
  const secs = (performance.now() - t0) / 1000;
  // A client holds its last token before the engine's step that produced it has returned its
  // workspace, so idle is polled for (up to 20 s on a loaded machine), not read once.
  let act = -1, kv = -1;
  for (let i = 0; i < 200; i++) {
    const mm = await metrics();
    act = Number(/^moe_memory_bytes\{device="cpu",category="activations"\} (\d+)$/m.exec(mm)?.[1]);
    kv = gauge(mm, "moe_kv_blocks_in_use");
    if (act === 0 && kv === 0) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  check(act === 0 && kv === 0, `load round ${round}: idle afterwards with no activation bytes (${act}) and no KV blocks in use (${kv})`);
  lat.sort((a, b) => a - b);
  const q = (p) => lat[Math.min(lat.length - 1, Math.floor(p * lat.length))];
  rounds.push({ round, requests: CLIENTS * PER_CLIENT, failed, p50_ms: Math.round(q(0.5)), p99_ms: Math.round(q(0.99)),
    tokens, tokens_per_s: +(tokens / secs).toFixed(1), rss_kib: await idleRssKiB() });
  check(failed === 0, `load round ${round}: ${CLIENTS} clients x ${PER_CLIENT} requests, ${failed} failed`);
}
// The server hands its kept blocks and malloc's free pages back after 0.2 s idle, so the resident
// set of the idle server is what it holds. Measured with that (20 rounds): +8 MiB from round 0 to
// 1 (threads, arenas), then +0.4 MiB a round falling to +0.03 (arena fragmentation settling);
// without it the kept blocks of each round's batch sizes moved it +-15 MiB (once +27 MiB two rounds
// in a row) and this check failed in CI. A leak grows it every round, so its smallest late value
// grows too: the smaller of rounds 4 and 5 within 5% (~15 MiB) of the peak of rounds 0-2 — a leak
// of 7.5 MiB a round (60 KiB a request) fails it.
// Sanitizer builds hold freed memory in ASan's quarantine: not checked there, said so.
const rssList = rounds.map((r) => r.rss_kib);
const lateLow = Math.min(rssList[4], rssList[5]), warmPeak = Math.max(...rssList.slice(0, 3));
if (process.env.ASAN_OPTIONS !== undefined)
  console.log(`skip: RSS across rounds not checked under ASan (quarantine): ${rssList.join(" -> ")} KiB`);
else
  check(lateLow <= warmPeak * 1.05, `RSS does not grow across rounds (${rssList.join(" -> ")} KiB)`);

// 10. clients that disconnect mid-stream leak no KV blocks
const gen0 = gauge(await metrics(), "moe_generated_tokens_total");
const controllers = Array.from({ length: 16 }, () => new AbortController());
await Promise.all(controllers.map(async (ac, i) => {
  try {
    const s = await client.chat.completions.create({ model, messages: user(`Stream ${i} forever`), max_tokens: 400, temperature: 0,
      stream: true }, { signal: ac.signal });
    let n = 0;
    for await (const c of s) { if (++n === 3) ac.abort(); }
  } catch (err) { /* aborted */ }
}));
let m = await metrics();
check(Number.isFinite(gauge(m, "moe_kv_blocks_in_use")) && Number.isFinite(gauge(m, "moe_requests_running")), "metrics readable while cancelling");
let idle = false;
for (let i = 0; i < 200 && !idle; i++) {
  m = await metrics();
  idle = gauge(m, "moe_kv_blocks_in_use") === 0 && gauge(m, "moe_requests_running") === 0;
  if (!idle) await new Promise((r) => setTimeout(r, 100));
}
check(idle, `after 16 mid-stream disconnects: KV blocks in use ${gauge(m, "moe_kv_blocks_in_use")}, running ${gauge(m, "moe_requests_running")}`);
const gen = gauge(m, "moe_generated_tokens_total") - gen0;
check(gen >= 16 * 3 && gen < 16 * 400, `disconnected streams stopped generating (${gen} tokens for 16 streams of max_tokens 400)`);

// 11. metrics content
for (const name of ["moe_time_to_first_token_seconds_bucket", "moe_time_per_output_token_seconds_count", "moe_batch_size_bucket",
  "moe_expert_tokens_total{layer=\"0\",expert=\"0\"}", "moe_kv_blocks_total", "moe_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"])
  check(m.includes(name), `/metrics has ${name}`);
const maxBatch = Math.max(...[...m.matchAll(/^moe_batch_size_bucket\{le="(\d+)"\} (\d+)$/gm)].map((x) => x[1]).filter((le, i, arr) => true).map(Number));
check(/moe_batch_size_bucket\{le="8"\} \d+/.test(m), "batch size histogram");
const b8 = Number(/moe_batch_size_bucket\{le="8"\} (\d+)/.exec(m)[1]), binf = Number(/moe_batch_size_bucket\{le="\+Inf"\} (\d+)/.exec(m)[1]);
check(binf > b8, `some decode steps batched more than 8 sequences (${binf - b8} of ${binf} steps; bucket bounds up to ${maxBatch})`);

console.log(JSON.stringify({ load: rounds }));
process.exit(fails ? 1 : 0);
