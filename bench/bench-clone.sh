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
lab_host_up a || bench_die "host a"
lab_install_nkp a "$BUILD"
umask 077
printf 'bench password\n' > "$LAB_DIR/pw"
lab_exec a nkpctl provider create p1 >/dev/null || bench_die "provider create"
lab_exec a nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
lab_exec a nkpctl provider set-default p1 >/dev/null || bench_die "set-default"

dom=cl
disk=$LAB_DIR/shared/$dom.qcow2
qemu-img create -q -f qcow2 "$disk" "${SIZE_MIB}M"
# data in every cluster past the guest's marker sector (nothing to skip)
qemu-io -f qcow2 -c "write -P 0x5a 1M $((SIZE_MIB - 1))M" "$disk" >/dev/null || bench_die "qemu-io"
lab_guest_xml --name "$dom" --disk "$disk" --marker Bcl > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || bench_die "define"
for i in 1 2 3 4; do
    if out=$(lab_exec a nkpctl vm encrypt "$dom" 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
done

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
