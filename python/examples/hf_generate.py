#!/usr/bin/env python3
"""Prefix reuse in Hugging Face transformers through the KVFetcher daemon.

  --save:  prefill the first --prefix tokens and save their KV (engine A).
  --fetch: in a fresh process (engine B), fetch the longest stored prefix of the whole prompt
           into a DynamicCache, generate greedily from it, then generate from a full prefill of
           the same prompt for reference; prints both, and the time to the first token of each.

The model is any transformers causal LM given as a GGUF file (transformers dequantizes it
through the `gguf` package) or a checkpoint folder; shapes come from its config. Token ids
come from --tokens-file (one line of ids, e.g. from `kvfetcher-bench kv capture`) or --text.
Output: one JSON object on stdout.

  python hf_generate.py --gguf build/models/SmolLM2-135M-Instruct.Q4_1.gguf --socket S --text doc.txt --prefix 96 --save
  python hf_generate.py --gguf build/models/SmolLM2-135M-Instruct.Q4_1.gguf --socket S --text doc.txt --fetch
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import kvfetcher
from kvfetcher import hf


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.gguf:
        folder, name = os.path.split(os.path.abspath(args.gguf))
        kw = {"gguf_file": name}
        weights = args.gguf
    else:
        folder, kw = args.model, {}
        weights = os.path.join(args.model, "model.safetensors")
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(folder, **kw) if args.text else None
    return model, tok, weights


def token_ids(args, tok) -> list:
    if args.tokens_file:
        ids = [int(x) for x in open(args.tokens_file).read().split()]
    else:
        ids = tok(open(args.text).read(), add_special_tokens=False).input_ids
    return ids[: args.tokens] if args.tokens else ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.no_grad()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", help="a GGUF model file")
    src.add_argument("--model", help="a transformers checkpoint folder")
    ids = p.add_mutually_exclusive_group(required=True)
    ids.add_argument("--tokens-file", help="token ids, whitespace-separated")
    ids.add_argument("--text", help="a text file, tokenized by the model's tokenizer")
    p.add_argument("--tokens", type=int, default=0, help="keep the first N tokens (0: all)")
    p.add_argument("--socket", default=None, help="daemon socket (default $KVFETCHER_SOCKET)")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N (model and fetched KV)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", action="store_true", help="prefill --prefix tokens and save their KV")
    mode.add_argument("--fetch", action="store_true", help="fetch, generate, compare with a full prefill")
    p.add_argument("--prefix", type=int, default=0, help="--save: tokens to prefill and save (0: all)")
    p.add_argument("--gen", type=int, default=16, help="--fetch: greedy tokens to generate")
    p.add_argument("--dump-k", help="--fetch: write the fetched cache's K (layers.{i}.key, [tokens, heads, dim]) as safetensors")
    args = p.parse_args()

    model, tok, weights = load(args)
    ids = token_ids(args, tok)
    mid = hf.model_id(weights, model)
    client = kvfetcher.Client(args.socket)
    out = {"model_id": mid, "prompt": len(ids)}
    dev = args.device

    if args.save:
        n = args.prefix or len(ids)
        x = torch.tensor([ids[:n]], device=dev)
        t0 = time.perf_counter()
        cache = model(x, use_cache=True).past_key_values
        sync(dev)
        out["prefill_ms"] = (time.perf_counter() - t0) * 1e3
        out["saved_chunks"] = hf.save_cache(client, mid, ids[:n], cache)
        out["saved_tokens"] = n
        print(json.dumps(out))
        return 0

    x = torch.tensor([ids], device=dev)
    # A forward pass before the clocks start, so that neither TTFT pays for one-time setup
    # (CUDA context, kernel selection, allocator growth): an engine serving requests is warm.
    with torch.no_grad():
        model(x[:, : min(len(ids), 32)], use_cache=True)
    # Engine B: fetch (keeping the last token to decode), then the rest of the prompt.
    sync(dev)
    t0 = time.perf_counter()
    cache, reused = hf.fetch_cache(client, mid, ids, model.config, model.dtype, dev, max_tokens=len(ids) - 1)
    t_fetch = time.perf_counter()
    logits = model(x[:, reused:], past_key_values=cache, use_cache=True).logits if cache is not None else model(x).logits
    first = int(logits[0, -1].argmax())
    sync(dev)
    out["ttft_fetch_ms"] = (time.perf_counter() - t0) * 1e3
    out["fetch_ms"] = (t_fetch - t0) * 1e3
    out["reused"] = reused
    if args.dump_k and cache is not None:
        from safetensors.torch import save_file

        layers = hf._layers(cache)
        save_file(
            {f"layers.{i}.key": k[0, :, :reused].transpose(0, 1).contiguous().float().cpu() for i, (k, _) in enumerate(layers)},
            args.dump_k,
        )
    # The fetched prefix plus generation; the cache already holds the whole prompt.
    gen = [first]
    for _ in range(args.gen - 1):
        step = model(torch.tensor([[gen[-1]]], device=dev), past_key_values=cache, use_cache=True).logits
        gen.append(int(step[0, -1].argmax()))
    out["gen_fetch"] = gen

    # Reference: a full prefill of the same prompt, then the same greedy loop.
    sync(dev)
    t0 = time.perf_counter()
    r = model(x, use_cache=True)
    ref = [int(r.logits[0, -1].argmax())]
    sync(dev)
    out["ttft_prefill_ms"] = (time.perf_counter() - t0) * 1e3
    cache = r.past_key_values
    for _ in range(args.gen - 1):
        step = model(torch.tensor([[ref[-1]]], device=dev), past_key_values=cache, use_cache=True).logits
        ref.append(int(step[0, -1].argmax()))
    out["gen_prefill"] = ref
    out["same"] = gen == ref
    if tok is not None:
        out["text"] = tok.decode(gen)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
