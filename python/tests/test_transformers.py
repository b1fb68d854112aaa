"""Hugging Face transformers on a real model (SmolLM2-135M-Instruct, the GGUF of
scripts/fetch-model.sh, dequantized by transformers through `gguf`): engine A prefills and saves
a document's KV; a fresh process (engine B) fetches the prefix into a DynamicCache and generates.
With the bit-exact store the greedy continuation equals a full prefill's, and the fetched K
(after RoPE, as transformers stores it) matches llama.cpp's capture of the same tokens.

Skips with the reason on a dev box without transformers, gguf, the model or the llama.cpp
engine; under CI=true any of those missing fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, skip_unless_ci, start_stack

GGUF = Path(os.environ.get("KVF_GGUF", ROOT / "build/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
ENGINE = Path(os.environ.get("KVF_LLAMA", ROOT / "build/llama/bin/kvf-llama"))
EXAMPLE = ROOT / "python/examples/hf_generate.py"
TEXT = ROOT / "data/texts/declaration.txt"
PROMPT, PREFIX = 128, 96  # the saved document is the first 96 tokens (six 16-token chunks)


def prerequisites() -> None:
    for mod in ("transformers", "gguf", "accelerate", "safetensors"):
        try:
            __import__(mod)
        except ImportError:
            skip_unless_ci(f"{mod} is not installed (make python-deps)")
    if not GGUF.is_file():
        skip_unless_ci(f"no model at {GGUF} (make models)")


def example(stack, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, str(EXAMPLE), "--gguf", str(GGUF), "--socket", stack.socket, *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"{EXAMPLE.name} {' '.join(args)} failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exact_stack(tmp_path_factory):
    s = start_stack(tmp_path_factory.mktemp("hf"), bits=16, chunk_tokens=16)
    yield s
    s.stop()


def test_fetched_prefix_generates_what_a_full_prefill_does(exact_stack, tmp_path: Path):
    prerequisites()
    from safetensors.torch import load_file

    from kvfetcher.hf import llama_cpp_head_order

    have_engine = ENGINE.is_file()
    if have_engine:
        # llama.cpp's own K/V and token ids for the document (kvfetcher-bench kv capture --gguf).
        exact_stack.run("kv", "capture", "--gguf", str(GGUF), "--engine", str(ENGINE), "--text", str(TEXT),
                        "--tokens", str(PROMPT), "--out", str(tmp_path / "llama.safetensors"),
                        tool="kvfetcher-bench")
        cap = load_file(str(tmp_path / "llama.safetensors"))
        ids = cap["token_ids"].tolist()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
        ids = tok(TEXT.read_text(), add_special_tokens=False).input_ids[:PROMPT]
    assert len(ids) == PROMPT
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))

    saved = example(exact_stack, "--tokens-file", str(tmp_path / "ids.txt"), "--save", "--prefix", str(PREFIX))
    assert saved["saved_tokens"] == PREFIX and saved["saved_chunks"] == PREFIX // 16
    got = example(exact_stack, "--tokens-file", str(tmp_path / "ids.txt"), "--fetch", "--gen", "24",
                  "--dump-k", str(tmp_path / "hf_k.safetensors"))
    print(json.dumps(got))
    assert got["model_id"] == saved["model_id"] and ";engine=transformers;dtype=float32;dev=cpu" in got["model_id"]
    assert got["reused"] == PREFIX
    assert got["same"], f"fetched continuation {got['gen_fetch']} != full prefill {got['gen_prefill']}"

    if not have_engine:
        skip_unless_ci(f"generation checked; no llama.cpp engine at {ENGINE} to compare K with (make engine)")
    hf_k = load_file(str(tmp_path / "hf_k.safetensors"))
    layers = len(hf_k)
    assert layers == sum(1 for k in cap if k.endswith(".key"))
    head_dim = hf_k["layers.0.key"].shape[-1]
    order = llama_cpp_head_order(head_dim)
    worst = 0.0
    for i in range(layers):
        ours = hf_k[f"layers.{i}.key"][:, :, order]  # into llama.cpp's element order
        theirs = cap[f"layers.{i}.key"][:PREFIX].float()
        assert ours.shape == theirs.shape, (i, ours.shape, theirs.shape)
        rel = float((ours - theirs).abs().max() / theirs.abs().max())
        cos = float(torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0))
        worst = max(worst, rel)
        # Two engines over the same Q4_1 weights (llama.cpp also quantizes activations to 8
        # bits in its matmuls, and keeps an f16 cache): close, not equal. A wrong RoPE
        # convention, head order or position gives cos far below this.
        assert cos > 0.995 and rel < 0.08, f"layer {i}: cos {cos:.5f}, max rel diff {rel:.4f}"
        # Without the permutation the two do not match: the conventions differ.
        if i == 0:
            plain = hf_k[f"layers.{i}.key"]
            assert float(torch.nn.functional.cosine_similarity(plain.flatten(), theirs.flatten(), dim=0)) < 0.9
    print(f"K vs llama.cpp: {layers} layers, worst max relative difference {worst:.4f}")
