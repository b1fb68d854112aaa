#!/usr/bin/env python3
"""Compares the KV cache llama.cpp keeps (kvf-llama --kv-out) with the one the Rust llama2.c
forward pass (kv/src/llama2.rs, `kvfetcher-bench kv capture --dtype f32`) records for the same tokens:
same layer order, head order and RoPE pairing, within float tolerance.

Usage:
  check_rust_kv.py tokens RUST.safetensors > TOKENS_FILE   (prints the capture's token ids)
  check_rust_kv.py compare RUST.safetensors LLAMA.safetensors [--tol X]
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_reference import read_safetensors  # noqa: E402


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "tokens":
        print(" ".join(str(int(t)) for t in read_safetensors(sys.argv[2])["token_ids"]))
        return 0
    if len(sys.argv) < 4 or sys.argv[1] != "compare":
        print(__doc__)
        return 2
    tol = float(sys.argv[sys.argv.index("--tol") + 1]) if "--tol" in sys.argv else 1e-4
    rust, llama = read_safetensors(sys.argv[2]), read_safetensors(sys.argv[3])
    names = sorted(k for k in rust if k.startswith("layers."))
    if names != sorted(k for k in llama if k.startswith("layers.")):
        print("check_rust_kv: tensor names differ")
        return 1
    worst = 0.0
    for k in names:
        if rust[k].shape != llama[k].shape:
            print(f"check_rust_kv: {k} shape {llama[k].shape} != {rust[k].shape}")
            return 1
        worst = max(worst, np.abs(rust[k] - llama[k]).max() / max(np.abs(rust[k]).max(), 1e-12))
    print(f"check_rust_kv: {len(names)} tensors, max_rel_err={worst:.2e} (tolerance {tol:g})")
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
