#!/usr/bin/env python3
"""Converts a llama2.c checkpoint (stories260K.bin) to a GGUF file that llama.cpp loads.

Usage:
    python3 scripts/convert-stories-gguf.py [--model data/stories260K.bin]
                                            [--out build/llama/stories260K.gguf]

What it writes, following llama.cpp's own examples/convert-llama2c-to-ggml (read in the vendored
sources of the pinned llama-cpp-python sdist, see scripts/llama-build.sh):
  - architecture "llama", hyperparameters from the 7-value llama2.c header, RMS eps 1e-5,
    RoPE over the whole head (rope.dimension_count = head_dim), base 10000;
  - every weight in f32, copied in llama2.c's row-major [out, in] order. No Q/K permutation:
    llama2.c rotates consecutive pairs (2i, 2i+1), which is llama.cpp's "normal" RoPE for the
    llama architecture. The permutation in convert_hf_to_gguf.py only undoes the Hugging Face
    checkpoints' half-split rotation; applying it here would give wrong K (and wrong output).
    So llama.cpp's K cache holds exactly llama2.c's K after RoPE, head by head.
  - output.weight = the token embedding when the classifier is shared (vocab_size > 0).

Tokenizer: the model's own tok512 (llama2.c tokenizer, 512 sentencepiece pieces) is not
available offline here (it is not shipped by any package we can install). This script writes a
documented PLACEHOLDER vocabulary of 512 tokens with the layout of a sentencepiece byte-fallback
vocab, which is tok512's layout for the first 259 ids:
    0 "<unk>", 1 "<s>" (BOS), 2 "</s>" (EOS), 3..258 byte tokens "<0x00>".."<0xFF>",
    259..511 "[tok NNN]" (unknown merged pieces, never produced by tokenizing text).
Token ids are what the engine, the store and the tests exchange, so the placeholder changes
nothing there; only the text rendering of ids 259..511 is unknown. Pass --vocab tok512.bin
(llama2.c tokenizer format) to use the real one where it is available.

GGUF writer: the gguf-py package vendored by the same llama.cpp (build/llama/install/gguf-py or
build/llama/src/...), so the file format matches the loader exactly; falls back to an installed
PyPI `gguf`.
Needs numpy (and PyYAML, which gguf-py imports).
"""
import argparse
import glob
import os
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_gguf():
    """The vendored gguf-py that scripts/llama-build.sh installs, else PyPI `gguf`."""
    vendored = sorted(glob.glob(os.path.join(ROOT, "build/llama/src/*/vendor/llama.cpp/gguf-py")))
    vendored += [p for p in [os.path.join(ROOT, "build/llama/install/gguf-py")] if os.path.isdir(p)]
    if vendored:
        sys.path.insert(0, vendored[-1])
    import gguf  # noqa: E402  pylint: disable=import-outside-toplevel

    return gguf


