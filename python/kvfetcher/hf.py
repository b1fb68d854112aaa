"""Hugging Face transformers integration: a prefix's KV into a ``DynamicCache``, and back.

Model-generic: the geometry comes from the model's config (layers, KV heads, head dim); the
fetched cache is built layer by layer with ``DynamicCache.update``, so sliding-window layers
are handled by transformers itself. transformers keeps per layer ``[batch, kv_heads, tokens,
head_dim]`` with K after RoPE, which is the ``hnd`` layout of one sequence.

K after RoPE as transformers computes it is in Hugging Face's "half-split" rotary convention;
llama.cpp's GGUF conversion permutes Q/K so that its interleaved-pair rotation gives the same
attention, which makes llama.cpp's K a permutation (within each head) of transformers' K for
the same tokens (:func:`llama_cpp_head_order`). The model id therefore names the engine
(:func:`model_id`): KV of the two engines is not exchanged.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, List, Optional, Tuple, Union

from . import Client, Layout, NotFoundError, _invalid, _token_list, model_id_from_file

if TYPE_CHECKING:
    import torch

__all__ = ["kv_geometry", "model_id", "save_cache", "fetch_cache", "llama_cpp_head_order"]


def kv_geometry(config: Any) -> Tuple[int, int, int]:
    """``(num_layers, kv_heads, head_dim)`` of a transformers model config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


def model_id(weights: Union[str, "os.PathLike[str]"], model: Any, **settings: Any) -> str:
    """The key namespace of KV that ``model`` computes from the weights file ``weights``:
    ``sha256:<file hash>;engine=transformers;dtype=<dtype>;dev=<cpu|cuda>`` plus ``settings``
    (for example ``attn="sdpa"``), so that KV of other weights, dtypes, devices or engines is
    never mixed in."""
    p = next(model.parameters())
    parts = [
        model_id_from_file(weights),
        "engine=transformers",
        f"dtype={str(p.dtype).replace('torch.', '')}",
        f"dev={p.device.type}",
    ]
    parts += [f"{k}={v}" for k, v in sorted(settings.items())]
    return ";".join(parts)


def _layers(cache: Any) -> List[Tuple["torch.Tensor", "torch.Tensor"]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def save_cache(client: Client, model: str, tokens: Any, cache: Any) -> int:
    """Saves the first ``len(tokens)`` positions of a batch-1 ``DynamicCache`` for ``tokens``;
    returns the chunks stored."""
    toks = _token_list(tokens)
    ks, vs = [], []
    for i, (k, v) in enumerate(_layers(cache)):
        if k is None or k.dim() != 4 or k.shape[0] != 1:
            raise _invalid(f"layer {i} of the cache is not a batch-1 [1, heads, tokens, dim] tensor")
        if k.shape[2] < len(toks):
            raise _invalid(f"layer {i} of the cache holds {k.shape[2]} tokens, fewer than {len(toks)}")
        ks.append(k[0, :, : len(toks)].contiguous())
        vs.append(v[0, :, : len(toks)].contiguous())
    return client.save(model, toks, ks, vs, order="hnd")


def fetch_cache(
    client: Client,
    model: str,
    tokens: Any,
    config: Any,
    dtype: "torch.dtype",
    device: Any = "cpu",
    max_tokens: Optional[int] = None,
) -> Tuple[Optional[Any], int]:
    """Fetches the longest stored prefix of ``tokens`` into a new ``DynamicCache`` of
    ``config``'s model, in ``dtype`` on ``device``: ``(cache, tokens_reused)``, or
    ``(None, 0)`` when nothing is stored. ``max_tokens`` caps the prefix (pass
    ``len(tokens) - 1`` to keep the last token for a forward pass that yields logits).

    Each layer is waited for in turn (on a GPU, the current stream waits) and copied into the
    cache; the fetched buffer is released at the end.
    """
    import torch
    from transformers import DynamicCache

    toks = _token_list(tokens)
    if max_tokens is not None:
        toks = toks[:max_tokens]
        if not toks:
            return None, 0
    layers, kv_heads, head_dim = kv_geometry(config)
    try:
        f = client.fetch(model, toks, Layout(dtype, "hnd"), device)
    except NotFoundError:
        return None, 0
    with f:
        got = f.shape
        if (got.num_layers, got.kv_heads, got.head_dim) != (layers, kv_heads, head_dim):
            raise _invalid(
                f"stored KV has {got.num_layers} layers x {got.kv_heads} heads x {got.head_dim} dims, "
                f"the model {layers} x {kv_heads} x {head_dim}: a model id shared by different models?"
            )
        try:
            cache = DynamicCache(config=config)
        except TypeError:  # transformers < 4.56
            cache = DynamicCache()
        for i in range(layers):
            k, v = f.layer(i)
            cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
            del k, v
        if torch.device(device).type == "cuda":
            torch.cuda.current_stream(device).synchronize()
    return cache, got.tokens


def llama_cpp_head_order(head_dim: int) -> List[int]:
    """Index ``j`` of llama.cpp's K (per head) holds transformers' element ``order[j]``, for
    llama-architecture GGUFs converted by ``convert_hf_to_gguf.py`` (which permutes Q/K so that
    llama.cpp's interleaved rotary pairs ``(2i, 2i+1)`` are Hugging Face's ``(i, i + d/2)``)."""
    half = head_dim // 2
    order = []
    for i in range(half):
        order += [i, i + half]
    return order
