#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): live migration of an nkp-encrypted VM (vTPM +
# LUKS qcow2, keysafe, the hook's migrate step on every destination) vs the
# same VM unencrypted, between two lab hosts (integration/lab.sh), in the
# same run.  Both guests run all the time (same background load); their
# migrations are interleaved A→B, B→A, RUNS round trips each.  Per
# migration: `virsh migrate` wall time, and libvirt's "Time elapsed" and
# "Total downtime" (virsh domjobinfo --completed on the destination).
# Prints every sample, then median per metric and the ratio
# encrypted/plain.  Both hosts force TLS for migrations
# (migrate_tls_force = 1) and every migration uses --tls (nkp's policy).
#   sudo bench/bench-migrate.sh [BUILD_DIR] [RUNS]      (default build, 5)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
RUNS=${2:-5}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
export LAB_TLS=1 LAB_HOST_TPM=1
export LAB_QEMU_CONF_EXTRA='migrate_tls_force = 1'
addr_of() { if [ "$1" = a ]; then echo "$ADDR_A"; else echo "$ADDR_B"; fi; }

lab_init || bench_die "guest build failed"
lab_host_create a "$ADDR_A/24" && lab_host_create b "$ADDR_B/24" || bench_die "hosts"
lab_link a b "$ADDR_A" "$ADDR_B" || bench_die "veth"
lab_install_nkp a "$BUILD"; lab_install_nkp b "$BUILD"
lab_host_start a && lab_host_start b || bench_die "libvirtd"
umask 077
printf 'bench password\n' > "$LAB_DIR/pw"
lab_exec a nkpctl provider create p1 >/dev/null || bench_die "provider create"
lab_exec a nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
lab_exec a nkpctl provider set-default p1 >/dev/null || bench_die "set-default"
lab_exec b nkpctl provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "restore on b"

for dom in enc plain; do
    qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 64M
    lab_guest_xml --name "$dom" --disk "$LAB_DIR/shared/$dom.qcow2" --marker "B$dom" > "$LAB_DIR/$dom.xml"
    lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || bench_die "define $dom"
done
for i in 1 2 3 4; do
    if out=$(lab_exec a nkpctl vm encrypt enc 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
done
for dom in enc plain; do
    lab_virsh a start "$dom" >/dev/null || bench_die "start $dom"
done
for dom in enc plain; do
    lab_wait_serial a "$dom" 'NKP-TICK 2$' 300 >/dev/null || bench_die "$dom does not run"
done

samples="$LAB_DIR/samples"
: > "$samples"
migrate() { # dom src dst
    local dom=$1 src=$2 dst=$3 t0 t1 info el dt
    t0=$(date +%s%N)
    lab_virsh "$src" migrate --live --unsafe --persistent --undefinesource --tls "$dom" \
        "qemu+tls://$(addr_of "$dst")/system" || bench_die "migrate $dom $src -> $dst"
    t1=$(date +%s%N)
    info=$(lab_virsh "$dst" domjobinfo "$dom" --completed)
    el=$(sed -n 's/^Time elapsed: *\([0-9]*\) *ms$/\1/p' <<<"$info")
    dt=$(sed -n 's/^Total downtime: *\([0-9]*\) *ms$/\1/p' <<<"$info")
    [ -n "$el" ] && [ -n "$dt" ] || bench_die "no job figures from domjobinfo: $info"
    echo "$dom $src->$dst wall_ms=$(((t1 - t0) / 1000000)) elapsed_ms=$el downtime_ms=$dt" | tee -a "$samples"
}
for r in $(seq 1 "$RUNS"); do
    for dom in enc plain; do migrate "$dom" a b; done
    for dom in enc plain; do migrate "$dom" b a; done
done

# The hook's own share: its migrate step on B (checks + secrets defined),
# by hand with enc's incoming XML, then release (secrets removed).
lab_virsh a dumpxml --migratable enc > "$LAB_DIR/enc-live.xml"
hook_ms=()
for i in $(seq 1 20); do
    t0=$(date +%s%N)
    lab_exec b /etc/libvirt/hooks/qemu.d/nkp enc migrate begin - < "$LAB_DIR/enc-live.xml" || bench_die "hook migrate begin"
    hook_ms+=($((($(date +%s%N) - t0) / 1000000)))
    lab_exec b /etc/libvirt/hooks/qemu.d/nkp enc release end - < "$LAB_DIR/enc-live.xml"
done
base_ms=()
for i in $(seq 1 20); do
    t0=$(date +%s%N)
    lab_exec b true < "$LAB_DIR/enc-live.xml"
    base_ms+=($((($(date +%s%N) - t0) / 1000000)))
done
echo "hook migrate step on b (20 runs): median $(printf '%s\n' "${hook_ms[@]}" | sort -n | sed -n 10p) ms," \
     "of which nsenter + exec of a no-op: median $(printf '%s\n' "${base_ms[@]}" | sort -n | sed -n 10p) ms"

echo "--- medians over $((2 * RUNS)) migrations each (RUNS=$RUNS round trips, TCG, --tls)"
python3 - "$samples" <<'PY'
import re, statistics, sys
d = {}
for line in open(sys.argv[1]):
    f = line.split()
    for kv in f[2:]:
        k, v = kv.split("=")
        d.setdefault((f[0], k), []).append(int(v))
print("%-12s %10s %10s %7s" % ("metric", "encrypted", "plain", "ratio"))
for k in ("wall_ms", "elapsed_ms", "downtime_ms"):
    e, p = statistics.median(d[("enc", k)]), statistics.median(d[("plain", k)])
    print("%-12s %10.0f %10.0f %7.2f" % (k, e, p, e / p if p else float("nan")))
PY
for dom in enc plain; do lab_virsh a destroy "$dom" >/dev/null 2>&1 || true; done