def read_llama2c(path):
    """Header and named f32 weight arrays of a llama2.c checkpoint (run.c order)."""
    raw = open(path, "rb").read()
    if len(raw) < 28:
        raise SystemExit(f"{path}: too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads:
        raise SystemExit(f"{path}: impossible header {dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len}")
    head = dim // n_heads
    kv_dim = n_kv * head
    w = np.frombuffer(raw, dtype="<f4", offset=28)
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        if off + n > w.size:
            raise SystemExit(f"{path}: truncated weights")
        out = w[off:off + n].reshape(shape)
        off += n
        return out

    t = {}
    t["emb"] = take(vocab, dim)
    t["rms_att"] = take(n_layers, dim)
    t["wq"] = take(n_layers, dim, dim)
    t["wk"] = take(n_layers, kv_dim, dim)
    t["wv"] = take(n_layers, kv_dim, dim)
    t["wo"] = take(n_layers, dim, dim)
    t["rms_ffn"] = take(n_layers, dim)
    t["w1"] = take(n_layers, hidden, dim)
    t["w2"] = take(n_layers, dim, hidden)
    t["w3"] = take(n_layers, hidden, dim)
    t["rms_final"] = take(dim)
    take(seq_len * head)  # legacy freq_cis_real + freq_cis_imag tables, unused
    t["wcls"] = t["emb"] if shared else take(vocab, dim)
    if off != w.size:
        raise SystemExit(f"{path}: {w.size - off} trailing floats; not a llama2.c checkpoint")
    hp = dict(dim=dim, hidden=hidden, n_layers=n_layers, n_heads=n_heads, n_kv=n_kv,
              vocab=vocab, seq_len=seq_len, head=head)
    return hp, t


def placeholder_vocab(gguf, n_vocab):
    """The documented placeholder vocabulary (see the module doc)."""
    tt = gguf.TokenType
    toks, types = ["<unk>", "<s>", "</s>"], [tt.UNKNOWN, tt.CONTROL, tt.CONTROL]
    for b in range(256):
        toks.append(f"<0x{b:02X}>")
        types.append(tt.BYTE)
    while len(toks) < n_vocab:
        toks.append(f"[tok {len(toks)}]")
        types.append(tt.NORMAL)
    return toks[:n_vocab], [0.0] * n_vocab, types[:n_vocab]


def llama2c_vocab(gguf, path, n_vocab):
    """A llama2.c tokenizer.bin (max_len u32, then per token: score f32, len u32, bytes)."""
    tt = gguf.TokenType
    raw = open(path, "rb").read()
    off = 4
    toks, scores, types = [], [], []
    for i in range(n_vocab):
        score, n = struct.unpack_from("<fI", raw, off)
        off += 8
        text = raw[off:off + n].decode("utf-8", errors="replace")
        off += n
        kind = tt.NORMAL
        if i == 0:
            text, kind = "<unk>", tt.UNKNOWN
        elif i in (1, 2):
            text, kind = ("<s>", "</s>")[i - 1], tt.CONTROL
        elif text.startswith("<0x") and len(text) == 6:
            kind = tt.BYTE
        toks.append(text.replace(" ", "\u2581"))
        scores.append(score)
        types.append(kind)
    return toks, scores, types


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "data/stories260K.bin"))
    ap.add_argument("--out", default=os.path.join(ROOT, "build/llama/stories260K.gguf"))
    ap.add_argument("--vocab", help="llama2.c tokenizer.bin (default: placeholder vocab)")
    ap.add_argument("--permute-qk", action="store_true",
                    help="NEGATIVE CONTROL ONLY: apply convert_hf_to_gguf's Q/K permutation, which "
                         "is wrong for llama2.c checkpoints (tests/llama/run.sh checks that the "
                         "reference comparison catches it)")
    a = ap.parse_args()

    gguf = import_gguf()
    hp, t = read_llama2c(a.model)
    if a.vocab:
        toks, scores, types = llama2c_vocab(gguf, a.vocab, hp["vocab"])
    else:
        toks, scores, types = placeholder_vocab(gguf, hp["vocab"])

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_name("stories260K (llama2.c)")
    w.add_context_length(hp["seq_len"])
    w.add_embedding_length(hp["dim"])
    w.add_block_count(hp["n_layers"])
    w.add_feed_forward_length(hp["hidden"])
    w.add_head_count(hp["n_heads"])
    w.add_head_count_kv(hp["n_kv"])
    w.add_rope_dimension_count(hp["head"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731

    def qk(w, n_head):
        if not a.permute_qk:
            return w
        # convert_hf_to_gguf.py LlamaModel.permute
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    w.add_tensor("token_embd.weight", f32(t["emb"]))
    w.add_tensor("output_norm.weight", f32(t["rms_final"]))
    w.add_tensor("output.weight", f32(t["wcls"]))
    for i in range(hp["n_layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", f32(t["rms_att"][i]))
        w.add_tensor(f"blk.{i}.attn_q.weight", f32(qk(t["wq"][i], hp["n_heads"])))
        w.add_tensor(f"blk.{i}.attn_k.weight", f32(qk(t["wk"][i], hp["n_kv"])))
        w.add_tensor(f"blk.{i}.attn_v.weight", f32(t["wv"][i]))
        w.add_tensor(f"blk.{i}.attn_output.weight", f32(t["wo"][i]))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", f32(t["rms_ffn"][i]))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", f32(t["w1"][i]))
        w.add_tensor(f"blk.{i}.ffn_down.weight", f32(t["w2"][i]))
        w.add_tensor(f"blk.{i}.ffn_up.weight", f32(t["w3"][i]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"convert-stories-gguf: wrote {a.out} ({hp}, vocab {'tok512' if a.vocab else 'placeholder'})")


if __name__ == "__main__":
    main()
