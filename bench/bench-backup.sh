#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): a full backup of a running nkp VM's 1 GiB disk
# (filled with data), through nkp (`nkpctl vm backup`: libvirt push mode into
# a LUKS qcow2 under the disk's DEK) vs `virtnbdbackup -l copy` (pull mode
# over NBD into plain files; -l copy is its full read without a checkpoint:
# -l full refuses a VM holding nkp's checkpoints, "Foreign checkpoint"), the same VM in the same invocation, runs
# interleaved (nkp, virtnbdbackup, nkp, …), each into a new directory then
# removed.  Prints every sample (s, and MiB/s of the disk's 1 GiB), then the
# medians and the ratio nkp/virtnbdbackup.  Figures: docs/backup.md.
#   bench/bench-backup.sh BUILD_DIR [RUNS] [SIZE_MIB]   (root; default 3, 1024)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
RUNS=${2:-3}
SIZE_MIB=${3:-1024}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
bench_need_lab
command -v virtnbdbackup >/dev/null || bench_die "virtnbdbackup is not installed"
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

lab_init || bench_die "guest build failed"
bench_host_with_p1 "$BUILD"

dom=bk
bench_data_vm "$dom" "$SIZE_MIB" Bbk
lab_virsh a start "$dom" >/dev/null || bench_die "start"
lab_wait_serial a "$dom" 'NKP-TICK 2$' 300 >/dev/null || bench_die "the VM does not run"

samples="$LAB_DIR/samples"
: > "$samples"
sample() { # variant seconds
    echo "$1 seconds $2" >> "$samples"
    echo "$1 MiB/s $(awk -v s="$2" -v m="$SIZE_MIB" 'BEGIN{printf "%.1f", m/s}')" >> "$samples"
    echo "$1: $2 s"
}
for ((r = 1; r <= RUNS; r++)); do
    out=$LAB_DIR/shared/nkp-$r
    t0=$(bench_now_ns)
    lab_exec a nkpctl vm backup "$dom" "$out" >/dev/null || bench_die "nkpctl vm backup"
    sample nkp "$(awk -v a="$t0" -v b="$(bench_now_ns)" 'BEGIN{printf "%.2f", (b-a)/1e9}')"
    rm -rf "$out"
    out=$LAB_DIR/shared/vnb-$r
    t0=$(bench_now_ns)
    lab_exec a virtnbdbackup -U qemu:///system -d "$dom" -l copy -o "$out" >/dev/null 2>"$LAB_DIR/vnb.err" \
        || bench_die "virtnbdbackup: $(tail -2 "$LAB_DIR/vnb.err")"
    sample virtnbdbackup "$(awk -v a="$t0" -v b="$(bench_now_ns)" 'BEGIN{printf "%.2f", (b-a)/1e9}')"
    rm -rf "$out"
done
echo "# full backup of a ${SIZE_MIB} MiB disk, running VM, $RUNS runs each, interleaved"
bench_table "$samples" virtnbdbackup nkp
lab_virsh a destroy "$dom" >/dev/null || true
