#!/usr/bin/env python3
"""Checks llama.cpp (through kvf-llama) against the independent numpy llama2.c forward pass
(scripts/llama2_reference.py) on stories260K:

  - K (after RoPE) and V of every layer, token and head that llama.cpp keeps in its cache, read
    back through kvf-llama's state mapping (--kv-out), equal the reference's to float tolerance:
    this is what proves the head order and the RoPE pairing (no Q/K permutation) are right;
  - the logits llama.cpp produced at every generated step equal the reference's, and the greedy
    tokens are the same.

Usage: check_reference.py MODEL.bin TOKENS_FILE KV.safetensors LOGITS.f32 GEN_IDS [--tol-kv X]
Prints a summary line and exits 1 on a mismatch.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../scripts"))
import llama2_reference as ref  # noqa: E402


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = json.loads(raw[8:8 + n])
    out = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        dt = {"F32": "<f4", "F16": "<f2", "U32": "<u4"}[t["dtype"]]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=dt).reshape(t["shape"])
        out[name] = arr if t["dtype"] == "U32" else arr.astype(np.float64)
    return out


def reference_kv(m, tokens):
    """K after RoPE and V of every layer, [T, n_kv, head], from the numpy reference."""
    T, head, nh, nkv = len(tokens), m["head"], m["n_heads"], m["n_kv"]
    x = m["emb"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    ks, vs = [], []
    for l in range(m["n_layers"]):
        h = ref.rmsnorm(x, m["rms_att"][l])
        q = ref.rope((h @ m["wq"][l].T).reshape(T, nh, head), head)
        k = ref.rope((h @ m["wk"][l].T).reshape(T, nkv, head), head)
        v = (h @ m["wv"][l].T).reshape(T, nkv, head)
        ks.append(k)
        vs.append(v)
        rep = nh // nkv
        kk, vv = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        s = np.einsum("tnd,snd->nts", q, kk) / np.sqrt(head) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("nts,snd->tnd", s, vv).reshape(T, -1)
        x = x + o @ m["wo"][l].T
        h = ref.rmsnorm(x, m["rms_ffn"][l])
        g = h @ m["w1"][l].T
        u = h @ m["w3"][l].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ m["w2"][l].T
    return ks, vs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("kv")
    ap.add_argument("logits")
    ap.add_argument("gen")
    ap.add_argument("--tol-kv", type=float, default=2e-3, help="max |diff| / max |value| per tensor")
    ap.add_argument("--tol-logit", type=float, default=2e-2)
    a = ap.parse_args()

    m, _ = ref.load(a.model)
    toks = [int(t) for t in open(a.tokens).read().replace(",", " ").split()]
    gen = [int(t) for t in a.gen.split()]
    ks, vs = reference_kv(m, toks)
    got = read_safetensors(a.kv)
    worst_kv = 0.0
    for l in range(m["n_layers"]):
        for name, want in ((f"layers.{l}.key", ks[l]), (f"layers.{l}.value", vs[l])):
            have = got[name]
            if have.shape != want.shape:
                print(f"check_reference: {name} shape {have.shape} != {want.shape}")
                return 1
            rel = np.abs(have - want).max() / max(np.abs(want).max(), 1e-12)
            worst_kv = max(worst_kv, rel)
    # The logits of generated step i were computed at position len(toks)-1+i.
    seq = toks + gen[:-1]
    ref_logits = ref.forward(m, seq)[len(toks) - 1:]
    have = np.fromfile(a.logits, dtype="<f4").reshape(len(gen), m["vocab"]).astype(np.float64)
    diff = np.abs(have - ref_logits).max()
    ref_greedy = [int(i) for i in ref_logits.argmax(-1)]
    same = ref_greedy == gen
    print(f"check_reference: kv_max_rel_err={worst_kv:.2e} logits_max_abs_diff={diff:.2e} "
          f"greedy_identical={int(same)} ({len(gen)} steps)")
    ok = worst_kv <= a.tol_kv and diff <= a.tol_logit and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
