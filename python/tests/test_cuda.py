"""CUDA tensors through a real daemon: saves from GPU memory and fetches into it
(``device="cuda:0"``), bit-exact, with each layer awaited on the caller's stream. Runs where torch
sees a GPU (the H200 of scripts/gpu-check.sh); elsewhere it skips with the reason, and under
KVF_REQUIRE_GPU=1 a missing GPU fails."""

from __future__ import annotations

import os
import uuid

import pytest
import torch

import kvfetcher
from kvfetcher import Layout

LAYERS, HEADS, DIM = 4, 2, 64


@pytest.fixture(autouse=True)
def require_cuda():
    if not torch.cuda.is_available():
        if os.environ.get("KVF_REQUIRE_GPU") == "1":
            pytest.fail("KVF_REQUIRE_GPU=1 but torch sees no CUDA device")
        pytest.skip("no CUDA device")


def kv(tokens: int, dtype, device: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(tokens, HEADS, DIM, generator=g).to(dtype).to(device) for _ in range(LAYERS)]
    vs = [torch.randn(tokens, HEADS, DIM, generator=g).to(dtype).to(device) for _ in range(LAYERS)]
    return ks, vs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_save_and_fetch_are_bit_exact(stack, dtype):
    m, t = f"cuda-{uuid.uuid4()}", list(range(5000, 5040))
    ks, vs = kv(40, dtype, "cuda:0", seed=3)
    with kvfetcher.Client(stack.socket) as c:
        assert c.save(m, t, ks, vs) == 3  # 16 + 16 + 8 tokens, from device memory
        with c.fetch(m, t, Layout(dtype), device="cuda:0") as f:
            assert f.device == "cuda:0"
            side = torch.cuda.Stream()
            for i in range(LAYERS):
                # The layer's restore is awaited on `side`; reading there sees the bytes.
                k, v = f.layer(i, stream=side)
                assert k.device.type == "cuda" and k.dtype == dtype
                with torch.cuda.stream(side):
                    same = torch.equal(k, ks[i]) and torch.equal(v, vs[i])
                assert same, f"layer {i} differs"
            side.synchronize()
            assert f.wait_done().tokens == 40
        # The same KV fetched to the host equals what the GPU held.
        with c.fetch(m, t, Layout(dtype)) as f:
            for i, (k, v) in enumerate(f.layers()):
                assert torch.equal(k, ks[i].cpu()) and torch.equal(v, vs[i].cpu())


def test_cuda_tensors_outlive_the_handle(stack):
    m, t = f"cuda-{uuid.uuid4()}", list(range(7000, 7016))
    ks, vs = kv(16, torch.float16, "cpu", seed=5)
    with kvfetcher.Client(stack.socket) as c:
        c.save(m, t, ks, vs)
        f = c.fetch(m, t, Layout(torch.float16), device="cuda:0")
        k, v = f.layer(LAYERS - 1)
        f.release()  # deferred: the tensors still map the buffer
        torch.cuda.current_stream().synchronize()
        assert torch.equal(k.cpu(), ks[-1]) and torch.equal(v.cpu(), vs[-1])
        del k, v
