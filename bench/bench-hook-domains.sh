#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): does nkp's hook slow down with many domains?  The
# hook never enumerates domains (it reads the XML libvirt hands it and talks
# to the secret driver only), so its prepare time must stay flat.
#
# One lab host (integration/lab.sh) with nkp and a host TPM; one nkp VM
# (vTPM + LUKS qcow2, never started: the hook needs only its XML and the
# provider's key, cached after the first run).  Phases, in one invocation:
#   1     the nkp VM alone (1 defined domain)
#   1000  + 999 tiny inactive domains (16 MiB, no devices) defined
#   1'    the 999 undefined again (the same host, to see any drift)
# In each phase: HOOK_N prepare+release pairs of the hook run as libvirt
# runs it (bench_hook_times in bench-lib.sh: same argv, the XML on a stdin
# pipe, libvirt's environment, timed from fork to exit inside the host),
# and, for information, LIST_N runs of `nkpctl vm list` (which does
# enumerate every domain).  Prints median and p95 per phase and the ratios
# 1000/1 (the baseline is the median of phases 1 and 1').
#   sudo bench/bench-hook-domains.sh [BUILD_DIR] [HOOK_N] [LIST_N]   (default build, 50, 5)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
HOOK_N=${2:-50}
LIST_N=${3:-1}
BLOCKS=5
EXTRA=999
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

export LAB_HOST_TPM=1
lab_init || bench_die "guest build failed"
lab_host_create a && lab_install_nkp a "$BUILD" && lab_host_start a || bench_die "lab host"
umask 077
head -c 24 /dev/urandom | base64 > "$LAB_DIR/pw"
lab_exec a nkpctl provider create p1 >/dev/null || bench_die "provider create"
lab_exec a nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
lab_exec a nkpctl provider set-default p1 >/dev/null || bench_die "set-default"
qemu-img create -q -f qcow2 "$LAB_DIR/shared/enc.qcow2" 64M
lab_guest_xml --name enc --disk "$LAB_DIR/shared/enc.qcow2" > "$LAB_DIR/enc.xml"
lab_virsh a define "$LAB_DIR/enc.xml" >/dev/null || bench_die "define enc"
for i in 1 2 3 4; do
    if out=$(lab_exec a nkpctl vm encrypt enc 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
done

res="$LAB_DIR/res"
mkdir -p "$res"
ndom() { lab_virsh a list --all --name | grep -c . || true; }
mkdir -p "$LAB_DIR/tiny"
: > "$LAB_DIR/define.cmds"; : > "$LAB_DIR/undefine.cmds"
for i in $(seq 1 "$EXTRA"); do
    name=$(printf 'tiny%04d' "$i")
    printf "<domain type='qemu'><name>%s</name><memory unit='MiB'>16</memory><vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type></os><devices/></domain>\n" \
        "$name" > "$LAB_DIR/tiny/$name.xml"
    echo "define $LAB_DIR/tiny/$name.xml" >> "$LAB_DIR/define.cmds"
    echo "undefine $name" >> "$LAB_DIR/undefine.cmds"
done
virsh_batch() { lab_exec a timeout 900 virsh -q -c qemu:///system < "$1" >/dev/null; }
block() { # label (1 or 1000), block number
    local n i t0; n=$(ndom)
    [ "$n" = "$1" ] || bench_die "phase $1 has $n domains"
    bench_hook_times a enc "$PER_BLOCK" "$res/$1.b$2" || bench_die "hook timing ($1 domains)"
    for k in prepare release exec; do cat "$res/$1.b$2.$k" >> "$res/$1.$k"; done
    for ((i = 0; i < LIST_N; i++)); do
        t0=$(bench_now_ns)
        lab_exec a nkpctl vm list > "$res/list-$1.out" || bench_die "nkpctl vm list"
        awk -v a="$t0" -v b="$(bench_now_ns)" 'BEGIN{printf "%.1f\n", (b - a) / 1e6}' >> "$res/$1.list"
    done
    [ -z "$(lab_virsh a secret-list)" ] || bench_die "secrets left after the hook runs"
}

bench_hook_times a enc 3 "$res/warmup" || bench_die "hook warm-up"   # unseal once: the key is cached afterwards
PER_BLOCK=$(((HOOK_N + BLOCKS - 1) / BLOCKS))
echo "--- $BLOCKS blocks of (1 domain, $PER_BLOCK hook pairs + $LIST_N vm list) then (1000 domains, the same)"
for b in $(seq 1 "$BLOCKS"); do
    block 1 "$b"
    t0=$(lab_now)
    virsh_batch "$LAB_DIR/define.cmds" || bench_die "defining $EXTRA domains"
    t_def=$(lab_since "$t0")
    block $((EXTRA + 1)) "$b"
    t0=$(lab_now)
    virsh_batch "$LAB_DIR/undefine.cmds" || bench_die "undefining $EXTRA domains"
    echo "block $b done ($EXTRA tiny domains defined in $t_def s, undefined in $(lab_since "$t0") s, one virsh session each)"
done
[ "$(grep -c . "$res/list-1000.out")" -ge 1000 ] || bench_die "nkpctl vm list did not list 1000 domains"
for n in 1 1000; do
    bench_dist "hook prepare ($n domains), ms" "$res/$n.prepare"
    bench_dist "hook release ($n domains), ms" "$res/$n.release"
    bench_dist "fork+exec of /bin/true, same argv+stdin ($n domains), ms" "$res/$n.exec"
    bench_dist "nkpctl vm list ($n domains, via nsenter), ms" "$res/$n.list"
done

echo "--- summary (TCG lab, $(nproc) vCPUs, shared machine; hook timed inside the host from fork to exit)"
python3 - "$res" <<'PY'
import math, statistics, sys
r = sys.argv[1]
def load(p): return sorted(float(l) for l in open(p) if l.strip())
def p95(xs): return xs[max(0, math.ceil(0.95 * len(xs)) - 1)]
for what in ("prepare", "release", "list"):
    one = load(r + "/1." + what)
    many = load(r + "/1000." + what)
    m1, mk = statistics.median(one), statistics.median(many)
    name = {"prepare": "hook prepare", "release": "hook release", "list": "nkpctl vm list"}[what]
    print("%-15s 1 domain: median %7.1f ms, p95 %7.1f | 1000 domains: median %7.1f ms, p95 %7.1f | ratio of medians 1000/1: %.2f"
          % (name, m1, p95(one), mk, p95(many), mk / m1))
PY
