#!/usr/bin/env python3
"""Writes chat_arith.jsonl: a small synthetic chat dataset (arithmetic questions answered in a
fixed style) for fine-tuning demos and tests. Deterministic; run it to regenerate the file."""
import json
import random

rng = random.Random(7)
ops = [("plus", lambda a, b: a + b), ("minus", lambda a, b: a - b), ("times", lambda a, b: a * b)]
systems = ["You are a careful calculator.", "Answer with the result only, in a full sentence."]
lines = []
for i in range(480):
    name, f = ops[i % 3]
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    msgs = []
    if i % 4 == 0:
        msgs.append({"role": "system", "content": systems[i % 2]})
    msgs.append({"role": "user", "content": f"What is {a} {name} {b}?"})
    msgs.append({"role": "assistant", "content": f"{a} {name} {b} is {f(a, b)}."})
    if i % 10 == 0:  # some two-turn conversations
        c = rng.randint(2, 9)
        msgs.append({"role": "user", "content": f"And that times {c}?"})
        msgs.append({"role": "assistant", "content": f"{f(a, b)} times {c} is {f(a, b) * c}."})
    lines.append(json.dumps({"messages": msgs}))
with open("chat_arith.jsonl", "w") as out:
    out.write("\n".join(lines) + "\n")
