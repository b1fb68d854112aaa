#!/usr/bin/env python3
"""Independent numpy reference of the llama2.c forward pass, for kv/tests known-answer checks.

Usage:
    python3 scripts/llama2_reference.py [data/stories260K.bin]

Needs numpy only. Written from llama2.c's run.c semantics (RMSNorm eps 1e-5, RoPE base 10000 on
consecutive pairs, grouped-query attention, SwiGLU, shared classifier when vocab_size > 0),
without looking at the Rust code. It runs a full-sequence (non-incremental) causal forward pass
in float64 and prints:
  - the top-5 token ids and logits after BOS (token 1) at position 0,
  - 16 greedy tokens from BOS (the prompt re-run in full at every step, no KV cache),
  - the sha256 of the checkpoint.
The Rust tests in kv/tests/llama2.rs record these values.
"""
import hashlib
import struct
import sys

import numpy as np


def load(path):
    raw = open(path, "rb").read()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    w = np.frombuffer(raw[28:], dtype="<f4").astype(np.float64)
    head = dim // n_heads
    kv_dim = n_kv * head
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        out = w[off:off + n].reshape(shape)
        off += n
        return out

    m = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv,
             vocab=vocab, seq_len=seq_len, head=head, kv_dim=kv_dim)
    m["emb"] = take(vocab, dim)
    m["rms_att"] = take(n_layers, dim)
    m["wq"] = take(n_layers, dim, dim)
    m["wk"] = take(n_layers, kv_dim, dim)
    m["wv"] = take(n_layers, kv_dim, dim)
    m["wo"] = take(n_layers, dim, dim)
    m["rms_ffn"] = take(n_layers, dim)
    m["w1"] = take(n_layers, hidden, dim)
    m["w2"] = take(n_layers, dim, hidden)
    m["w3"] = take(n_layers, hidden, dim)
    m["rms_final"] = take(dim)
    take(seq_len * head)  # legacy freq_cis tables
    m["wcls"] = m["emb"] if shared else take(vocab, dim)
    assert off == w.size, (off, w.size)
    return m, hashlib.sha256(raw).hexdigest()


def rmsnorm(x, g):
    return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def rope(x, head):
    # x: [T, n, head]; rotate pairs (2i, 2i+1) by pos * 10000^(-2i/head)
    T = x.shape[0]
    i = np.arange(0, head, 2)
    freq = 1.0 / (10000.0 ** (i / head))
    ang = np.arange(T)[:, None] * freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * cos - b * sin
    out[..., 1::2] = a * sin + b * cos
    return out


def forward(m, tokens):
    """Logits for every position of `tokens`, shape [T, vocab]."""
    T, head, nh, nkv = len(tokens), m["head"], m["n_heads"], m["n_kv"]
    x = m["emb"][tokens]
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for l in range(m["n_layers"]):
        h = rmsnorm(x, m["rms_att"][l])
        q = rope((h @ m["wq"][l].T).reshape(T, nh, head), head)
        k = rope((h @ m["wk"][l].T).reshape(T, nkv, head), head)
        v = (h @ m["wv"][l].T).reshape(T, nkv, head)
        rep = nh // nkv
        k = np.repeat(k, rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        s = np.einsum("tnd,snd->nts", q, k) / np.sqrt(head) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("nts,snd->tnd", s, v).reshape(T, -1)
        x = x + o @ m["wo"][l].T
        h = rmsnorm(x, m["rms_ffn"][l])
        g = h @ m["w1"][l].T
        u = h @ m["w3"][l].T
        x = x + ((g / (1 + np.exp(-g))) * u) @ m["w2"][l].T
    return rmsnorm(x, m["rms_final"]) @ m["wcls"].T


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "data/stories260K.bin"
    m, sha = load(path)
    logits = forward(m, [1])[0]
    top = np.argsort(-logits)[:5]
    print("sha256", sha)
    print("top5_ids", [int(t) for t in top])
    print("top5_logits", [round(float(logits[t]), 4) for t in top])
    toks = [1]
    for _ in range(16):
        toks.append(int(np.argmax(forward(m, toks)[-1])))
    print("greedy", toks)


if __name__ == "__main__":
    main()
