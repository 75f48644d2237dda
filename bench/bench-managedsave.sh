#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): what the host key costs a memory image.  One lab
# host (integration/lab.sh) with /var/lib/libvirt on a loop ext4 -O encrypt
# (LAB_FSCRYPT_LIBVIRT=1), `nkpctl host protect` (the save, dump, NVRAM,
# swtpm and nkp-saves directories under the host key), one nkp-encrypted lab
# guest (256 MiB RAM, TCG) running.  Three variants, RUNS rounds,
# interleaved (the order rotates every round):
#   managedsave  `virsh managedsave` into the protected save directory,
#                then `virsh start` (which restores the image);
#   protected    `virsh save` into /var/lib/libvirt/qemu/nkp-saves (protected),
#                then `virsh restore`: libvirt's same save/restore code;
#   plain        the same into a plain directory of the same filesystem
#                (/var/lib/libvirt/qemu/plain-saves) — the baseline.
# Per sample: the save's wall time (the VM stopped, the image written by
# libvirt), the restore's (until the VM runs again), the image's size; each
# restore is checked (the guest ticks on, it did not boot again).  Before
# the restore the image is synced and its pages dropped from the page cache
# (posix_fadvise DONTNEED on that file only): the restore reads it from the
# disk and decrypts it, as after a reboot, not the clear pages the save left
# in the cache.
#   sudo bench/bench-managedsave.sh [BUILD_DIR] [RUNS]   (default build, 5)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
RUNS=${2:-5}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
source "$here/../integration/lib/guest.sh"
BENCH_ON_DIE=('if [ -n "${LAB_DIR:-}" ]; then lab_dump a g 2>/dev/null || true; fi')
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"
# lab_markers_written calls `fail` (tests/lib/assert.sh) nowhere; keep it defined for guest.sh.
fail() { bench_die "$*"; }

lab_init || bench_die "guest build failed"
LAB_FSCRYPT_LIBVIRT=1 LAB_FSCRYPT_SIZE=2G lab_host_create a || bench_die "host a"
lab_install_nkp a "$BUILD"
lab_host_start a || bench_die "libvirtd"
nk() { lab_exec a nkpctl "$@"; }
umask 077
head -c 24 /dev/urandom | base64 > "$LAB_DIR/pw"
nk provider create p1 >/dev/null || bench_die "provider create"
nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
nk provider set-default p1 >/dev/null || bench_die "set-default"
nk host protect >/dev/null || bench_die "host protect"
PLAIN=/var/lib/libvirt/qemu/plain-saves
OFFER=/var/lib/libvirt/qemu/nkp-saves
lab_exec a mkdir -p "$PLAIN"
grep -q "^[^ ]*E" <<<"$(lab_exec a lsattr -d "$OFFER")" || bench_die "$OFFER is not encrypted"
grep -q "^[^ ]*E" <<<"$(lab_exec a lsattr -d "$PLAIN")" && bench_die "$PLAIN is encrypted"

mark="BENCH$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
qemu-img create -q -f qcow2 "$LAB_DIR/shared/g.qcow2" 64M
lab_guest_xml --name g --disk "$LAB_DIR/shared/g.qcow2" --marker "$mark" > "$LAB_DIR/g.xml"
lab_virsh a define "$LAB_DIR/g.xml" >/dev/null || bench_die "define"
for i in 1 2 3 4; do
    if out=$(nk vm encrypt g 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
done
rm -f "$(lab_serial_path a g)"
lab_virsh a start g >/dev/null || bench_die "start"
lab_markers_written a g "$mark" || bench_die "first boot: $LAB_MARKER_ERR"

last_tick() { lab_ticks a g | tail -n1; }
# wait until the guest ticks past $1 in a fresh serial log (resumed, not rebooted)
ticks_on() {
    local i t
    for ((i = 0; i < 600; i++)); do
        t=$(last_tick); [ -n "$t" ] && [ "$t" -gt "$1" ] && return 0
        sleep 0.1
    done
    bench_die "the guest does not tick on after $1 (last: ${t:-none})"
}
samples="$LAB_DIR/samples"
: > "$samples"
measure() { # variant
    local v=$1 img t0 t1 t2 t3 tick size
    case $v in
    managedsave) img=/var/lib/libvirt/qemu/save/g.save;;
    protected) img=$OFFER/g.save;;
    plain) img=$PLAIN/g.save;;
    esac
    sleep 2 # the guest ticks once more between samples
    tick=$(last_tick)
    t0=$(bench_now_ns)
    if [ "$v" = managedsave ]; then
        lab_virsh a managedsave g >/dev/null || bench_die "managedsave"
    else
        lab_virsh a save g "$img" >/dev/null || bench_die "save into $img"
    fi
    t1=$(bench_now_ns)
    size=$(lab_exec a stat -c %s "$img")
    lab_exec a python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
os.fsync(fd)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)' "$img" || bench_die "cannot drop $img from the page cache"
    rm -f "$(lab_serial_path a g)"
    t2=$(bench_now_ns)
    if [ "$v" = managedsave ]; then
        lab_virsh a start g >/dev/null || bench_die "start from the managed save"
    else
        lab_virsh a restore "$img" >/dev/null || bench_die "restore $img"
    fi
    t3=$(bench_now_ns)
    ticks_on "$tick"
    grep -q 'NKP-MARKERS-WRITTEN\|NKP-DISK-MARKER' <<<"$(lab_serial_lines a g)" && bench_die "$v: the guest booted again"
    [ "$v" = managedsave ] || lab_exec a rm -f "$img"
    echo "$v save_ms $(((t1 - t0) / 1000000))" | tee -a "$samples"
    echo "$v restore_ms $(((t3 - t2) / 1000000))" | tee -a "$samples"
    echo "$v image_MiB $((size / 1048576))" | tee -a "$samples"
}
VARIANTS=(managedsave protected plain)
for ((r = 0; r < RUNS; r++)); do
    echo "--- round $((r + 1))/$RUNS"
    for ((k = 0; k < ${#VARIANTS[@]}; k++)); do
        measure "${VARIANTS[$(((k + r) % ${#VARIANTS[@]}))]}"
    done
done
echo
echo "lab guest 256 MiB RAM ($LAB_DOMAIN_TYPE), $RUNS rounds, $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
bench_table "$samples" plain protected managedsave
