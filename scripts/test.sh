#!/usr/bin/env bash
# test.sh [stage...] - run outboxd's test stages and print one closing summary.
#
# Stages (default: all four, in this order):
#   release  ctest over every test in $BUILD (already built by `make build`)
#   asan     Debug + ASan/UBSan build in $BUILD_ASAN, tests labelled "unit"
#   tsan     Debug + TSan build in $BUILD_TSAN, tests labelled "tsan"
#   fuzz     scripts/fuzz.sh ${FUZZ_SECONDS:-30}: the libFuzzer target over
#            the HTTP request handler; counts as one test in the summary
#
# Every stage runs even if an earlier one failed, so one run shows all
# failures; the exit status is non-zero if any stage failed.  Called by
# `make test`, `make test-asan` and `make test-tsan` (`make fuzz` runs
# scripts/fuzz.sh directly, longer).
set -uo pipefail

BUILD=${BUILD:-build}
BUILD_ASAN=${BUILD_ASAN:-build-asan}
BUILD_TSAN=${BUILD_TSAN:-build-tsan}
JOBS=${JOBS:-2}

stages=("$@")
((${#stages[@]})) || stages=(release asan tsan fuzz)

passed=0 failed=0 skipped=0
report=()        # one line per stage
bad_stages=()    # stages that failed, with the step

# run_ctest STAGE DIR CTEST-ARGS... : run ctest, tally its closing counts.
run_ctest() {
    local stage=$1 dir=$2
    shift 2
    local log rc summary total fail skip
    log=$(mktemp)
    echo "==> $stage: ctest --test-dir $dir --output-on-failure -j$JOBS $*"
    ctest --test-dir "$dir" --output-on-failure -j"$JOBS" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    # "100% tests passed, 0 tests failed out of 7"; skipped and disabled tests
    # are counted among "passed" by ctest and listed under "did not run".
    summary=$(grep -E '^[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
    if [[ $summary =~ ([0-9]+)\ tests?\ failed\ out\ of\ ([0-9]+) ]]; then
        fail=${BASH_REMATCH[1]}
        total=${BASH_REMATCH[2]}
    else
        fail=0
        total=0
    fi
    skip=$(grep -cE '^[[:space:]]+[0-9]+ - .* \((Skipped|Disabled)\)$' "$log" || true)
    rm -f "$log"
    passed=$((passed + total - fail - skip))
    failed=$((failed + fail))
    skipped=$((skipped + skip))
    report+=("$stage: $((total - fail - skip)) passed, $fail failed, $skip skipped (ctest exit $rc)")
    if ((rc != 0)); then
        bad_stages+=("$stage (ctest)")
    fi
}

# configure_build STAGE DIR CMAKE-ARGS... : configure and build a sanitizer tree.
configure_build() {
    local stage=$1 dir=$2
    shift 2
    echo "==> $stage: configure $dir"
    if ! cmake -S . -B "$dir" "$@"; then
        report+=("$stage: configure failed")
        bad_stages+=("$stage (configure)")
        return 1
    fi
    echo "==> $stage: build $dir"
    if ! cmake --build "$dir" -j"$JOBS"; then
        report+=("$stage: build failed")
        bad_stages+=("$stage (build)")
        return 1
    fi
}

# run_fuzz SECONDS : scripts/fuzz.sh, tallied as one test.
run_fuzz() {
    local log rc line
    log=$(mktemp)
    echo "==> fuzz: scripts/fuzz.sh $1"
    bash scripts/fuzz.sh "$1" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    line=$(grep -E '^fuzz: (OK|FAILED)' "$log" | tail -n 1)
    rm -f "$log"
    if ((rc == 0)); then
        passed=$((passed + 1))
        report+=("fuzz: 1 passed, 0 failed (${line:-no summary})")
    else
        failed=$((failed + 1))
        report+=("fuzz: 0 passed, 1 failed (${line:-fuzz.sh exit $rc})")
        bad_stages+=("fuzz")
    fi
}

for stage in "${stages[@]}"; do
    case $stage in
    release)
        run_ctest release "$BUILD" --no-tests=error
        ;;
    asan)
        configure_build asan "$BUILD_ASAN" -DCMAKE_BUILD_TYPE=Debug \
            -DOUTBOXD_SANITIZE=ON -DOUTBOXD_TSAN=OFF -DBUILD_TESTING=ON \
            -DOUTBOXD_BENCH=OFF -DOUTBOXD_EXAMPLES=OFF &&
            run_ctest asan "$BUILD_ASAN" -L '^unit$'
        ;;
    tsan)
        configure_build tsan "$BUILD_TSAN" -DCMAKE_BUILD_TYPE=Debug \
            -DOUTBOXD_SANITIZE=OFF -DOUTBOXD_TSAN=ON -DBUILD_TESTING=ON \
            -DOUTBOXD_BENCH=OFF -DOUTBOXD_EXAMPLES=OFF &&
            run_ctest tsan "$BUILD_TSAN" -L '^tsan$' --no-tests=ignore
        ;;
    fuzz)
        run_fuzz "${FUZZ_SECONDS:-30}"
        ;;
    *)
        echo "test.sh: unknown stage '$stage' (release, asan, tsan, fuzz)" >&2
        exit 2
        ;;
    esac
done

echo
echo "==> test stages"
for line in "${report[@]}"; do
    echo "    $line"
done
echo "summary: $passed passed, $failed failed, $skipped skipped"
if ((${#bad_stages[@]})); then
    echo "FAILED: ${bad_stages[*]}"
    exit 1
fi
