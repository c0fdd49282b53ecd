#!/usr/bin/env python3
"""Write a small seed corpus for one libFuzzer target (fuzz/fuzz_<target>.cpp).

usage: fuzz_seeds.py TARGET OUT_DIR FIXTURES_DIR [TOKENIZERS_DIR]

TARGET is one of: safetensors_header, safetensors_index, config_json, tokenizer_json, jinja, regex.
FIXTURES_DIR is ../shared/fixtures (model directories); TOKENIZERS_DIR, when given and present,
holds real tokenizer directories (tests/tokenizer/setup.sh writes them under
<build>/tokenizer-ref/tokenizers), used for real pre-tokenizer patterns and chat templates.
The regression corpus tests/fuzz_corpus/TARGET/ is copied in as well. Real inputs are megabytes;
seeds are kept small (a fuzzer mutates small inputs far faster):
  safetensors_header  for every fixture .safetensors: the file when small, its header alone, and a
                      small VALID file (metadata + up to 8 of its smallest tensors, re-laid out);
  safetensors_index   weight maps over each fixture's tensor names, split into two shards;
  config_json         every fixture config.json;
  tokenizer_json      synthetic tokenizers covering every supported component, and each real
                      tokenizer.json cut down to its first 300 ids (+ merges among them), each
                      followed by a NUL byte and a text to encode;
  jinja               chat templates (tests/tokenizer/templates, real tokenizer_config.json ones);
  regex               real pre-tokenizer patterns, NUL, a multilingual subject.
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
    for b in range(256):
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
    tok["added_tokens"] = [a for a in tok.get("added_tokens", [])][:20]
    tok["model"] = model
    return tok


def tokenizer_seeds(out_dir, tokenizers):
    written = 0
    for name, tok in synthetic_tokenizers().items():
        written += write(out_dir, "synthetic_" + name, json.dumps(tok).encode("utf-8") + b"\0" + SUBJECT.encode("utf-8"))
    for path in sorted(glob.glob(os.path.join(tokenizers or "/nonexistent", "*", "tokenizer.json"))):
        with open(path, "r", encoding="utf-8") as f:
            tok = cut_tokenizer(json.load(f))
        name = os.path.basename(os.path.dirname(path))
        written += write(out_dir, "real_" + name, json.dumps(tok).encode("utf-8") + b"\0" + SUBJECT.encode("utf-8"))
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
    else:
        sys.stderr.write("fuzz_seeds: unknown target '%s'\n" % target)
        return 2
    regression = os.path.join(ROOT, "tests", "fuzz_corpus", target)
    for path in sorted(glob.glob(os.path.join(regression, "*"))):
        shutil.copyfile(path, os.path.join(out_dir, "regression_" + os.path.basename(path)))
        written += 1
    print(f"fuzz_seeds: wrote {written} seeds for {target} to {out_dir}")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
