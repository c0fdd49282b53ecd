#!/usr/bin/env python3
"""Write a small seed corpus for the safetensors fuzz targets.

usage: fuzz_seeds.py OUT_DIR FILE.safetensors...

The fixtures are megabytes each, far above a useful fuzzing input size, so for every input
file this writes:
  * the file itself when it is small (<= 64 KiB);
  * its header only (8-byte length + JSON): exercises "header fine, data missing" paths;
  * a small VALID file: the header's metadata plus up to 8 of its smallest tensors, data
    copied and re-laid out contiguously, so the parser's success path is reachable too.
Standard library only.
"""
import json
import os
import struct
import sys

MAX_WHOLE = 64 * 1024
MAX_TENSORS = 8
MAX_TENSOR_BYTES = 4096


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    out_dir = argv[1]
    os.makedirs(out_dir, exist_ok=True)
    written = 0
    for path in argv[2:]:
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
    print(f"fuzz_seeds: wrote {written} seeds to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
