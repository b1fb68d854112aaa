#!/usr/bin/env python3
"""TTFT of a Hugging Face transformers engine that reuses a saved prefix through the daemon
(python/examples/hf_generate.py) against a full prefill, for several prompt lengths: starts a
store and a daemon (bit-exact, python/tests' stack), saves each prompt's prefix from one
process (engine A) and fetches it in a fresh one (engine B), which then prefills only the last
--suffix tokens. Prints one JSON line per prompt and a table last.

  scripts/python-gpu-ttft.py --gguf MODEL.gguf --kvf /path/to/kvfetcher --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python/tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", required=True)
    p.add_argument("--kvf", required=True, help="the kvfetcher binary (store and daemon)")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--text", default=str(ROOT / "data/texts/declaration.txt"))
    p.add_argument("--prompts", default="512,1024,2048", help="prompt lengths in tokens")
    p.add_argument("--suffix", type=int, default=16, help="tokens after the saved prefix")
    a = p.parse_args()

    import os

    os.environ["KVF_BIN"] = a.kvf
    from conftest import start_stack  # python/tests: store + daemon on temp paths

    example = [sys.executable, str(ROOT / "python/examples/hf_generate.py"), "--gguf", a.gguf,
               "--device", a.device, "--dtype", a.dtype, "--text", a.text]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stack = start_stack(Path(tmp), bits=16, chunk_tokens=256)
        try:
            for n in [int(x) for x in a.prompts.split(",")]:
                prefix = (n - a.suffix) // 256 * 256
                run = lambda *extra: json.loads(subprocess.run(
                    example + ["--socket", stack.socket, "--tokens", str(n), *extra],
                    check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                saved = run("--save", "--prefix", str(prefix))
                got = run("--fetch", "--gen", "8")
                got.update(saved_chunks=saved["saved_chunks"])
                print(json.dumps(got), flush=True)
                rows.append(got)
        finally:
            stack.stop()
    print("| prompt | reused | fetch ms | TTFT fetch ms | TTFT prefill ms | speed-up | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['reused']} | {r['fetch_ms']:.1f} | {r['ttft_fetch_ms']:.1f} | "
              f"{r['ttft_prefill_ms']:.1f} | {r['ttft_prefill_ms'] / r['ttft_fetch_ms']:.2f}x | {r['same']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
