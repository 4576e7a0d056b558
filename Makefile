# outboxd - front door.  Everything a newcomer (or CI) runs goes through here.
#
#   make deps    install the Debian packages the project needs (scripts/deps.sh)
#   make build   Release build in $(BUILD)
#   make test    build, run every test, then the ASan/UBSan, TSan and fuzz stages
#   make fuzz    build the libFuzzer target (clang, ASan+UBSan) in build-fuzz/ and
#                fuzz the HTTP request handler for $(FUZZ_SECONDS) s (scripts/fuzz.sh)
#   make crash   build, then the full crash explorations (store, transactions, delays, groups)
#   make bench   build, then run every benchmark program
#   make demo    build, then run examples/http_demo.sh (outboxd over HTTP with
#                curl), examples/order_demo.sh (the order service against a
#                throwaway PostgreSQL: check-backs, payment timeout, inbox,
#                relay), then examples/storage_demo, txn_demo and group_demo,
#                each in its own temporary directory
#   make clean   remove every build tree
#
# Variables: BUILD (build), BUILD_ASAN (build-asan), BUILD_TSAN (build-tsan),
# BUILD_FUZZ (build-fuzz), JOBS (2), FUZZ_SECONDS (600 for make fuzz; the fuzz
# stage of make test runs 30 s unless FUZZ_SECONDS is set).

BUILD      ?= build
BUILD_ASAN ?= build-asan
BUILD_TSAN ?= build-tsan
BUILD_FUZZ ?= build-fuzz
JOBS       ?= 2
FUZZ_SECONDS ?= 600

SHELL := /bin/bash
MAKEFLAGS += --no-print-directory
export BUILD BUILD_ASAN BUILD_TSAN BUILD_FUZZ JOBS

.PHONY: all deps configure build test test-release test-asan test-tsan fuzz crash bench demo clean

all: build

deps:
	bash scripts/deps.sh

configure: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DOUTBOXD_SANITIZE=OFF -DOUTBOXD_TSAN=OFF

build: configure
	cmake --build $(BUILD) -j$(JOBS)

# All stages, one closing summary line; non-zero exit if any stage failed.
test: build
	bash scripts/test.sh release asan tsan fuzz

# Single stages, for local use.
test-release: build
	bash scripts/test.sh release

test-asan: deps
	bash scripts/test.sh asan

test-tsan: deps
	bash scripts/test.sh tsan

# A long libFuzzer run over the HTTP request handler (make test runs 30 s).
fuzz: deps
	bash scripts/fuzz.sh $(FUZZ_SECONDS)

# The full crash explorations (make test runs 20000 store, 40000 transaction,
# 3000 delay and 80000 group states; this 200000, 200000, 50000 and 400000).
crash: build
	BRK_CRASH_STATES=$${BRK_CRASH_STATES:-200000} $(BUILD)/tests/broker_core/test_crash
	BRK_TXN_CRASH_STATES=$${BRK_TXN_CRASH_STATES:-200000} $(BUILD)/tests/broker_core/test_txn_crash
	BRK_DELAY_CRASH_STATES=$${BRK_DELAY_CRASH_STATES:-50000} $(BUILD)/tests/broker_core/test_delay
	BRK_GROUP_CRASH_STATES=$${BRK_GROUP_CRASH_STATES:-400000} $(BUILD)/tests/broker_core/test_group_crash

# Each program runs from a fresh temporary directory (its working directory,
# also $$TMPDIR) that is removed afterwards, and prints its own figures.
bench: build
	@set -euo pipefail; \
	list="$(BUILD)/bench/programs.txt"; \
	if [[ ! -s "$$list" ]]; then echo "bench: no benchmark programs (bench/*.c with a main)"; exit 0; fi; \
	while read -r prog; do \
	    dir=$$(mktemp -d); \
	    echo "==> bench: $$(basename "$$prog")"; \
	    (cd "$$dir" && TMPDIR="$$dir" "$$prog") || { rc=$$?; rm -rf "$$dir"; exit $$rc; }; \
	    rm -rf "$$dir"; \
	done < "$$list"

# First the daemon walk-through (http_demo.sh starts outboxd itself, in its
# own temporary folder), then the order-service walk-through with PostgreSQL
# (order_demo.sh starts its own PostgreSQL and outboxd); then each library
# demo (storage_demo, txn_demo, group_demo) gets its own fresh temporary
# directory as its only argument; all must pass.
DEMOS := storage_demo txn_demo group_demo

demo: build
	@set -euo pipefail; \
	echo "==> demo: examples/http_demo.sh"; \
	bash examples/http_demo.sh "$(BUILD)/sidecar/outboxd"; \
	echo "==> demo: examples/order_demo.sh"; \
	bash examples/order_demo.sh "$(BUILD)/sidecar/outboxd"; \
	for name in $(DEMOS); do \
	    prog=$$(grep -E "/$$name\$$" "$(BUILD)/examples/programs.txt" 2>/dev/null || true); \
	    if [[ -z "$$prog" ]]; then echo "demo: $$name is not built (examples/$$name.c missing, or OUTBOXD_EXAMPLES=OFF)" >&2; exit 1; fi; \
	    dir=$$(mktemp -d); \
	    echo "==> demo: $$prog $$dir"; \
	    "$$prog" "$$dir" || { rc=$$?; rm -rf "$$dir"; exit $$rc; }; \
	    rm -rf "$$dir"; \
	done

clean:
	rm -rf -- $(BUILD) $(BUILD_ASAN) $(BUILD_TSAN) $(BUILD_FUZZ)
