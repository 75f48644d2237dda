#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Runs every libFuzzer target built in build-fuzz/tests/fuzz for
# $NKP_FUZZ_SECONDS seconds each (default 30), on a throwaway copy of its seed
# corpus (tests/fuzz/corpus/<name>/), so the corpus in the repository is
# never rewritten.  Configures build-fuzz (clang, ASan+UBSan) when missing
# and re-configures it otherwise, so new targets are picked up.
#
# stdout: one line per target, "PASS fuzz-x (N runs)" or "FAIL fuzz-x";
# everything else (build output, crash reports) goes to stderr.  The
# fuzzer's own log and any crashing input stay in build-fuzz/fuzz-out/<name>/.
# Exit status: non-zero when any target failed or nothing could be built.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${NKP_FUZZ_SECONDS:-30}
builddir=build-fuzz

# -fsanitize=fuzzer-no-link instruments libnkp itself for coverage; without
# it libFuzzer sees only the target file and mutates blind.
options=(-Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false
         -Dc_args=-fsanitize=fuzzer-no-link)
if [ -d "$builddir" ]; then
        meson setup --reconfigure "$builddir" "${options[@]}" >&2 || { echo "FAIL fuzz-build"; exit 1; }
else
        CC=clang meson setup "$builddir" "${options[@]}" >&2 || { echo "FAIL fuzz-build"; exit 1; }
fi
ninja -C "$builddir" >&2 || { echo "FAIL fuzz-build"; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/nkp-fuzz-XXXXXX")
trap 'rm -rf "$work"' EXIT

# Undefined behaviour is a failure, not a warning.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:abort_on_error=1:print_stacktrace=1}

failed=0
ran=0
for bin in $(find "$builddir/tests/fuzz" -maxdepth 1 -type f -name 'fuzz-*' -perm -u+x | sort); do
        name=$(basename "$bin")
        out="$builddir/fuzz-out/$name"
        rm -rf "$out"
        mkdir -p "$out" "$work/$name"
        [ -d "tests/fuzz/corpus/$name" ] && cp -R "tests/fuzz/corpus/$name/." "$work/$name/"
        dict=()
        [ -f "tests/fuzz/$name.dict" ] && dict=(-dict="tests/fuzz/$name.dict")

        "$bin" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
                -artifact_prefix="$out/" "${dict[@]}" "$work/$name" >"$out/log" 2>&1
        rc=$?
        ran=$((ran + 1))
        runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$out/log" | tail -n 1)
        [ -n "$runs" ] || runs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$out/log" | tail -n 1)
        if [ "$rc" = 0 ] && [ -n "$runs" ]; then
                echo "PASS $name ($runs runs)"
        else
                echo "FAIL $name"
                failed=1
                {
                        echo "--- $name exited with $rc; last lines of $out/log:"
                        tail -n 40 "$out/log"
                        ls "$out" | grep -v '^log$' | sed "s|^|crashing input: $out/|"
                } >&2
        fi
done

if [ "$ran" = 0 ]; then
        echo "no fuzz targets found in $builddir/tests/fuzz" >&2
        echo "FAIL fuzz-none"
        exit 1
fi
exit "$failed"
