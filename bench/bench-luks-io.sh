#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): read and write throughput of a LUKS-encrypted qcow2
# (what `nkpctl vm encrypt` makes: encrypt.format=luks, iter-time 10 ms,
# AES-256-XTS) vs a plain qcow2, both 256 MiB, fully allocated first, on the
# same filesystem, measured in the same invocation, runs interleaved
# (LUKS, plain, LUKS, plain …).
#
# `qemu-img bench` cannot open a LUKS image in QEMU 7.2 (it has no
# --object, so no key secret), hence two honest substitutes:
#   qemu-io   the image opened directly (--object secret + --image-opts,
#             -t none -n: O_DIRECT, native AIO); one 256 MiB write, then one
#             256 MiB read (QEMU splits it into cluster-sized requests).
#   nbd       each image exported by qemu-nbd (--cache=none --aio=native) on
#             a unix socket; `qemu-img bench` against the export: sequential
#             4 KiB and 64 KiB requests, 16 in flight, 256 MiB per run. The
#             NBD hop costs both images the same.
# Prints every sample (MiB/s), then the medians and the ratio LUKS/plain.
#   bench/bench-luks-io.sh [RUNS]      (default 5; root not needed)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/bench-lib.sh"
RUNS=${1:-5}
SIZE_MIB=256
for c in qemu-img qemu-io qemu-nbd python3; do command -v "$c" >/dev/null || bench_die "missing command: $c"; done

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/nkp-bench-luks.XXXXXX")
cleanup() {
    local f
    for f in "$dir"/*.pid; do
        [ -s "$f" ] || continue
        kill "$(cat "$f")" 2>/dev/null || true
    done
    sleep 0.2
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

umask 077
head -c 32 /dev/urandom | base64 -w0 > "$dir/key"
for i in 1 2 3 4 5; do   # QEMU 7.2's PBKDF benchmark fails now and then here ("Unable to get accurate CPU usage")
    if qemu-img create -q -f qcow2 --object "secret,id=s0,file=$dir/key" \
        -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.hash-alg=sha512 "$dir/luks.qcow2" "${SIZE_MIB}M" 2>/dev/null; then
        break
    fi
    rm -f "$dir/luks.qcow2"
    [ "$i" -lt 5 ] || bench_die "qemu-img create (LUKS) failed 5 times"
done
qemu-img create -q -f qcow2 "$dir/plain.qcow2" "${SIZE_MIB}M"
obj=(--object "secret,id=s0,file=$dir/key")
opts_luks="driver=qcow2,file.filename=$dir/luks.qcow2,encrypt.key-secret=s0"
opts_plain="driver=qcow2,file.filename=$dir/plain.qcow2"
qio() { # variant, qemu-io commands…
    local v=$1; shift
    local o; if [ "$v" = luks ]; then o=$opts_luks; else o=$opts_plain; fi
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io "${obj[@]}" --image-opts -t none -n "$o" "${args[@]}"
}
# allocate every cluster first: later runs measure steady-state overwrites and reads
qio luks "write -P 0x11 0 ${SIZE_MIB}M" >/dev/null || bench_die "qemu-io on the LUKS image failed"
qio plain "write -P 0x11 0 ${SIZE_MIB}M" >/dev/null || bench_die "qemu-io on the plain image failed"
qemu-img info "$dir/luks.qcow2" | grep -q 'encrypted: yes' || bench_die "the LUKS image is not encrypted"

# qemu-io prints "256 MiB, 1 ops; 00.52 sec (487.659 MiB/sec and …)" or "(1.506 GiB/sec …)"
mibps() { sed -n 's/.*(\([0-9.]*\) \([KMG]\)iB\/sec.*/\1 \2/p' | awk '{v=$1; if ($2=="G") v*=1024; if ($2=="K") v/=1024; printf "%.1f\n", v}'; }

nbd_bench() { # variant, size in bytes, [-w]
    local v=$1 s=$2 t; shift 2
    local n=$((SIZE_MIB * 1024 * 1024 / s))
    t=$(qemu-img bench -f raw "$@" -c "$n" -s "$s" -d 16 "nbd+unix:///?socket=$dir/$v.sock" \
        | sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p')
    [ -n "$t" ] || bench_die "qemu-img bench on the $v export failed"
    awk -v m="$SIZE_MIB" -v t="$t" 'BEGIN{printf "%.1f\n", m / t}'
}

samples="$dir/samples"
: > "$samples"
sample() { echo "$1 $2 $3" | tee -a "$samples"; }
echo "--- samples (MiB/s; $SIZE_MIB MiB per run, RUNS=$RUNS, interleaved)"
for r in $(seq 1 "$RUNS"); do
    for v in luks plain; do
        out=$(qio "$v" "write -P $((r + 32)) 0 ${SIZE_MIB}M" "read 0 ${SIZE_MIB}M") || bench_die "qemu-io $v"
        sample "$v" qemu-io-write-256M "$(grep -A1 '^wrote' <<<"$out" | tail -n1 | mibps)"
        sample "$v" qemu-io-read-256M "$(grep -A1 '^read' <<<"$out" | tail -n1 | mibps)"
    done
done
# the exports lock their image: qemu-io above runs before them
for v in luks plain; do
    if [ "$v" = luks ]; then
        qemu-nbd "${obj[@]}" --image-opts "$opts_luks" -k "$dir/$v.sock" -t --cache=none --aio=native \
            --pid-file "$dir/$v.pid" --fork || bench_die "qemu-nbd ($v)"
    else
        qemu-nbd --image-opts "$opts_plain" -k "$dir/$v.sock" -t --cache=none --aio=native \
            --pid-file "$dir/$v.pid" --fork || bench_die "qemu-nbd ($v)"
    fi
done
for r in $(seq 1 "$RUNS"); do
    for v in luks plain; do
        sample "$v" nbd-write-4k-d16 "$(nbd_bench "$v" 4096 -w)"
        sample "$v" nbd-read-4k-d16 "$(nbd_bench "$v" 4096)"
        sample "$v" nbd-write-64k-d16 "$(nbd_bench "$v" 65536 -w)"
        sample "$v" nbd-read-64k-d16 "$(nbd_bench "$v" 65536)"
    done
done
echo "--- medians (MiB/s) and ratio LUKS/plain ($(nproc) CPUs, $(qemu-img --version | head -n1 | cut -d' ' -f1-3), $(df -T "$dir" | awk 'NR==2{print $2}'), O_DIRECT)"
bench_table "$samples" plain luks
