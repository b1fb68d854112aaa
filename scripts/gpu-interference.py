#!/usr/bin/env python3
"""GPU interference: bf16 GEMM TFLOP/s alone and next to a second tenant that decompresses KV.

Runs on a GPU host (torch with CUDA; nvCOMP optional). Each setting is its own measurement, in
one run, on one card:

  (a) GEMM alone;
  (b) GEMM while `kvfetcher-bench gpu load` decodes the real-KV HEVC fixture flat out on the card's
      NVDEC engine count of sessions (a separate process, started first, outliving the window);
  (c) the same, paced to a 10 Gbit/s compressed input rate;
  (d) GEMM while nvCOMP ANS decompresses the same KV flat out (a python subprocess of this
      script: its own CUDA context and stream, like a real second tenant);
  (e) nvCOMP ANS paced to the same 10 Gbit/s compressed input rate;
  (f) GEMM while `kvfetcher-bench gpu transform-load` restores transform-coded (rans) sections
      through the daemon's GPU route (rANS decode, inverse transform, RoPE, scatter) flat out;
  (g) the same, paced to the 10 Gbit/s compressed input rate.

--tenants picks which of NVDEC, nvCOMP and rans run (default all). --nvdec-qp lossless,14 runs
the NVDEC rows on the lossless fixture and on a lossy one (x265 at QP 14, `gpu fixtures --qp
14`): NVDEC's cost to the GEMM for the lossy HEVC mode's streams.

With --nvdec-frames copy,map,none, (b) and (c) run once per frame handling of the load (`map`:
frames mapped and unmapped, not copied; `none`: never mapped), which splits NVDEC's cost into
NVDEC's decode, its per-frame post-processing (the map) and the daemon's copies. The table also
gives the SM clock and board power during each GEMM window (NVML, when torch can read them).

"The same KV" for nvCOMP is the 8-bit codes of the real KV (per-channel min/max over tokens,
as the codec quantizes), one byte each, tiled to ~256 MiB on the GPU; the raw KV (the file's
16-bit floats) is a second row of the ratio table. Prints nvCOMP's ratio and decompression GB/s
for each algorithm tried, the decoders' achieved rates, and last a markdown table.

  python3 scripts/gpu-interference.py --bin .carry/kvfetcher-bench \\
      --kv .carry/codelm-kv-a-4l.safetensors --fixtures .carry/fixtures --seconds 10

nvCOMP (PyPI nvidia-nvcomp-cu13) comes from its wheels:
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
"""

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import time

NVCOMP_SKIP = "skipped: nvidia-nvcomp-cu13 not installed"
GEMM_N = 8192
TILE_BYTES = 256 << 20
PACE_PIECE_BYTES = 16 << 20
ALGORITHMS = ["ANS", "Bitcomp", "Zstd", "GDeflate"]


def say(*a):
    print(*a, flush=True)


