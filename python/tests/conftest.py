"""Fixtures: a real store and daemon (the `kvfetcher` binary) on temporary paths, on loopback.

The binary is $KVF_BIN, else target/debug/kvfetcher, else target/release/kvfetcher (build it
with `cargo build -p kvfetcher`; `make test-python` does).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def kvfetcher_bin() -> Path:
    env = os.environ.get("KVF_BIN")
    candidates = [Path(env)] if env else [ROOT / "target/debug/kvfetcher", ROOT / "target/release/kvfetcher"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    pytest.fail(f"no kvfetcher binary at {', '.join(map(str, candidates))}: run `cargo build -p kvfetcher`")


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """A store and a daemon; `socket` is the daemon's Unix socket."""

    dir: Path
    bin: Path
    socket: str
    store_addr: str
    certs: Path
    procs: List[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, tool: str = "kvfetcher") -> str:
        """Runs the kvfetcher CLI (or `tool`, e.g. kvfetcher-bench, built beside it); returns
        its stdout."""
        exe = self.bin.with_name(tool)
        r = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
        return r.stdout

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_stack(base: Path, bits: int = 16, chunk_tokens: int = 16) -> Stack:
    """Starts a store and a daemon saving with `bits` (16: bit-exact) in chunks of
    `chunk_tokens` tokens."""
    kvf = kvfetcher_bin()
    base.mkdir(parents=True, exist_ok=True)
    certs = base / "certs"
    subprocess.run([str(kvf), "store", "--dev-cert", str(certs)], check=True, capture_output=True)
    sport = free_port(socket.SOCK_DGRAM)
    mport = free_port(socket.SOCK_STREAM)
    store_log = open(base / "store.log", "wb")
    store = subprocess.Popen(
        [
                str(kvf), "store", "--listen", f"127.0.0.1:{sport}", "--data-dir", str(base / "data"),
                "--cert-dir", str(certs),
                # Loopback, one test user: no client credentials (docs/SECURITY.md).
                "--insecure-open-writes",
            ],
        stdout=store_log,
        stderr=subprocess.STDOUT,
    )
    sock = base / "kvf.sock"
    (base / "kvf.toml").write_text(
        f"""socket = "{sock}"
socket_mode = "0600"
metrics_addr = "127.0.0.1:{mport}"

[[stores]]
addr = "127.0.0.1:{sport}"
tls = "{certs}"

[save]
variant = "zstd"
bits = {bits}
chunk_tokens = {chunk_tokens}
layers_per_group = 1
workers = 1
"""
    )
    daemon_log = open(base / "daemon.log", "wb")
    daemon = subprocess.Popen(
        [str(kvf), "daemon", "--config", str(base / "kvf.toml")],
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    stack = Stack(base, kvf, str(sock), f"127.0.0.1:{sport}", certs, [store, daemon])
    deadline = time.monotonic() + 30
    while not sock.exists():
        if daemon.poll() is not None or store.poll() is not None:
            stack.stop()
            raise AssertionError(
                "daemon or store exited:\n"
                + (base / "daemon.log").read_text(errors="replace")
                + (base / "store.log").read_text(errors="replace")
            )
        if time.monotonic() > deadline:
            stack.stop()
            raise AssertionError(f"daemon socket {sock} did not appear")
        time.sleep(0.05)
    return stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """A bit-exact stack (16-token chunks) shared by the tests of a session."""
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()
    if os.environ.get("KVF_KEEP_TMP") is None:
        shutil.rmtree(s.dir, ignore_errors=True)


def skip_unless_ci(reason: str) -> None:
    """Skips with `reason` on a dev box; under CI=true a missing prerequisite fails instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)
