#!/usr/bin/env python3
"""Write a small seed corpus for one libFuzzer target (fuzz/fuzz_<target>.cpp).

usage: fuzz_seeds.py TARGET OUT_DIR FIXTURES_DIR [TOKENIZERS_DIR]

TARGET is one of: safetensors_header, safetensors_index, config_json, tokenizer_json, jinja, regex,
gguf.
FIXTURES_DIR is ../shared/fixtures (model directories); TOKENIZERS_DIR, when given and present,
holds real tokenizer directories (tests/tokenizer/setup.sh writes them under
<build>/tokenizer-ref/tokenizers), used for real pre-tokenizer patterns and chat templates.
The regression corpus tests/fuzz_corpus/TARGET/ is copied in as well (but for NOT_SEEDS). Real
inputs are megabytes; seeds are kept small (a fuzzer mutates small inputs far faster):
  safetensors_header  for every fixture .safetensors: the file when small, its header alone, and a
                      small VALID file (metadata + up to 8 of its smallest tensors, re-laid out);
  safetensors_index   weight maps over each fixture's tensor names, split into two shards;
  config_json         every fixture config.json;
  tokenizer_json      synthetic tokenizers covering every supported component, and each real
                      tokenizer.json cut down to its first ids (+ merges among them) so that it fits
                      in 4 KiB (the fuzzer's -max_len), each followed by a NUL byte and a text;
  jinja               chat templates (tests/tokenizer/templates, real tokenizer_config.json ones);
  regex               real pre-tokenizer patterns, NUL, a multilingual subject;
  gguf                small valid GGUF v3 (and one v2) files written here with struct (layout of
                      src/io/gguf.cpp): every metadata value type and arrays, general.alignment,
                      and tensors of every dequantisable type (f32 f16 bf16 q8_0 q4_0 q4_K q5_K
                      q6_K), one or two rows each, with random payloads.
Standard library only.
"""
import glob
import json
import os
import shutil
import struct
import sys

MAX_WHOLE = 64 * 1024
MAX_TENSORS = 8
MAX_TENSOR_BYTES = 4096

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SUBJECT = ("Hello world! It's 2024-05-01, 12345 apples; l'été à Paris — 東京タワー 🎉\n"
           "  def f(x):\n\treturn x**2  # comment\r\n\u00a0\u2003end<|im_end|>")

def safetensors_header_seeds(out_dir, paths):
    written = 0
    for path in paths:
        stem = os.path.basename(os.path.dirname(os.path.abspath(path))) + "_" + \
            os.path.splitext(os.path.basename(path))[0]
        with open(path, "rb") as f:
            blob = f.read()
        if len(blob) <= MAX_WHOLE:
            with open(os.path.join(out_dir, stem + ".whole"), "wb") as f:
                f.write(blob)
            written += 1
        if len(blob) < 8:
            continue
        (n,) = struct.unpack("<Q", blob[:8])
        if 8 + n > len(blob):
            continue
        with open(os.path.join(out_dir, stem + ".header"), "wb") as f:
            f.write(blob[:8 + n])
        written += 1
        try:
            header = json.loads(blob[8:8 + n].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            continue
        data = blob[8 + n:]
        tensors = [(k, v) for k, v in header.items() if k != "__metadata__"]
        small = sorted((v["data_offsets"][1] - v["data_offsets"][0], k, v) for k, v in tensors
                       if v["data_offsets"][1] - v["data_offsets"][0] <= MAX_TENSOR_BYTES)
        new_header = {}
        if "__metadata__" in header:
            new_header["__metadata__"] = header["__metadata__"]
        payload = bytearray()
        for size, k, v in small[:MAX_TENSORS]:
            begin, end = v["data_offsets"]
            new_header[k] = {"dtype": v["dtype"], "shape": v["shape"],
                             "data_offsets": [len(payload), len(payload) + size]}
            payload += data[begin:end]
        if len(new_header) > ("__metadata__" in new_header):
            hjson = json.dumps(new_header, separators=(",", ":")).encode("utf-8")
            hjson += b" " * ((8 - len(hjson) % 8) % 8)  # header padded to 8 bytes, as writers do
            with open(os.path.join(out_dir, stem + ".small"), "wb") as f:
                f.write(struct.pack("<Q", len(hjson)) + hjson + bytes(payload))
            written += 1
    return written



def write(out_dir, name, data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(out_dir, name), "wb") as f:
        f.write(data)
    return 1


def safetensors_header_names(path):
    with open(path, "rb") as f:
        blob = f.read(8)
        (n,) = struct.unpack("<Q", blob)
        header = json.loads(f.read(n).decode("utf-8"))
    return [k for k in header if k != "__metadata__"]


def safetensors_index_seeds(out_dir, fixtures):
    written = 0
    for path in sorted(glob.glob(os.path.join(fixtures, "*", "model.safetensors"))):
        names = safetensors_header_names(path)[:64]
        half = len(names) // 2
        wm = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
              for i, n in enumerate(names)}
        doc = {"metadata": {"total_size": 12345}, "weight_map": wm}
        written += write(out_dir, os.path.basename(os.path.dirname(path)) + ".index.json", json.dumps(doc, indent=2))
    written += write(out_dir, "bad_path.index.json", '{"weight_map": {"a": "../model.safetensors"}}')
    return written


