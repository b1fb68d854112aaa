"""The kvfetcher package against a real store and daemon (bit-exact, 16-token chunks)."""

from __future__ import annotations

import asyncio
import gc
import pickle
import time
import uuid
from pathlib import Path

import pytest
import torch

import kvfetcher
from kvfetcher import Layout
from kvfetcher.errors import (
    ClientClosedError,
    GpuUnsupportedError,
    InvalidArgumentError,
    KvFetcherError,
    LayerOutOfRangeError,
    NotFoundError,
    ReleasedError,
)

LAYERS, HEADS, DIM = 3, 2, 8


def model() -> str:
    return f"pytest-{uuid.uuid4()}"


def kv(tokens: int, dtype=torch.float16, seed: int = 0, order: str = "nhd"):
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, HEADS, DIM) if order == "nhd" else (HEADS, tokens, DIM)
    ks = [torch.randn(shape, generator=g).to(dtype) for _ in range(LAYERS)]
    vs = [torch.randn(shape, generator=g).to(dtype) for _ in range(LAYERS)]
    return ks, vs


def toks(n: int, base: int = 1000):
    return list(range(base, base + n))


@pytest.fixture
def client(stack):
    with kvfetcher.Client(stack.socket) as c:
        yield c


def fetches_active(c) -> int:
    return c.stats()["fetches_active"]


def wait_fetches(c, n: int) -> None:
    """Quiet releases are sent without an answer: wait until the daemon counted them."""
    deadline = time.monotonic() + 10
    while fetches_active(c) != n:
        assert time.monotonic() < deadline, f"fetches_active stays {fetches_active(c)}, expected {n}"
        time.sleep(0.02)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("order", ["nhd", "hnd"])
def test_save_then_fetch_is_bit_exact(client, dtype, order):
    m, t = model(), toks(40)
    ks, vs = kv(40, dtype, order=order)
    assert client.save(m, t, ks, vs, order=order) == 3  # 16 + 16 + 8 tokens
    assert client.lookup(m, t) == 40
    assert client.lookup(m, torch.tensor(t + [7, 8])) == 32  # an extension reuses whole chunks
    with client.fetch(m, t, Layout(dtype, order)) as f:
        assert f.shape == (LAYERS, 40, HEADS, DIM) and f.device == "cpu"
        assert f.layout == Layout(dtype, order)
        for i, (k, v) in enumerate(f.layers()):
            assert k.dtype == dtype and k.device.type == "cpu"
            assert torch.equal(k, ks[i]) and torch.equal(v, vs[i])
        assert f.wait_done().tokens == 40
    # The other order is the same values, transposed by the daemon.
    other = "hnd" if order == "nhd" else "nhd"
    with client.fetch(m, t, Layout(dtype, other)) as f:
        k, v = f.layer(LAYERS - 1)
        assert torch.equal(k, ks[-1].transpose(0, 1)) and torch.equal(v, vs[-1].transpose(0, 1))


def test_fetch_reads_what_the_rust_encoder_stored(stack, client, tmp_path: Path):
    """Chunks made by the Rust side (`kvfetcher encode --exact`, `put`) fetched as tensors."""
    safetensors = pytest.importorskip("safetensors.torch")
    m, t = model(), toks(37, base=5)
    ks, vs = kv(37, torch.float16, seed=3)
    tensors = {"token_ids": torch.tensor(t, dtype=torch.int64)}
    for i in range(LAYERS):
        tensors[f"layers.{i}.key"] = ks[i]
        tensors[f"layers.{i}.value"] = vs[i]
    safetensors.save_file(tensors, str(tmp_path / "kv.safetensors"))
    stack.run("encode", "--input", str(tmp_path / "kv.safetensors"), "--out", str(tmp_path / "chunks"),
              "--exact", "--variant", "zstd", "--chunk-tokens", "16", "--model-id", m)
    chunks = sorted(str(p) for p in (tmp_path / "chunks").iterdir())
    assert len(chunks) == 3
    stack.run("put", "--store", stack.store_addr, "--ca", str(stack.certs), *chunks)
    assert client.lookup(m, t) == 37
    with client.fetch(m, t, Layout(torch.float16, "nhd")) as f:
        got = [f.layer(i) for i in range(LAYERS)]
        for i, (k, v) in enumerate(got):
            assert torch.equal(k, ks[i]) and torch.equal(v, vs[i])


