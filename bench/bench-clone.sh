#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): `nkpctl vm clone` of a shut-off nkp VM with a
# 1 GiB disk (filled with data), new DEKs (the default: qemu-img convert
# under the clone's key + compare) vs --same-keys (the file copied as it is:
# a reflink where the filesystem can, else its data extents), the same VM
# in the same invocation, runs interleaved, each clone undefined and its
# file removed after its run.  Prints every sample (s), the filesystem of
# the lab's images, then the medians and the ratio same-keys/new-keys.
# Figures: docs/snapshots-clones.md.
#   bench/bench-clone.sh BUILD_DIR [RUNS] [SIZE_MIB]   (root; default 3, 1024)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
RUNS=${2:-3}
SIZE_MIB=${3:-1024}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

lab_init || bench_die "guest build failed"
bench_host_with_p1 "$BUILD"

dom=cl
bench_data_vm "$dom" "$SIZE_MIB" Bcl

samples="$LAB_DIR/samples"
: > "$samples"
clone_once() { # VARIANT RUN [OPTION]
    local name="c-$1-$2" file="$LAB_DIR/shared/c-$1-$2.qcow2" t0 s
    t0=$(bench_now_ns)
    lab_exec a nkpctl vm clone "$dom" "$name" --file "vda=$file" ${3:+"$3"} >/dev/null \
        || bench_die "nkpctl vm clone ${3:-}"
    s=$(awk -v a="$t0" -v b="$(bench_now_ns)" 'BEGIN{printf "%.2f", (b-a)/1e9}')
    echo "$1 seconds $s" >> "$samples"
    echo "$1: $s s"
    lab_virsh a undefine "$name" >/dev/null || bench_die "undefine $name"
    rm -f "$file"
}
for ((r = 1; r <= RUNS; r++)); do
    clone_once new-keys "$r"
    clone_once same-keys "$r" --same-keys
done
echo "# vm clone of a shut-off VM, ${SIZE_MIB} MiB disk of data, $RUNS runs each, interleaved;" \
     "images on $(stat -f -c %T "$LAB_DIR/shared")"
bench_table "$samples" new-keys same-keys