def config_seeds(out_dir, fixtures):
    written = 0
    for path in sorted(glob.glob(os.path.join(fixtures, "*", "config.json"))):
        with open(path, "rb") as f:
            written += write(out_dir, os.path.basename(os.path.dirname(path)) + ".config.json", f.read())
    return written


def byte_level_vocab():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): i for i, c in enumerate(cs)}


def synthetic_tokenizers():
    bl = byte_level_vocab()
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("ll", "o"), ("Ġ", "w")]:
        bl.setdefault(a, len(bl))
        bl.setdefault(b, len(bl))
        bl.setdefault(a + b, len(bl))
        merges.append(a + " " + b)
    added = [{"id": len(bl), "content": "<|im_start|>", "special": True, "normalized": False,
              "lstrip": False, "rstrip": False, "single_word": False},
             {"id": len(bl) + 1, "content": "<|im_end|>", "special": True, "normalized": False,
              "lstrip": True, "rstrip": True, "single_word": False}]
    gpt2 = {"version": "1.0", "added_tokens": added, "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
            "post_processor": {"type": "TemplateProcessing", "single": [
                {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "special_tokens": {}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": bl, "merges": merges}}
    sp_vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    # Byte-fallback tokens for ASCII and the bytes of SUBJECT (all 256 would not fit in 4 KiB).
    for b in sorted(set(range(128)) | set(SUBJECT.encode("utf-8"))):
        sp_vocab["<0x%02X>" % b] = len(sp_vocab)
    for t in ["▁", "▁h", "e", "l", "o", "▁he", "ll", "▁hell", "▁hello", "h", "w", "r", "d", "▁w"]:
        sp_vocab.setdefault(t, len(sp_vocab))
    spm = {"version": "1.0", "added_tokens": [{"id": 1, "content": "<s>", "special": True},
                                               {"id": 2, "content": "</s>", "special": True}],
           "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "▁"}]},
           "pre_tokenizer": None,
           "post_processor": {"type": "TemplateProcessing", "single": [
               {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
               "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
           "decoder": {"type": "Sequence", "decoders": [
               {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
               {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
           "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": True,
                     "vocab": sp_vocab, "merges": [["▁", "h"], ["▁h", "e"], ["l", "l"], ["▁he", "ll"],
                                                   ["▁hell", "o"], ["▁", "w"]]}}
    split = dict(gpt2)
    split["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": " ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"},
                              "behavior": "MergedWithPrevious"}
    split["normalizer"] = None
    split["decoder"] = None
    return {"gpt2": gpt2, "spm": spm, "split": split}


def cut_tokenizer(tok, keep_ids=300, keep_merges=200):
    model = tok.get("model", {})
    vocab = {k: v for k, v in model.get("vocab", {}).items() if isinstance(v, int) and v < keep_ids}
    merges = []
    for m in model.get("merges", []):
        a, b = (m.split(" ", 1) if isinstance(m, str) else (m + ["", ""])[:2])
        if a in vocab and b in vocab and (a + b) in vocab:
            merges.append(m)
            if len(merges) >= keep_merges:
                break
    model["vocab"], model["merges"] = vocab, merges
    tok["added_tokens"] = [a for a in tok.get("added_tokens", [])][:8]
    tok["model"] = model
    return tok


# tokenizer_json seeds must fit the fuzzer's -max_len (scripts/test.sh: 4096): libFuzzer truncates a
# longer seed, which leaves malformed JSON. Compact JSON, UTF-8 rather than \u escapes.
TOKENIZER_SEED_BYTES = 4096


def tokenizer_blob(tok):
    return json.dumps(tok, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\0" + SUBJECT.encode("utf-8")


def tokenizer_seeds(out_dir, tokenizers):
    written = 0
    for name, tok in synthetic_tokenizers().items():
        blob = tokenizer_blob(tok)
        assert len(blob) <= TOKENIZER_SEED_BYTES, (name, len(blob))
        written += write(out_dir, "synthetic_" + name, blob)
    for path in sorted(glob.glob(os.path.join(tokenizers or "/nonexistent", "*", "tokenizer.json"))):
        with open(path, "r", encoding="utf-8") as f:
            full = json.load(f)
        keep_ids, keep_merges = 300, 200
        while True:  # halve the vocabulary until the seed fits
            blob = tokenizer_blob(cut_tokenizer(json.loads(json.dumps(full)), keep_ids, keep_merges))
            if len(blob) <= TOKENIZER_SEED_BYTES or keep_ids <= 8:
                break
            keep_ids, keep_merges = keep_ids // 2, keep_merges // 2
        if len(blob) <= TOKENIZER_SEED_BYTES:
            written += write(out_dir, "real_" + os.path.basename(os.path.dirname(path)), blob)
    return written


SYNTHETIC_TEMPLATES = {
    "chatml": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "features": "{%- set ns = namespace(n=0, seen=[]) -%}{%- macro show(x, sep=', ') -%}{{ x | tojson }}{{ sep }}"
                "{%- endmacro -%}{%- for m in messages if m.role != 'tool' -%}{%- set ns.n = ns.n + 1 -%}"
                "{{ loop.index }}/{{ loop.length }} {{ m.role | upper }}: {{ (m.content if m.content is string "
                "else m.content | map(attribute='type') | join(',')) | trim }}{% if not loop.last %}\n{% endif %}"
                "{%- if m.tool_calls is defined %}{% for c in m.tool_calls %}{{ show(c.function.arguments) }}"
                "{% endfor %}{% endif %}{%- endfor -%}{{ ns.n }} {{ tools | length }} {{ range(3) | list }}"
                "{{ 'a,b'.split(',') }}{{ {'x': 1, 'y': [1, 2.5]} | dictsort }}{{ messages[1:3] | length }}"
                "{{ bos_token ~ eos_token }}{{ (5 // 2, 5 % 3, 2 ** 3) }}{% if enable_thinking is false %}no{% endif %}",
}


def jinja_seeds(out_dir, tokenizers):
    written = 0
    for name, t in SYNTHETIC_TEMPLATES.items():
        written += write(out_dir, "synthetic_" + name + ".jinja", t)
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "tokenizer", "templates", "*.jinja"))):
        with open(path, "rb") as f:
            written += write(out_dir, "tests_" + os.path.basename(path), f.read())
    for path in sorted(glob.glob(os.path.join(tokenizers or "/nonexistent", "*", "tokenizer_config.json"))):
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
        t = cfg.get("chat_template")
        if isinstance(t, list):
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        if isinstance(t, str):
            written += write(out_dir, "real_" + os.path.basename(os.path.dirname(path)) + ".jinja", t)
    return written


REGEXES = {
    "gpt2": "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+",
    "llama3": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
              "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "lazy_look": "a+?(?=b)|[\\x{41}-\\u005A]{2,}|^\\A.$\\z|[^\\P{Lu}\\d]*?x",
}


def regex_seeds(out_dir, tokenizers):
    written = 0
    for name, r in REGEXES.items():
        written += write(out_dir, name, r.encode("utf-8") + b"\0" + SUBJECT.encode("utf-8"))
    for path in sorted(glob.glob(os.path.join(tokenizers or "/nonexistent", "*", "tokenizer.json"))):
        with open(path, "r", encoding="utf-8") as f:
            tok = json.load(f)
        found = []

        def walk(j):
            if isinstance(j, dict):
                if isinstance(j.get("Regex"), str):
                    found.append(j["Regex"])
                for k, v in j.items():
                    if k not in ("vocab", "merges"):
                        walk(v)
            elif isinstance(j, list):
                for v in j:
                    walk(v)
        walk({k: v for k, v in tok.items() if k != "model"})
        for i, r in enumerate(found):
            written += write(out_dir, "real_%s_%d" % (os.path.basename(os.path.dirname(path)), i),
                             r.encode("utf-8") + b"\0" + SUBJECT.encode("utf-8"))
    return written


# GGUF (src/io/gguf.cpp): u32 magic "GGUF", u32 version, u64 n_tensors, u64 n_kv; n_kv times
# (string key, u32 type, value); n_tensors times (string name, u32 n_dims, i64 ne[n_dims], u32 ggml
# type, u64 offset); pad to general.alignment (32); tensor data. Strings are u64 length + bytes.
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q",
                12: "<d"}
GGML_TYPES = {"f32": (0, 1, 4), "f16": (1, 1, 2), "bf16": (30, 1, 2), "q8_0": (8, 32, 34), "q4_0": (2, 32, 18),
              "q4_K": (12, 256, 144), "q5_K": (13, 256, 176), "q6_K": (14, 256, 210)}


def gguf_str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gguf_value(t, v):
    if t == 8:
        return gguf_str(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(gguf_value(et, x) for x in items)
    return struct.pack(GGUF_SCALARS[t], v)


def gguf_file(kv, tensors, version=3, alignment=32, rng=None):
    """kv: [(key, type, value)]; tensors: [(name, ggml type name, ne list)]."""
    out = struct.pack("<IIQQ", 0x46554747, version, len(tensors), len(kv))
    for k, t, v in kv:
        out += gguf_str(k) + struct.pack("<I", t) + gguf_value(t, v)
    data, offsets = b"", []
    for name, tname, ne in tensors:
        tid, block_elems, block_bytes = GGML_TYPES[tname]
        n = 1
        for d in ne:
            n *= d
        data += b"\0" * ((-len(data)) % alignment)
        offsets.append(len(data))
        data += bytes(rng.getrandbits(8) for _ in range(n // block_elems * block_bytes))
    for (name, tname, ne), off in zip(tensors, offsets):
        out += gguf_str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<q", d) for d in ne)
        out += struct.pack("<IQ", GGML_TYPES[tname][0], off)
    out += b"\0" * ((-len(out)) % alignment)
    return out + data


def gguf_seeds(out_dir):
    import random
    rng = random.Random(1)
    # f16/bf16 payloads are random bits: NaN and Inf included on purpose.
    meta = [("general.architecture", 8, "llama"), ("general.name", 8, "fuzz"), ("general.alignment", 4, 32),
            ("llama.block_count", 4, 2), ("llama.context_length", 10, 4096), ("llama.expert_count", 5, 8),
            ("llama.rope.freq_base", 6, 10000.0), ("llama.attention.layer_norm_rms_epsilon", 12, 1e-5),
            ("u8", 0, 255), ("i8", 1, -128), ("u16", 2, 65535), ("i16", 3, -32768), ("i64", 11, -1),
            ("flag", 7, 1), ("tokenizer.ggml.tokens", 9, (8, ["<s>", "</s>", "a", "b", "ab", "\u00e9", ""])),
            ("tokenizer.ggml.scores", 9, (6, [0.0, -1.5, 2.25])), ("tokenizer.ggml.token_type", 9, (5, [1, 3, 1])),
            ("tokenizer.ggml.merges", 9, (8, ["a b"])), ("empty_array", 9, (4, []))]
    written = 0
    written += write(out_dir, "meta_only.gguf", gguf_file(meta, [], rng=rng))
    written += write(out_dir, "empty.gguf", gguf_file([], [], rng=rng))
    for tname, (tid, block_elems, block_bytes) in GGML_TYPES.items():
        cols = max(block_elems, 8)
        tensors = [("blk.0.%s.weight" % tname, tname, [cols, 2]), ("blk.0.%s.bias" % tname, tname, [cols])]
        written += write(out_dir, "tensor_%s.gguf" % tname, gguf_file(meta[:4], tensors, rng=rng))
    mixed = [("token_embd.weight", "f16", [16, 4]), ("blk.0.ffn_gate_exps.weight", "q4_K", [256, 2, 2]),
             ("blk.0.ffn_down_exps.weight", "q6_K", [256, 1, 1, 1]), ("output_norm.weight", "f32", [16]),
             ("empty", "f32", [0, 3])]
    written += write(out_dir, "mixed.gguf", gguf_file(meta, mixed, rng=rng))
    written += write(out_dir, "align64.gguf",
                     gguf_file([("general.alignment", 4, 64)], [("x", "q8_0", [32, 3]), ("y", "bf16", [5])],
                               alignment=64, rng=rng))
    written += write(out_dir, "v2.gguf", gguf_file(meta[:2], [("x", "q4_0", [32])], version=2, rng=rng))
    return written


# Regression inputs replayed by ctest (tests/test_hostile_corpus.cpp) but not used as seeds: the
# mutations of tokenizer_json/catastrophic_split nearly all run the regex work budget out (~0.1 s
# each under ASan) and can hold a 25 s run to ~20 executions per second; fuzz_regex fuzzes the
# catastrophic patterns themselves (regex/catastrophic, regex/nested_plus stay seeds).
NOT_SEEDS = {"tokenizer_json": {"catastrophic_split"}}


def api_request_seeds(out_dir):
    """moe serve request bodies; the first byte picks the endpoint (odd: chat)."""
    bodies = [
        (1, {"messages": [{"role": "user", "content": "Hello"}]}),
        (1, {"model": "m", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
             "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "stop": ["\n"], "seed": 1, "logprobs": True,
             "top_logprobs": 2, "stream": True, "stream_options": {"include_usage": True}}),
        (1, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}], "n": 1,
             "max_completion_tokens": 3}),
        (0, {"prompt": "Once upon a time", "max_tokens": 8, "logprobs": 1}),
        (0, {"prompt": [1, 2, 3], "stream": True, "ignore_eos": True}),
    ]
    n = 0
    for i, (chat, b) in enumerate(bodies):
        write(out_dir, "api_%d" % i, bytes([chat]) + json.dumps(b).encode())
        n += 1
    return n


def main(argv):
    if len(argv) < 4:
        sys.stderr.write(__doc__)
        return 2
    target, out_dir, fixtures = argv[1], argv[2], argv[3]
    tokenizers = argv[4] if len(argv) > 4 and os.path.isdir(argv[4]) else None
    os.makedirs(out_dir, exist_ok=True)
    if target == "safetensors_header":
        written = safetensors_header_seeds(out_dir, sorted(glob.glob(os.path.join(fixtures, "*", "*.safetensors"))))
    elif target == "safetensors_index":
        written = safetensors_index_seeds(out_dir, fixtures)
    elif target == "config_json":
        written = config_seeds(out_dir, fixtures)
    elif target == "tokenizer_json":
        written = tokenizer_seeds(out_dir, tokenizers)
    elif target == "jinja":
        written = jinja_seeds(out_dir, tokenizers)
    elif target == "regex":
        written = regex_seeds(out_dir, tokenizers)
    elif target == "gguf":
        written = gguf_seeds(out_dir)
    elif target == "api_request":
        written = api_request_seeds(out_dir)
    else:
        sys.stderr.write("fuzz_seeds: unknown target '%s'\n" % target)
        return 2
    regression = os.path.join(ROOT, "tests", "fuzz_corpus", target)
    for path in sorted(glob.glob(os.path.join(regression, "*"))):
        if os.path.basename(path) in NOT_SEEDS.get(target, ()):
            continue
        shutil.copyfile(path, os.path.join(out_dir, "regression_" + os.path.basename(path)))
        written += 1
    print(f"fuzz_seeds: wrote {written} seeds for {target} to {out_dir}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