def test_paged_fetch_into_a_block_table(client):
    m, t = model(), toks(40)
    ks, vs = kv(40, torch.float32)
    client.save(m, t, ks, vs)
    bt = 16
    with client.fetch(m, t, Layout(torch.float32, "hnd", block_tokens=bt)) as f:
        k, v = f.layer(1)
        assert tuple(k.shape) == (3, HEADS, bt, DIM)  # ceil(40/16) blocks
        assert torch.equal(k[2, :, 8:], torch.zeros(HEADS, 8, DIM))  # padding
        pool_k = torch.full((10, HEADS, bt, DIM), 7.0)
        pool_v = torch.full((10, HEADS, bt, DIM), 7.0)
        table = [5, 2, 9, 0]  # one entry more than needed
        f.copy_layer_into(1, pool_k, pool_v, table)
        for b, slot in enumerate(table[:3]):
            n = min(bt, 40 - b * bt)
            want_k = ks[1][b * bt : b * bt + n].transpose(0, 1)
            assert torch.equal(pool_k[slot, :, :n], want_k)
            assert torch.equal(pool_v[slot, :, :n], vs[1][b * bt : b * bt + n].transpose(0, 1))
        assert torch.equal(pool_k[1], torch.full((HEADS, bt, DIM), 7.0))  # untouched
        with pytest.raises(InvalidArgumentError, match="block_ids"):
            f.copy_layer_into(0, pool_k, pool_v, [1])
        with pytest.raises(InvalidArgumentError, match="k_cache"):
            f.copy_layer_into(0, pool_k.half(), pool_v, table)


def test_tensors_outlive_the_handle_and_the_client(stack):
    c = kvfetcher.Client(stack.socket)
    m, t = model(), toks(20)
    ks, vs = kv(20)
    c.save(m, t, ks, vs)
    before = fetches_active(c)
    f = c.fetch(m, t)
    k0, v0 = f.layer(0)
    assert fetches_active(c) == before + 1
    # Tensors over the buffer keep it (and the daemon's fetch) alive past the handle.
    assert f.release() is False
    assert f.released
    assert f.release() is False  # twice is fine
    with pytest.raises(ReleasedError) as e:
        f.layer(1)
    assert e.value.code == "released"
    del f
    gc.collect()
    assert torch.equal(k0, ks[0]) and torch.equal(v0, vs[0])
    assert fetches_active(c) == before + 1
    # The client closed: calls fail, but a live handle and its tensors still work.
    g = c.fetch(m, t)
    c.close()
    c.close()
    assert c.closed
    with pytest.raises(ClientClosedError) as e:
        c.lookup(m, t)
    assert e.value.code == "client_closed"
    k2, v2 = g.layer(2)
    assert torch.equal(k2, ks[2]) and torch.equal(v2, vs[2])
    with kvfetcher.Client(stack.socket) as other:
        del k0, v0
        gc.collect()
        assert g.release() is False  # k2, v2 still hold it
        del k2, v2, g
        gc.collect()
        wait_fetches(other, before)


def test_release_without_tensors_is_confirmed(client):
    m, t = model(), toks(16)
    client.save(m, t, *kv(16))
    before = fetches_active(client)
    f = client.fetch(m, t)
    f.wait_done()
    assert f.release() is True
    assert fetches_active(client) == before
    assert f.release() is False
    del f
    g = client.fetch(m, t)
    del g  # garbage collection releases it
    gc.collect()
    wait_fetches(client, before)


def test_host_tensors_are_copy_on_write(client):
    m, t = model(), toks(16)
    ks, vs = kv(16)
    client.save(m, t, ks, vs)
    with client.fetch(m, t) as f:
        k, _ = f.layer(0)
        k.fill_(42.0)  # a private copy of the touched pages, not a crash
        assert bool((k == 42.0).all())
    with client.fetch(m, t) as f:
        k, _ = f.layer(0)
        assert torch.equal(k, ks[0])


def test_misses_and_bad_requests_raise_typed_errors(client):
    m = model()
    assert client.lookup(m, toks(8)) == 0
    with pytest.raises(NotFoundError) as e:
        client.fetch(m, toks(8))
    assert e.value.code == "not_found" and e.value.message
    assert isinstance(e.value, KvFetcherError) and isinstance(e.value, LookupError)
    back = pickle.loads(pickle.dumps(e.value))
    assert (type(back), back.code, back.message) == (NotFoundError, e.value.code, e.value.message)

    m, t = model(), toks(16)
    client.save(m, t, *kv(16))
    with client.fetch(m, t) as f:
        with pytest.raises(LayerOutOfRangeError) as e:
            f.layer(LAYERS)
        assert e.value.code == "layer_out_of_range" and isinstance(e.value, IndexError)


