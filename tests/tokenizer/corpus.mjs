// corpus.mjs — the tokenizer test corpus: >= 2,000 varied strings, generated deterministically
// (a fixed-seed PRNG; no dependence on time, locale or platform).
//
// Families: multilingual prose, CJK, emoji (ZWJ sequences, flags, skin tones), code, long white
// space runs (spaces, tabs, newlines, \r\n, NBSP, ideographic space), digits and numbers, special-
// token look-alikes (real special tokens of the four tokenizers, broken and nested variants),
// odd Unicode (combining marks, decomposed/precomposed pairs, noncharacters, private use,
// unassigned, BOM, ZWJ/ZWNJ, bidi controls, C0/C1 controls, U+FFFD, astral planes), and random
// mixtures of all of these. Strings are always well-formed (no lone surrogates): the tokenizers
// receive UTF-8.
export function makeCorpus(n = 2400) {
  let seed = 0x9e3779b9;
  const rnd = () => {
    // mulberry32
    seed = (seed + 0x6d2b79f5) | 0;
    let t = seed;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const pick = (a) => a[Math.floor(rnd() * a.length)];
  const int = (lo, hi) => lo + Math.floor(rnd() * (hi - lo + 1));
  const cp = (c) => String.fromCodePoint(c);

  const prose = [
    "The quick brown fox jumps over the lazy dog.", "Hello, world!", "I'm sure you'll see it's fine; we've done it, they'd agree.",
    "DON'T SHOUT, it's RUDE'S", "Ünïcödé wörds: naïve café, résumé, Ångström, Øresund, façade.",
    "Der schnelle braune Fuchs springt über den faulen Hund.", "Le cœur a ses raisons que la raison ne connaît point.",
    "¿Dónde está la biblioteca? ¡Aquí!", "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιὰ στὸ χρυσαφὶ ξέφωτο.", "עברית היא שפה שמית", "العربية لغة جميلة جدا",
    "हिन्दी भाषा बहुत सुंदर है।", "தமிழ் ஒரு பழமையான மொழி", "ภาษาไทยเป็นภาษาที่สวยงาม", "Tiếng Việt có dấu: Nguyễn Thị Hường",
    "한국어 문장입니다. 안녕하세요!", "日本語の文章です。東京は大きい都市です。カタカナもあります。", "中文句子：我爱自然语言处理，机器学习很有趣。",
    "繁體中文：這是一個測試。", "ქართული ენა", "Հայերեն լեզու", "አማርኛ ቋንቋ", "ᠮᠣᠩᠭᠣᠯ", "ꦧꦱꦗꦮ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝒮𝒸𝓇𝒾𝓅𝓉",
    "CamelCaseIdentifier and snake_case_identifier and SCREAMING_CASE", "e.g. i.e. etc. U.S.A. Ph.D.", "O'Neill's rock'n'roll",
  ];
  const cjk = ["我", "们", "的", "是", "中", "国", "人", "日", "本", "語", "東", "京", "ひ", "ら", "が", "な", "カ", "タ", "ー", "ン",
    "한", "국", "어", "龥", "𠀀", "𪚥", "㐀", "〇", "、", "。", "「", "」", "（", "）", "！", "？", "：", "；", "，"];
  const emoji = ["😀", "🎉", "👍", "👍🏽", "❤️", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷", "🇯🇵", "🤖", "🧑🏿‍💻", "✨", "🔥", "💯", "🙏", "😂", "🥲", "☃", "⌚", "🀄", "#️⃣", "1️⃣"];
  const code = [
    "def f(x):\n    return x ** 2 + 1\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }", "if (a && b || !c) { x->y = z[0]; }",
    "const re = /^[a-z]+\\d*$/gi;", "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;", "<div class=\"x\">&amp; &lt;</div>",
    "#include <vector>\nint main() { return 0; }\n", "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }", "x = {'a': [1, 2.5e-3, None]}",
    "git commit -m \"fix: bug\" && ./run.sh --flag=1", "$ echo $HOME | grep -v '^#' >> out.txt 2>&1", "λx.λy.x y ≠ ∀x∃y (x ≤ y)",
    "https://example.com/path?q=1&r=%20#frag", "user@example.org", "0x1F 0b1010 0o777 1_000_000 3.14159 -2.5e+10",
    "\tindented\twith\ttabs", "   leading and trailing spaces   ", "line1\r\nline2\r\n\r\nline4", "a\n\n\n\nb", "// comment\n/* block */",
  ];
  const specials = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|vision_pad|>",
    "<s>", "</s>", "<unk>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>",
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>", "<|startoftext|>", "<|reserved_200000|>",
    "<|fim_prefix|>", "<|file_sep|>", "<|box_start|>",
  ];
  const lookalikes = ["<|endoftext|", "<|im_start>", "< |im_end|>", "<<|im_end|>>", "<|IM_END|>", "<s >", "<ss>", "</s", "<|end", "|>",
    "<｜User|>", "<|im_start|><|im_start|>", "<think></think>", "<|endoftext|>text<|endoftext|>", "<s></s><unk>", "<0x41>", "<0xZZ>", "▁", "▁▁hello"];
  const spaces = [" ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003", "\u200b", "\u2028", "\u0085", "\f", "\v", "\ufeff"];
  const odd = [
    "e\u0301", "\u00e9", "a\u0308\u0304", "\u1e9b\u0323", "\u0344", "\u0958", "\u2126", "\u212b", "A\u030a", "\u1100\u1161\u11a8",
    "\uac00\u11a8", "o\u0328\u0304", "\u0041\u0327\u0301\u0300", "q\u0307\u0323", "\u0915\u093c", "\u05d1\u05bc", "\ufb2c",
    "\ufdd0", "\uffff", "\ufffe", cp(0x1fffe), cp(0x10ffff), "\ue000", cp(0xf0000), cp(0x100000), "\u0378", cp(0x2fffd), cp(0xe0001),
    "\u200d", "\u200c", "\u202e", "\u2066", "\u061c", "\u0000", "\u0001", "\u001f", "\u007f", "\u0080", "\u009f", "\ufffd",
    "\u00ad", "\u034f", "\u180e", "\u2060", "\ud7a3", cp(0x1d11e), cp(0x1f600), cp(0x20000), cp(0x3134a), "\u0e47\u0e48",
    "\u0f73", "\u0f75", "\u1d160", "\u0301\u0301\u0301", "\u0345\u0301", "\u0334\u0301", "ǅ", "ǈ", "ᾼ", "ﬁ", "Ⅻ", "½", "²", "①", "٣", "߀", "𝟘",
  ];
  const words = ["the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they",
    "I", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all", "were", "we", "when",
    "tokenizer", "Mixture-of-Experts", "transformer", "GPU", "CUDA", "naïve", "über", "straße", "İstanbul", "ΣΊΣΥΦΟΣ", "ĳssel"];

  const out = [];
  const seen = new Set();
  const add = (s) => {
    if (s.length === 0 || seen.has(s)) return;
    seen.add(s);
    out.push(s);
  };
  // Fixed items first.
  for (const s of [...prose, ...code, ...specials, ...lookalikes, ...odd, ...emoji]) add(s);
  for (const s of spaces) add(s), add("a" + s + "b"), add(s + "x"), add("x" + s);
  // Whitespace runs.
  for (let k = 1; k <= 40; ++k) {
    add(" ".repeat(k) + "x");
    add("x" + " ".repeat(k));
    add("\n".repeat(k % 7 + 1) + " ".repeat(k) + "y");
  }
  for (let k = 0; k < 20; ++k) add(Array.from({ length: int(2, 30) }, () => pick(spaces)).join(""));
  // Digits and numbers.
  for (let k = 1; k <= 24; ++k) add("1234567890123456789012345".slice(0, k));
  for (let k = 0; k < 40; ++k) add(String(Math.floor(rnd() * 10 ** int(1, 15))) + pick(["", ".", ",", " ", "%", "px", "k"]) + String(int(0, 999)));
  add("٠١٢٣٤٥٦٧٨٩ ०१२३४५६७८९ ０１２３４５６７８９ 𝟙𝟚𝟛");
  // Long strings.
  add(prose.join(" "));
  add(code.join("\n"));
  add(Array.from({ length: 300 }, () => pick(words)).join(" "));
  add(Array.from({ length: 200 }, () => pick(cjk)).join(""));
  add("a".repeat(1000));
  add(" ".repeat(500) + "end");
  add("\n".repeat(100));
  add("😀".repeat(100));
  add("!!!???...,,,;;;".repeat(20));
  // Random mixtures until n.
  const gens = [
    () => pick(prose), () => pick(code), () => pick(specials), () => pick(lookalikes), () => pick(spaces), () => pick(odd),
    () => pick(emoji), () => pick(cjk), () => pick(words), () => " " + pick(words), () => String(int(0, 100000)),
    () => Array.from({ length: int(1, 8) }, () => pick(cjk)).join(""),
    () => cp(int(0x20, 0x7e)), () => cp(int(0xa0, 0x2fff)), () => cp(int(0x3000, 0xd7ff)), () => cp(int(0xe000, 0xfffd)),
    () => cp(int(0x10000, 0x10ffff)), () => cp(int(0x300, 0x36f)), () => pick(["'s", "'T", "'re", "'VE", "'m", "'ll", "'d", "’s"]),
  ];
  while (out.length < n) {
    const parts = int(1, 12);
    let s = "";
    for (let k = 0; k < parts; ++k) s += pick(gens)();
    // Keep surrogates out: only well-formed strings.
    if (!/[\ud800-\udfff]/u.test(s.replace(/[\ud800-\udbff][\udc00-\udfff]/g, ""))) add(s);
  }
  return out;
}
