#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): what nkp costs at VM start.  The same lab guest
# (emulated vTPM 2.0 with encrypted state + a 64 MiB LUKS qcow2, 256 MiB RAM,
# TCG) in three variants, on two lab hosts of one invocation
# (integration/lab.sh, identical configs):
#   nkp        host "nkp" (nkp installed: hook, host TPM), the VM enrolled
#              with `nkpctl vm encrypt`: each start runs the hook's prepare
#              step (unwrap the DEKs, define 2 ephemeral private secrets),
#              each stop its release step;
#   hand       host "base" (no nkp, no hook at all): the vTPM and LUKS
#              secrets defined by hand once (virsh secret-define +
#              secret-set-value, ephemeral, private), the LUKS qcow2 made by
#              hand (iter-time 10 ms, as nkp makes it) — the baseline;
#   hand+hook  the same by-hand VM on host "nkp": libvirt runs nkp's hook at
#              each step, which exits at once (not an nkp VM): the cost of
#              having a hook installed at all.
# After one warm-up start each (the first start runs swtpm_setup and writes
# the markers), RUNS starts of each, interleaved (the order rotates every
# round).  Per start: `virsh start` wall time (start → running: the
# command returns once QEMU runs the guest) and start → the guest's
# disk-marker line (it has read its vTPM NV index and its disk); each start
# is checked (both markers read back), then `virsh destroy`.  Then the
# hook's own wall time: HOOK_N prepare+release pairs run as libvirt runs
# them (bench_hook_times in bench-lib.sh), median and p95.
# Then PAUSED_N more starts of each with `virsh start --paused` (the same
# start path: hook, swtpm with its encrypted state, QEMU opening the LUKS
# disk; the vCPUs are not run, so no guest competes for the 2 CPUs and the
# samples are cheap and less noisy), interleaved, then destroy.
#   sudo bench/bench-vm-start.sh [BUILD_DIR] [RUNS] [HOOK_N] [PAUSED_N]   (default build, 6, 50, 20)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
RUNS=${2:-6}
HOOK_N=${3:-50}
PAUSED_N=${4:-20}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
source "$here/../integration/lib/guest.sh"     # the guest's marker checks (one TPM wait)
BENCH_ON_DIE=('if [ -n "${LAB_DIR:-}" ]; then { lab_dump nkp enc; lab_dump base hand; } 2>/dev/null || true; fi')
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

lab_init || bench_die "guest build failed"
LAB_HOST_TPM=1 lab_host_create nkp || bench_die "host nkp"
lab_install_nkp nkp "$BUILD"
lab_host_create base || bench_die "host base"
lab_host_start nkp && lab_host_start base || bench_die "libvirtd"
[ -x "$(lab_path nkp /etc/libvirt/hooks/qemu.d)/nkp" ] && [ -z "$(ls -A "$(lab_path base /etc/libvirt/hooks)/qemu.d")" ] \
    || bench_die "the hook must be installed on host nkp only"

VARIANTS=(nkp hand hand+hook)
host_of() { case $1 in nkp|hand+hook) echo nkp;; hand) echo base;; esac; }
dom_of() { case $1 in nkp) echo enc;; *) echo hand;; esac; }

