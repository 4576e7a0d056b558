#!/usr/bin/env bash
# fuzz.sh [seconds] - build the libFuzzer target tests/fuzz/fuzz_api.c (request
# -> JSON -> api_handle) with clang, ASan and UBSan, and run it.
#
# Build: every broker_core/src/*.c, http_api/src/*.c and tests/support/tmpdir.c
# is compiled with -fsanitize=fuzzer-no-link,address,undefined (the fuzzer's
# coverage instrumentation without its main) into $BUILD_FUZZ (build-fuzz/),
# the target with -fsanitize=fuzzer,address,undefined, and all of it linked
# with libmicrohttpd, jansson and pthreads into $BUILD_FUZZ/fuzz_api.
# Objects are rebuilt when their source or any project header is newer.
#
# Run: for `seconds` (default 30) over a fresh copy of tests/fuzz/corpus/ (the
# seeds stay as they are; what the run finds stays in $BUILD_FUZZ/corpus),
# with the dictionary tests/fuzz/api.dict, inputs up to 64 KiB.  A crash, a
# leak, a sanitizer report, a broken invariant (fuzz_api.c aborts) or an input
# that runs over 10 s fails the run; the input is saved under
# $BUILD_FUZZ/artifacts/ (replay: $BUILD_FUZZ/fuzz_api <file>).
#
# The stores the target opens go to a scratch folder under $FUZZ_TMPDIR
# (default /dev/shm, else $TMPDIR or /tmp), removed after the run.
#
# Prints one closing line, "fuzz: OK ..." or "fuzz: FAILED ...", and exits
# non-zero on failure.  Called by `make fuzz` and the fuzz stage of
# scripts/test.sh.  Variables: BUILD_FUZZ, FUZZ_CC (clang), JOBS (2).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
secs=${1:-30}
out=${BUILD_FUZZ:-build-fuzz}
cc=${FUZZ_CC:-clang}
njobs=${JOBS:-2}

if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs < 1)); then
    echo "usage: scripts/fuzz.sh [seconds]" >&2
    exit 2
fi
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz: FAILED: $cc not found (make deps installs clang)"
    exit 1
fi

mkdir -p "$out/obj" "$out/artifacts"
version=$(sed -nE 's/^project\(outboxd VERSION ([0-9.]+).*/\1/p' CMakeLists.txt)
# shellcheck disable=SC2207
pkg_cflags=($(pkg-config --cflags libmicrohttpd jansson))
# shellcheck disable=SC2207
pkg_libs=($(pkg-config --libs libmicrohttpd jansson))
common=(-g -O1 -std=c11 -D_GNU_SOURCE= -DOUTBOXD_VERSION="\"$version\""
        -fno-omit-frame-pointer -fno-sanitize-recover=all -Wall -Wextra
        -Ibroker_core/include -Ibroker_core/src -Ihttp_api/include -Ihttp_api/src
        -Itests/support "${pkg_cflags[@]}")
lib_san=-fsanitize=fuzzer-no-link,address,undefined
target_san=-fsanitize=fuzzer,address,undefined

# The newest header: any change to one rebuilds every object.
newest_header=$(ls -t broker_core/include/broker/*.h broker_core/src/*.h \
                    http_api/include/http_api/*.h http_api/src/*.h 2>/dev/null | head -n 1)

sources=(broker_core/src/*.c http_api/src/*.c tests/support/tmpdir.c)
stale=()
objects=()
obj_of() { local o=${1%.c}; echo "$out/obj/${o//\//_}.o"; }
for src in "${sources[@]}"; do
    obj=$(obj_of "$src")
    objects+=("$obj")
    if [[ ! -f $obj || $src -nt $obj || ( -n $newest_header && $newest_header -nt $obj ) ]]; then
        stale+=("$src")
    fi
done

echo "==> fuzz: compiling ${#stale[@]} of ${#sources[@]} sources with $cc ($out)"
compile() {
    "$cc" "${common[@]}" "$lib_san" -c "$1" -o "$(obj_of "$1")" || { rm -f "$(obj_of "$1")"; return 1; }
}
failed=0
pids=()
for src in "${stale[@]}"; do
    compile "$src" &
    pids+=($!)
    if ((${#pids[@]} >= njobs)); then
        wait "${pids[0]}" || failed=1
        pids=("${pids[@]:1}")
    fi
done
for pid in "${pids[@]}"; do
    wait "$pid" || failed=1
done
if ((failed)); then
    echo "fuzz: FAILED: compiling the sources"
    exit 1
fi
if ! "$cc" "${common[@]}" "$target_san" tests/fuzz/fuzz_api.c "${objects[@]}" \
        -o "$out/fuzz_api" "${pkg_libs[@]}" -lpthread; then
    echo "fuzz: FAILED: building $out/fuzz_api"
    exit 1
fi

# A fresh copy of the seeds each run, so runs start from the same place.
rm -rf "$out/corpus"
mkdir -p "$out/corpus"
cp tests/fuzz/corpus/* "$out/corpus/"
log="$out/fuzz.log"
# The target's stores live in a scratch folder of this run, on tmpfs when
# there is one (fdatasync costs nothing there: the fuzzer runs CPU-bound).
scratch_base=${FUZZ_TMPDIR:-/dev/shm}
[[ -d $scratch_base && -w $scratch_base ]] || scratch_base=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$scratch_base/outboxd-fuzz-run-XXXXXX")
echo "==> fuzz: $out/fuzz_api for ${secs}s over $(ls "$out/corpus" | wc -l) seeds (log: $log)"
TMPDIR=$scratch \
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} \
UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    "$out/fuzz_api" -max_total_time="$secs" -max_len=65536 -timeout=10 \
    -dict=tests/fuzz/api.dict -artifact_prefix="$out/artifacts/" \
    -print_final_stats=1 "$out/corpus" >"$log" 2>&1
rc=$?
rm -rf -- "$scratch"

stat() { sed -nE "s/^stat::$1: *([0-9]+).*/\\1/p" "$log" | tail -n 1; }
runs=$(stat number_of_executed_units)
eps=$(stat average_exec_per_sec)
rss=$(stat peak_rss_mb)
last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
corp=$(sed -nE 's/.* corp: ([0-9]+).*/\1/p' <<<"$last")

if ((rc != 0)); then
    tail -n 60 "$log"
    artifact=$(sed -nE 's/.*Test unit written to (.*)$/\1/p' "$log" | tail -n 1)
    why=$(grep -m1 -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error|invariant broken' "$log" |
          sed -E 's/^==[0-9]+==//' | cut -c1-160)
    echo "fuzz: FAILED after ${runs:-?} runs: ${why:-exit $rc}${artifact:+ (input: $artifact)}"
    exit 1
fi
echo "fuzz: OK: ${runs:-?} runs in ${secs} s (${eps:-?} exec/s), cov ${cov:-?} edges, ft ${ft:-?}, corpus ${corp:-?} inputs, peak RSS ${rss:-?} MB"