def test_gpu_fetch_without_a_gpu_is_a_clear_error(client):
    if kvfetcher.gpu_unavailable_reason() is None:
        pytest.skip("a CUDA driver is present: the GPU tests cover this host")
    m, t = model(), toks(16)
    client.save(m, t, *kv(16))
    with pytest.raises(GpuUnsupportedError) as e:
        client.fetch(m, t, device="cuda:0")
    assert e.value.code == "gpu_unsupported"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ks, vs: ([k.double() for k in ks], [v.double() for v in vs]), "float16, bfloat16 or float32"),
        (lambda ks, vs: ([k.to(torch.int16) for k in ks], [v.to(torch.int16) for v in vs]), "float16, bfloat16 or float32"),
        (lambda ks, vs: (ks, [vs[0].float()] + vs[1:]), "v_layers\\[0\\] is torch.float32"),
        (lambda ks, vs: (ks, vs[:-1]), "one K and one V tensor per layer"),
        (lambda ks, vs: ([], []), "one K and one V tensor per layer"),
        (lambda ks, vs: ([k.reshape(16, -1) for k in ks], vs), "3-D"),
        (lambda ks, vs: ([k[:8] for k in ks], [v[:8] for v in vs]), "8 tokens on axis 0"),
        (lambda ks, vs: (ks, [vs[0], vs[1][:, :1], vs[2]]), "v_layers\\[1\\] has shape"),
        (lambda ks, vs: ([ks[0].transpose(1, 2).contiguous().transpose(1, 2)] + ks[1:], vs), "not contiguous"),
        (lambda ks, vs: ([k.to("meta") for k in ks], [v.to("meta") for v in vs]), "CPU or a CUDA device"),
        (lambda ks, vs: (ks, [vs[0].to("meta")] + vs[1:]), "v_layers\\[0\\] is on meta"),
        (lambda ks, vs: (ks, [v.numpy() for v in vs]), "not a torch.Tensor"),
    ],
)
def test_bad_tensors_are_refused_before_anything_is_sent(client, make, match):
    ks, vs = make(*kv(16))
    with pytest.raises(InvalidArgumentError, match=match) as e:
        client.save(model(), toks(16), ks, vs)
    assert e.value.code == "invalid_argument" and isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "tokens, match",
    [([], "empty"), ([1, -1], "outside"), ([1, 1 << 32], "outside"), (torch.ones(2, 2, dtype=torch.long), "1-D"),
     (torch.ones(3), "integers"), (["a"], "sequence of ints")],
)
def test_bad_tokens(client, tokens, match):
    with pytest.raises(InvalidArgumentError, match=match):
        client.lookup(model(), tokens)


def test_bad_layouts_and_devices(client):
    with pytest.raises(InvalidArgumentError, match="float16"):
        Layout(torch.int8)
    with pytest.raises(InvalidArgumentError, match="order"):
        Layout(torch.float16, "thd")
    with pytest.raises(InvalidArgumentError, match="block_tokens"):
        Layout(block_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="device"):
        client.fetch(model(), toks(4), device="tpu")
    with pytest.raises(InvalidArgumentError, match="DLPack"):
        client._c.save(model(), toks(4), "float16", "nhd", 0, 1, 1, 1, object())


def test_save_from_a_tensor_that_requires_grad(client):
    m, t = model(), toks(16)
    ks, vs = kv(16, torch.float32)
    ks = [k.requires_grad_() for k in ks]
    client.save(m, t, ks, vs)
    with client.fetch(m, t, Layout(torch.float32)) as f:
        assert torch.equal(f.layer(0)[0], ks[0].detach())


def test_asyncio_client(stack):
    from kvfetcher.aio import AsyncClient

    async def main():
        m, t = model(), toks(32)
        ks, vs = kv(32)
        async with await AsyncClient.connect(stack.socket) as c:
            assert await c.save(m, t, ks, vs) == 2
            n1, n2 = await asyncio.gather(c.lookup(m, t), c.lookup(model(), t))
            assert (n1, n2) == (32, 0)
            f = await c.fetch(m, t)
            k, v = await f.layer(1)
            assert torch.equal(k, ks[1]) and torch.equal(v, vs[1])
            assert (await f.wait_done()).tokens == 32
            assert await f.release() is False  # k, v still alive
            with pytest.raises(NotFoundError):
                await c.fetch(model(), t)

    asyncio.run(main())