umask 077
mark="BENCH$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
# nkp's way
head -c 24 /dev/urandom | base64 > "$LAB_DIR/pw"
lab_exec nkp nkpctl provider create p1 >/dev/null || bench_die "provider create"
lab_exec nkp nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
lab_exec nkp nkpctl provider set-default p1 >/dev/null || bench_die "set-default"
qemu-img create -q -f qcow2 "$LAB_DIR/shared/enc.qcow2" 64M
lab_guest_xml --name enc --disk "$LAB_DIR/shared/enc.qcow2" --marker "$mark" > "$LAB_DIR/enc.xml"
lab_virsh nkp define "$LAB_DIR/enc.xml" >/dev/null || bench_die "define enc"
for i in 1 2 3 4; do
    if out=$(lab_exec nkp nkpctl vm encrypt enc 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
done
# by hand, on each host (its own disk)
head -c 32 /dev/urandom > "$LAB_DIR/vtpm.key"
head -c 32 /dev/urandom | base64 -w0 > "$LAB_DIR/disk.key"
for h in base nkp; do
    disk="$LAB_DIR/shared/hand-$h.qcow2"
    lab_luks_create "$disk" 64M "$LAB_DIR/disk.key" || bench_die "LUKS qcow2"
    tpmsec=$(lab_secret_define "$h" --usage vtpm --target hand-vtpm "$LAB_DIR/vtpm.key") || bench_die "vTPM secret"
    disksec=$(lab_secret_define "$h" --usage volume --target "$disk" "$LAB_DIR/disk.key") || bench_die "disk secret"
    lab_guest_xml --name hand --disk "$disk" --marker "$mark" \
        --tpm-secret "$tpmsec" --disk-secret "$disksec" > "$LAB_DIR/hand-$h.xml"
    lab_virsh "$h" define "$LAB_DIR/hand-$h.xml" >/dev/null || bench_die "define hand on $h"
done
n_hand_secrets=$(lab_virsh nkp secret-list | grep -c . || true)

# wait_line HOST DOM REGEX SECONDS: polls the serial log every 50 ms; prints the line
wait_line() {
    local f line i; f=$(lab_serial_path "$1" "$2")
    for ((i = 0; i < $4 * 20; i++)); do
        if [ -f "$f" ] && line=$(tr -d '\r' < "$f" | grep -a -m1 -E "$3"); then echo "$line"; return 0; fi
        sleep 0.05
    done
    return 1
}
stop_vm() { # variant: destroy, then wait for "shut off" and (nkp) the release hook's secret removal
    local h d i; h=$(host_of "$1"); d=$(dom_of "$1")
    lab_virsh "$h" destroy "$d" >/dev/null || bench_die "destroy $d on $h"
    for ((i = 0; i < 150; i++)); do
        if [ "$(lab_virsh "$h" domstate "$d" | head -n1)" = "shut off" ]; then
            if [ "$h" = base ] || [ "$(lab_virsh "$h" secret-list | grep -c . || true)" = "$n_hand_secrets" ]; then return 0; fi
        fi
        sleep 0.2
    done
    bench_die "$d on $h did not stop cleanly"
}
samples="$LAB_DIR/samples"
: > "$samples"
measure() { # variant → one sample line per metric
    local v=$1 h d t0 t1 t2 line; h=$(host_of "$v"); d=$(dom_of "$v")
    rm -f "$(lab_serial_path "$h" "$d")"
    t0=$(bench_now_ns)
    lab_virsh "$h" start "$d" >/dev/null || bench_die "start $d on $h"
    t1=$(bench_now_ns)
    line=$(wait_line "$h" "$d" 'NKP-DISK-MARKER=|NKP-ERROR' 300) || bench_die "$v: no marker line"
    t2=$(bench_now_ns)
    lab_markers_read "$h" "$d" "$mark" || bench_die "$v read back: $LAB_MARKER_ERR"
    stop_vm "$v"
    echo "$v virsh_start_ms $(((t1 - t0) / 1000000))" | tee -a "$samples"
    echo "$v start_to_markers_ms $(((t2 - t0) / 1000000))" | tee -a "$samples"
}

echo "--- warm-up: first start of each (swtpm_setup, markers written; not counted)"
for v in "${VARIANTS[@]}"; do
    h=$(host_of "$v"); d=$(dom_of "$v")
    t0=$(lab_now)
    lab_virsh "$h" start "$d" >/dev/null || bench_die "first start $d on $h"
    lab_markers_written "$h" "$d" "$mark" || bench_die "$v first boot: $LAB_MARKER_ERR"
    echo "$v: first start to markers written $(lab_since "$t0") s"
    stop_vm "$v"
done

echo "--- samples ($RUNS starts each, interleaved, order rotating)"
for r in $(seq 0 $((RUNS - 1))); do
    for k in 0 1 2; do measure "${VARIANTS[$(((r + k) % 3))]}"; done
done

echo "--- samples: virsh start --paused ($PAUSED_N each, interleaved; the whole start path, vCPUs not run, so no guest load)"
measure_paused() { # variant
    local v=$1 h d t0 t1; h=$(host_of "$v"); d=$(dom_of "$v")
    t0=$(bench_now_ns)
    lab_virsh "$h" start --paused "$d" >/dev/null || bench_die "start --paused $d on $h"
    t1=$(bench_now_ns)
    [ "$(lab_virsh "$h" domstate "$d" | head -n1)" = paused ] || bench_die "$d is not paused"
    stop_vm "$v"
    echo "$v virsh_start_paused_ms $(((t1 - t0) / 1000000))" >> "$samples"
}
for r in $(seq 0 $((PAUSED_N - 1))); do
    for k in 0 1 2; do measure_paused "${VARIANTS[$(((r + k) % 3))]}"; done
done
grep ' virsh_start_paused_ms ' "$samples" | tr '\n' ';' | sed 's/;$/\n/; s/ virsh_start_paused_ms /=/g'

echo "--- the hook's own wall time on host nkp ($HOOK_N prepare+release pairs, as libvirt runs it)"
res="$LAB_DIR/hook"
bench_hook_times nkp enc "$HOOK_N" "$res" || bench_die "hook timing"
[ "$(lab_virsh nkp secret-list | grep -c . || true)" = "$n_hand_secrets" ] || bench_die "secrets left after the hook runs"
bench_dist "hook prepare, ms" "$res.prepare"
bench_dist "hook release, ms" "$res.release"
bench_dist "fork+exec of /bin/true, same argv+stdin (baseline), ms" "$res.exec"
phases=$(lab_exec nkp env NKP_HOOK_TIMING=1 /etc/libvirt/hooks/qemu.d/nkp enc prepare begin - < "$res.xml" 2>&1 >/dev/null) \
    || bench_die "hook with NKP_HOOK_TIMING: $phases"
lab_exec nkp /etc/libvirt/hooks/qemu.d/nkp enc release end - < "$res.xml" >/dev/null 2>&1 || true
echo "one prepare, the hook's own phase timer (NKP_HOOK_TIMING=1, ms since exec): ${phases#nkp: timing }"

echo "--- medians (ms) and ratios to the by-hand baseline ($RUNS booted + $PAUSED_N paused starts each; TCG, $(nproc) vCPUs, shared machine)"
bench_table "$samples" hand nkp hand+hook
