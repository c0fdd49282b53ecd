"""Checks that models written by `moe init` load in HuggingFace Transformers and that the
engine's logits (from `moe logits`, computed beforehand) match Transformers' on them.

usage: python3 bench/hf_check_init.py DIR [DIR...]
Each DIR holds config.json + model.safetensors (from `moe init`), input.safetensors
(input_ids) and ours.safetensors (logits + router_logits.<l> from `moe logits`).
Prints one line per model and exits non-zero when a check fails.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def rel(a, b):
    return float((a - b).norm() / b.norm())


def main():
    ok = True
    for d in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        model.eval()
        ids = load_file(f"{d}/input.safetensors")["input_ids"].long()
        ours = load_file(f"{d}/ours.safetensors")
        with torch.no_grad():
            out = model(input_ids=ids, output_router_logits=True)
        e = rel(ours["logits"].double(), out.logits.double())
        er = max(rel(ours[f"router_logits.{l}"].double(), r.double()) for l, r in enumerate(out.router_logits))
        good = e <= 1e-5 and er <= 1e-5
        ok &= good
        print(f"{'OK  ' if good else 'FAIL'} {d}: {type(model).__name__} loaded; logits rel_fro {e:.3g}, "
              f"router logits max rel_fro {er:.3g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