def die(msg):
    print(f"gpu-interference: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


# ---------------------------------------------------------------- the KV, without safetensors


def read_kv(path):
    """The KV tensors of a safetensors file as float32 [tokens, channels] arrays, plus the raw
    bytes of all tensors in file order and their dtype name."""
    import numpy as np

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    tensors, raw, dtype = [], [], None
    names = sorted(
        (k for k in header if k != "__metadata__"),
        key=lambda k: header[k]["data_offsets"][0],
    )
    if not names:
        die(f"{path}: no tensors")
    for k in names:
        t = header[k]
        a, b = t["data_offsets"]
        buf = data[a:b]
        shape = t["shape"]
        dt = t["dtype"]
        if dt == "F16":
            x = np.frombuffer(buf, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            x = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif dt == "F32":
            x = np.frombuffer(buf, dtype="<f4").copy()
        else:
            die(f"{path}: tensor {k} has dtype {dt} (want F16, BF16 or F32)")
        dtype = dt
        rows = shape[0]
        tensors.append(x.reshape(rows, -1))
        raw.append(np.frombuffer(buf, dtype=np.uint8))
    return tensors, np.concatenate(raw), dtype


def codes8(tensors):
    """8-bit codes, per channel over tokens, as kvfetcher_codec::quantize does."""
    import numpy as np

    out = []
    for x in tensors:
        lo, hi = x.min(axis=0), x.max(axis=0)
        scale = (hi - lo) / 255.0
        inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
        q = np.clip(np.round((x - lo) * inv), 0, 255).astype(np.uint8)
        out.append(q.reshape(-1))
    return np.concatenate(out)


def tiled_on_gpu(host_u8, torch):
    """`host_u8` repeated to ~TILE_BYTES, as a uint8 CUDA tensor."""
    import numpy as np

    reps = max(1, TILE_BYTES // host_u8.size)
    return torch.from_numpy(np.tile(host_u8, reps)).cuda()


# ---------------------------------------------------------------- nvCOMP


def nvcomp_module():
    try:
        from nvidia import nvcomp  # noqa: PLC0415

        return nvcomp
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None


class NvcompApiError(RuntimeError):
    pass


def make_codec(nvcomp, algorithm, stream):
    try:
        return nvcomp.Codec(algorithm=algorithm, cuda_stream=stream.cuda_stream)
    except TypeError:
        pass
    try:
        return nvcomp.Codec(algorithm=algorithm)
    except Exception as e:  # noqa: BLE001
        raise NvcompApiError(
            f"nvcomp.Codec(algorithm={algorithm!r}) failed: {e} "
            f"(nvcomp {getattr(nvcomp, '__version__', '?')}; expected the 6.x Python API)"
        ) from e


def as_array(nvcomp, t):
    try:
        return nvcomp.as_array(t)
    except Exception as e:  # noqa: BLE001
        raise NvcompApiError(f"nvcomp.as_array(torch tensor) failed: {e}") from e


def nbytes(arr):
    for attr in ("buffer_size", "nbytes"):
        v = getattr(arr, attr, None)
        if isinstance(v, int):
            return v
    try:
        return int(arr.size) * int(arr.item_size)
    except Exception as e:  # noqa: BLE001
        raise NvcompApiError(f"cannot size an nvcomp.Array: {e}") from e


def decoder(codec, enc, out):
    """A zero-argument decode of `enc` (into `out` when the API takes it) and whether it does."""
    try:
        codec.decode(enc, out=out)
        return (lambda: codec.decode(enc, out=out)), True
    except Exception:  # noqa: BLE001 - no `out=` in this API version: decode allocates
        return (lambda: codec.decode(enc)), False


class Prepared:
    """One algorithm's compressed KV: the whole tile, and 16 MiB pieces for pacing."""

    def __init__(self, nvcomp, torch, algorithm, data, stream, pieces):
        self.algorithm = algorithm
        self.codec = make_codec(nvcomp, algorithm, stream)
        with torch.cuda.stream(stream):
            self.out = torch.empty_like(data)
            try:
                self.enc = self.codec.encode(as_array(nvcomp, data))
            except Exception as e:  # noqa: BLE001
                raise NvcompApiError(f"{algorithm}: encode failed: {e}") from e
            self.in_bytes = data.numel()
            self.enc_bytes = nbytes(self.enc)
            self.run, into_out = decoder(self.codec, self.enc, as_array(nvcomp, self.out))
            torch.cuda.synchronize()
            if into_out:
                got = self.out
            else:
                got = torch.as_tensor(self.codec.decode(self.enc), device="cuda")
                torch.cuda.synchronize()
            if not torch.equal(got.view(torch.uint8).reshape(-1)[: data.numel()], data):
                raise NvcompApiError(f"{algorithm}: decoded bytes differ from the input")
            self.pieces = []
            if pieces:
                for off in range(0, data.numel(), PACE_PIECE_BYTES):
                    part = data[off : off + PACE_PIECE_BYTES]
                    enc = self.codec.encode(as_array(nvcomp, part))
                    out = as_array(nvcomp, self.out[off : off + PACE_PIECE_BYTES])
                    run, _ = decoder(self.codec, enc, out)
                    self.pieces.append((nbytes(enc), part.numel(), run))
            torch.cuda.synchronize()


def nvcomp_alone(nvcomp, torch, data, algorithm, seconds=2.0):
    """Ratio and decompression GB/s (output bytes) of one algorithm, alone on the card."""
    stream = torch.cuda.Stream()
    p = Prepared(nvcomp, torch, algorithm, data, stream, pieces=False)
    for _ in range(3):
        p.run()
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            p.run()
        n += 8
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    return {
        "ratio": p.in_bytes / p.enc_bytes,
        "in_gbps": n * p.enc_bytes / secs / 1e9,
        "out_gbps": n * p.in_bytes / secs / 1e9,
    }


def nvcomp_worker(args):
    """The second tenant: decompress flat out or paced for `--seconds`, then print JSON."""
    import torch

    torch.cuda.set_device(args.device)
    nvcomp = nvcomp_module()
    if nvcomp is None:
        die(NVCOMP_SKIP)
    tensors, _, _ = read_kv(args.kv)
    data = tiled_on_gpu(codes8(tensors), torch)
    stream = torch.cuda.Stream()
    paced = args.rate_gbps is not None
    p = Prepared(nvcomp, torch, args.worker_algorithm, data, stream, pieces=paced)
    print("nvcomp: ready", file=sys.stderr, flush=True)
    in_b = out_b = 0
    t0 = time.perf_counter()
    if args.rate_gbps is None:
        while time.perf_counter() - t0 < args.seconds:
            for _ in range(4):
                p.run()
            in_b += 4 * p.enc_bytes
            out_b += 4 * p.in_bytes
            torch.cuda.synchronize()
    else:
        # Token bucket over the compressed bytes, one piece per decode, as kvfetcher-bench gpu load.
        rate = args.rate_gbps * 1e9 / 8.0
        tokens, last, i = 0.0, 0.0, 0
        while True:
            now = time.perf_counter() - t0
            if now >= args.seconds:
                break
            cost, size, run = p.pieces[i % len(p.pieces)]
            tokens = min(tokens + (now - last) * rate, float(cost)) - cost
            last = now
            if tokens < 0:
                wait = -tokens / rate
                if now + wait >= args.seconds:
                    break
                time.sleep(wait)
            run()
            torch.cuda.synchronize()
            in_b += cost
            out_b += size
            i += 1
    secs = time.perf_counter() - t0
    print(json.dumps({"in_gbps": in_b / secs / 1e9, "out_gbps": out_b / secs / 1e9}), flush=True)


# ---------------------------------------------------------------- GEMM


# SM clock (MHz) and board power (W) averaged over the last GEMM window, sampled through NVML
# between batches (None where NVML is unavailable): a decoder that slows the GEMM without
# taking its SMs does it through the card's power budget, which shows as a lower clock.
LAST_WINDOW = {"mhz": None, "watts": None}


def nvml_sample(torch):
    try:
        return float(torch.cuda.clock_rate()), float(torch.cuda.power_draw()) / 1000.0
    except Exception:  # noqa: BLE001 - pynvml missing or unsupported: no clock column
        return None


def gemm_tflops(torch, seconds):
    """Mean TFLOP/s of back-to-back bf16 8192^3 GEMMs: batches of 10 timed with CUDA events."""
    n = GEMM_N
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    flops = 2.0 * n * n * n
    rates, samples = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            torch.matmul(a, b, out=c)
        e.record()
        sample = nvml_sample(torch)  # while the batch runs
        e.synchronize()
        rates.append(10 * flops / (s.elapsed_time(e) / 1e3) / 1e12)
        if sample:
            samples.append(sample)
    LAST_WINDOW["mhz"] = sum(m for m, _ in samples) / len(samples) if samples else None
    LAST_WINDOW["watts"] = sum(w for _, w in samples) / len(samples) if samples else None
    return sum(rates) / len(rates)


# ---------------------------------------------------------------- tenants


def wait_ready(proc, tag, timeout=120.0):
    """Reads the tenant's stderr until its "<tag>: ready" line; returns the lines read."""
    lines = []
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip())
        if line.startswith(f"{tag}: ready"):
            return lines
    proc.kill()
    out, err = proc.communicate()
    raise RuntimeError(f"{tag} never became ready: {' | '.join(lines)} {err.strip()} {out.strip()}")


def with_tenant(torch, cmd, tag, seconds, parse):
    """GEMM TFLOP/s while `cmd` runs; `parse(stdout)` gives the tenant's (in, out) GB/s."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        ready = wait_ready(proc, tag)
        say(f"  {ready[-1]}")
        time.sleep(1.0)  # let the tenant reach steady state
        tflops = gemm_tflops(torch, seconds)
        out, err = proc.communicate(timeout=seconds + 120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} exited {proc.returncode}: {err.strip()[-500:]}")
    rates = parse(out)
    say(f"  {out.strip().splitlines()[-1] if out.strip() else '(no output)'}")
    return tflops, rates


def measure(rows, torch, label, cmd, tag, seconds, parse):
    """Appends the row of GEMM next to tenant `cmd`; a failure is reported as the row."""
    say(f"{label}:")
    try:
        t, (i, o) = with_tenant(torch, cmd, tag, seconds, parse)
        rows.append((label, t, i, o, "", dict(LAST_WINDOW)))
    except Exception as e:  # noqa: BLE001 - report the row, keep measuring
        say(f"  failed: {e}")
        rows.append((label, None, None, None, f"failed: {e}", {}))


def parse_load(out):
    m = re.search(r"in ([0-9.]+) GB/s bitstream, out ([0-9.]+) GB/s samples", out)
    if not m:
        raise RuntimeError(f"unexpected kvfetcher-bench gpu load output: {out.strip()!r}")
    return float(m.group(1)), float(m.group(2))


def parse_worker(out):
    d = json.loads(out.strip().splitlines()[-1])
    return d["in_gbps"], d["out_gbps"]


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(
        description="bf16 GEMM TFLOP/s alone and next to NVDEC (kvfetcher-bench gpu load) or nvCOMP "
        "decompressing the same real KV, flat out and paced to a link rate."
    )
    ap.add_argument("--bin", default=".carry/kvfetcher-bench", help="the kvfetcher-bench binary")
    ap.add_argument(
        "--kv", default=".carry/codelm-kv-a-4l.safetensors", help="real KV (safetensors)"
    )
    ap.add_argument("--fixtures", default=".carry/fixtures", help="kvfetcher-bench gpu fixtures output")
    ap.add_argument("--seconds", type=float, default=10.0, help="GEMM window per setting")
    ap.add_argument("--rate-gbps", type=float, default=10.0, help="link pace, Gbit/s compressed")
    ap.add_argument("--sessions", type=int, default=None, help="NVDEC sessions [engine count]")
    ap.add_argument("--stream", default="444-8", help="NVDEC fixture stream (chroma-bits)")
    ap.add_argument("--device", type=int, default=0, help="CUDA device ordinal")
    ap.add_argument("--nvdec-frames", default="copy",
                    help="comma-separated frame handlings of the NVDEC load (copy: the real "
                         "path; map: map and unmap only; none: never mapped), one pair of rows "
                         "each")
    ap.add_argument("--nvdec-qp", default="lossless",
                    help="comma-separated fixtures the NVDEC tenant decodes: lossless, or a "
                         "constant QP of a lossy fixture (kvfetcher-bench gpu fixtures --qp N); "
                         "one pair of rows each")
    ap.add_argument("--tenants", default="nvdec,nvcomp,rans",
                    help="comma-separated second tenants to measure: nvdec, nvcomp, rans")
    ap.add_argument("--worker-algorithm", help=argparse.SUPPRESS)
    ap.add_argument("--worker-rate", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker_algorithm:
        args.rate_gbps = args.worker_rate
        return nvcomp_worker(args)
    qps = args.nvdec_qp.split(",")
    for q in qps:
        if q != "lossless" and not (q.isdigit() and 1 <= int(q) <= 51):
            die(f"--nvdec-qp: {q!r} is neither lossless nor a QP in 1..51")

    try:
        import torch
    except ImportError:
        die("torch is not installed")
    if not torch.cuda.is_available():
        die("torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    torch.cuda.set_device(args.device)
    tenants = set(args.tenants.split(","))
    if not tenants <= {"nvdec", "nvcomp", "rans"}:
        die(f"--tenants: unknown {sorted(tenants - {'nvdec', 'nvcomp', 'rans'})}")
    needed = (args.bin, args.kv) + ((args.fixtures,) if "nvdec" in tenants else ())
    for p in needed:
        if not os.path.exists(p):
            die(f"{p}: not found")
    say(f"device: {torch.cuda.get_device_name()} "
        f"(torch {torch.__version__}, cuda {torch.version.cuda})")
    say(f"GEMM: bf16 {GEMM_N}x{GEMM_N}x{GEMM_N}, {args.seconds} s per setting, "
        "mean of 10-GEMM batches")

    rows = []  # (setting, tflops or None, in, out, note)

    # (a) alone
    alone = gemm_tflops(torch, args.seconds)
    say(f"(a) alone: {alone:.1f} TFLOP/s")
    rows.append(("alone", alone, None, None, "", dict(LAST_WINDOW)))

    # (b), (c) NVDEC
    margin = args.seconds + 3.0  # ready -> 1 s settle -> warm-up -> window, with slack
    load = [args.bin, "gpu", "load", "--device", str(args.device), "--kv", args.kv,
            "--fixtures", args.fixtures, "--seconds", str(margin), "--stream", args.stream]
    if args.sessions:
        load += ["--sessions", str(args.sessions)]
    settings = []
    for q in qps if "nvdec" in tenants else []:
        for frames in args.nvdec_frames.split(","):
            tag = "" if frames == "copy" else f" (frames: {frames})"
            tag += "" if q == "lossless" else f" (lossy QP {q})"
            fr = ["--frames", frames] + ([] if q == "lossless" else ["--qp", q])
            settings += [
                (f"NVDEC flat out{tag}", fr),
                (f"NVDEC at {args.rate_gbps:g} Gbit/s{tag}",
                 fr + ["--rate-gbps", str(args.rate_gbps)]),
            ]
    for label, extra in settings:
        measure(rows, torch, label, load + extra, "load", args.seconds, parse_load)

    # nvCOMP alone: ratio and speed of each algorithm on the 8-bit codes and the raw KV
    nvcomp = nvcomp_module() if "nvcomp" in tenants else None
    nv_labels = [] if "nvcomp" not in tenants else [
        "nvCOMP ANS flat out",
        f"nvCOMP ANS at {args.rate_gbps:g} Gbit/s",
    ]
    if nvcomp is None and nv_labels:
        say(f"nvCOMP: {NVCOMP_SKIP}")
        for label in nv_labels:
            rows.append((label, None, None, None, NVCOMP_SKIP, {}))
    elif nvcomp is not None:
        say(f"nvCOMP {getattr(nvcomp, '__version__', '?')}: ratio and decompression alone")
        tensors, raw, dtype = read_kv(args.kv)
        datasets = [
            ("8-bit codes", codes8(tensors)),
            (f"raw KV ({dtype.lower()})", raw),
        ]
        say("| algorithm | data | MiB | ratio | vs fp16 | decomp in GB/s | decomp out GB/s |")
        say("|---|---|---|---|---|---|---|")
        for name, host in datasets:
            data = tiled_on_gpu(host, torch)
            # fp16 bytes per input byte: codes are 1 byte per value, raw KV 2 (f16/bf16) or 4.
            per_fp16 = 2.0 if name == "8-bit codes" else (0.5 if dtype == "F32" else 1.0)
            for alg in ALGORITHMS:
                try:
                    r = nvcomp_alone(nvcomp, torch, data, alg)
                    vs16 = r["ratio"] * per_fp16
                    say(f"| {alg} | {name} | {data.numel() / 2**20:.0f} | {r['ratio']:.3f}x | "
                        f"{vs16:.2f}x | {r['in_gbps']:.1f} | {r['out_gbps']:.1f} |")
                except Exception as e:  # noqa: BLE001
                    say(f"| {alg} | {name} | {data.numel() / 2**20:.0f} | failed: {e} | | | |")
            del data
            torch.cuda.empty_cache()
        worker = [sys.executable, os.path.abspath(__file__), "--kv", args.kv,
                  "--device", str(args.device), "--seconds", str(margin),
                  "--worker-algorithm", "ANS"]
        for label, extra in zip(nv_labels, ([], ["--worker-rate", str(args.rate_gbps)])):
            measure(rows, torch, label, worker + extra, "nvcomp", args.seconds, parse_worker)

    # (f), (g) the transform route's kernels, through the daemon's own code
    rans = [args.bin, "gpu", "transform-load", "--seconds", str(margin)]
    rans_rows = [
        ("rans kernels flat out", []),
        (f"rans kernels at {args.rate_gbps:g} Gbit/s", ["--rate-gbps", str(args.rate_gbps)]),
    ] if "rans" in tenants else []
    for label, extra in rans_rows:
        measure(rows, torch, label, rans + extra, "load", args.seconds, parse_load)

    say("")
    say(f"interference table ({torch.cuda.get_device_name()}, GEMM bf16 {GEMM_N}^3, "
        f"{args.seconds:g} s each; decoder in = compressed bytes consumed, out = bytes written):")
    say("| setting | GEMM TFLOP/s | vs alone | decoder in GB/s | decoder out GB/s | SM MHz | W |")
    say("|---|---|---|---|---|---|---|")
    for label, t, i, o, note, clocks in rows:
        if t is None:
            say(f"| {label} | {note} | | | | | |")
            continue
        vs = "-" if label == "alone" else f"{100.0 * (t / alone - 1.0):+.1f}%"
        fi = "-" if i is None else f"{i:.3f}"
        fo = "-" if o is None else f"{o:.3f}"
        mhz = "-" if clocks.get("mhz") is None else f"{clocks['mhz']:.0f}"
        watts = "-" if clocks.get("watts") is None else f"{clocks['watts']:.0f}"
        say(f"| {label} | {t:.1f} | {vs} | {fi} | {fo} | {mhz} | {watts} |")
    return 0 if all(r[1] is not None or r[4] == NVCOMP_SKIP for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
