#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): what nkp's qemu hook costs per call, against
# /bin/true run with the same argv and stdin (the cost of fork + exec + a
# stdin pipe alone).  libvirt runs the hook for every VM of the host, nkp's
# or not, ~6 times per start/stop, so the steps with nothing to do matter
# as much as the ones that work.  One lab host (integration/lab.sh) with a
# host TPM (swtpm) and nkp installed; the hook is run inside it exactly as
# libvirt runs it: argv "DOMAIN OP SUBOP -", the domain XML on a stdin pipe
# (`virsh dumpxml --inactive --security-info`), environment LC_ALL=C, PATH,
# HOME=/root, stdout to /dev/null.  Cases:
#   foreign    a domain that is not nkp's (no keysafe, no vTPM) at
#              "prepare begin": the XML is parsed, the answer is "not mine";
#   ignored    "started begin" of the nkp domain: a step nkp does nothing in;
#   prepare    "prepare begin" of the nkp domain (vTPM + LUKS disk): KDK from
#              the key cache, 2 DEKs unwrapped, 2 ephemeral private secrets
#              defined and set through libvirt;
#   release    "release end" of the nkp domain: the 2 secrets undefined;
#   miss       (MISS_N samples, after the N rounds) "prepare begin" with the
#              key cache flushed first (`nkpctl host flush-cache`, not
#              timed): the KDK is unsealed by the host TPM; release after it
#              is run untimed.
# Every timed run is followed by /bin/true with the same argv and stdin;
# the cases rotate inside one python loop in the host (no nsenter per
# sample), each timed from fork to exit status (time.perf_counter_ns
# around subprocess.run).  Prints every sample, then n, median, p95, min,
# max per case and the ratio of medians to its /bin/true runs; and the
# shared objects the process maps (LD_DEBUG=files, counted once per case).
# HOOK_B=PATH (optional): a second hook binary (e.g. one built from an older
# commit) run in the same rounds, each case right after this build's, so
# both are measured under the same load; its rows are marked "(B)".
#   sudo [HOOK_B=PATH] bench/bench-hook.sh [BUILD_DIR] [N] [MISS_N]   (default build, 50, 20)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
N=${2:-50}
MISS_N=${3:-20}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
die() {
    echo "bench-hook: $*" >&2
    if [ -n "${LAB_DIR:-}" ]; then lab_dump nkp enc 2>/dev/null || true; fi
    exit 1
}
if ! why=$(lab_check_env); then echo "bench-hook: cannot run here: $why" >&2; exit 1; fi
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || die "build first (ninja -C $BUILD)"

lab_init || die "guest build failed"
LAB_HOST_TPM=1 lab_host_create nkp || die "host nkp"
lab_install_nkp nkp "$BUILD"
lab_host_start nkp || die "libvirtd"
hook=/etc/libvirt/hooks/qemu.d/nkp
[ -x "$(lab_path nkp "$hook")" ] || die "the hook is not installed"
hook_b=""
if [ -n "${HOOK_B:-}" ]; then # beside qemu.d/, so libvirt never runs it
    hook_b=/etc/libvirt/hooks/nkp-b
    install -m 0755 "$HOOK_B" "$(lab_path nkp "$hook_b")" || die "HOOK_B"
fi

umask 077
head -c 24 /dev/urandom | base64 > "$LAB_DIR/pw"
lab_exec nkp nkpctl provider create p1 >/dev/null || die "provider create"
lab_exec nkp nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || die "backup"
lab_exec nkp nkpctl provider set-default p1 >/dev/null || die "set-default"
qemu-img create -q -f qcow2 "$LAB_DIR/shared/enc.qcow2" 64M
lab_guest_xml --name enc --disk "$LAB_DIR/shared/enc.qcow2" > "$LAB_DIR/enc-def.xml"
lab_virsh nkp define "$LAB_DIR/enc-def.xml" >/dev/null || die "define enc"
for i in 1 2 3 4; do
    if out=$(lab_exec nkp nkpctl vm encrypt enc 2>&1); then break; fi
    grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || die "vm encrypt: $out"
done
qemu-img create -q -f qcow2 "$LAB_DIR/shared/plain.qcow2" 64M
lab_guest_xml --name plain --disk "$LAB_DIR/shared/plain.qcow2" --no-tpm > "$LAB_DIR/plain-def.xml"
lab_virsh nkp define "$LAB_DIR/plain-def.xml" >/dev/null || die "define plain"
lab_virsh nkp dumpxml --inactive --security-info enc > "$LAB_DIR/enc.xml" || die "dumpxml enc"
lab_virsh nkp dumpxml --inactive --security-info plain > "$LAB_DIR/plain.xml" || die "dumpxml plain"
grep -q "nkp:keysafe\|keysafe" "$LAB_DIR/enc.xml" || die "enc carries no keysafe"
n_secrets=$(lab_virsh nkp secret-list | grep -c . || true)

echo "--- shared objects mapped by the hook (LD_DEBUG=files: each file the loader opens, at start or by dlopen)"
count_objects() { # HOOK DOM OP SUBOP XML
    lab_exec nkp env -i LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LD_DEBUG=files \
        "$1" "$2" "$3" "$4" - < "$5" 2>&1 >/dev/null | grep -o 'file=[^ ]*' | sort -u | wc -l
}
for h in "$hook" $hook_b; do
    b=""; [ "$h" = "$hook" ] || b=" (B)"
    echo "foreign$b (plain prepare begin): $(count_objects "$h" plain prepare begin "$LAB_DIR/plain.xml")"
    echo "ignored$b (enc started begin):   $(count_objects "$h" enc started begin "$LAB_DIR/enc.xml")"
    echo "prepare$b (enc prepare begin):   $(count_objects "$h" enc prepare begin "$LAB_DIR/enc.xml")"
    echo "release$b (enc release end):     $(count_objects "$h" enc release end "$LAB_DIR/enc.xml")"
done
echo "/bin/true:                     $(lab_exec nkp env LD_DEBUG=files /bin/true 2>&1 | grep -o 'file=[^ ]*' | sort -u | wc -l)"
[ "$(lab_virsh nkp secret-list | grep -c . || true)" = "$n_secrets" ] || die "secrets left after release"

echo "--- samples: $N rounds of foreign, ignored, prepare, release (each + /bin/true), then $MISS_N cache misses"
res="$LAB_DIR/res"
lab_exec nkp python3 - "$hook" "$LAB_DIR" "$N" "$MISS_N" "$res" $hook_b <<'PY' || die "hook timing"
import subprocess, sys, time
hook, d, n, miss_n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
hooks = [("", hook)] + [(" (B)", b) for b in sys.argv[6:]]
xml = {k: open("%s/%s.xml" % (d, k), "rb").read() for k in ("enc", "plain")}
env = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
cases = [  # name, domain (its XML on stdin), op, subop
    ("foreign", "plain", "prepare", "begin"),
    ("ignored", "enc", "started", "begin"),
    ("prepare", "enc", "prepare", "begin"),
    ("release", "enc", "release", "end"),
]
def run(prog, dom, op, subop):
    argv = [prog, dom, op, subop, "-"]
    t = time.perf_counter_ns()
    p = subprocess.run(argv, input=xml[dom], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter_ns() - t) / 1e6
    if p.returncode != 0:
        sys.exit("%s failed (%d): %s" % (" ".join(argv), p.returncode, p.stderr.decode(errors="replace").strip()))
    return dt
res = {}
def sample(name, dom, op, subop):
    for label, h in hooks:
        res.setdefault(name + label, []).append(run(h, dom, op, subop))
        res.setdefault(name + label + ".true", []).append(run("/bin/true", dom, op, subop))
for i in range(n):
    for c in cases:
        sample(*c)
for i in range(miss_n):
    for label, h in hooks:
        subprocess.run(["nkpctl", "host", "flush-cache"], check=True, stdout=subprocess.DEVNULL)
        res.setdefault("miss" + label, []).append(run(h, "enc", "prepare", "begin"))
        res.setdefault("miss" + label + ".true", []).append(run("/bin/true", "enc", "prepare", "begin"))
        run(h, "enc", "release", "end")
for k, v in res.items():
    print("%s: %s" % (k, " ".join("%.2f" % x for x in v)))
    with open("%s.%s" % (out, k), "w") as f:
        f.write("".join("%.3f\n" % x for x in v))
PY
[ "$(lab_virsh nkp secret-list | grep -c . || true)" = "$n_secrets" ] || die "secrets left after the samples"

echo "--- the hook's own phase timer (NKP_HOOK_TIMING=1, ms since main; libvirt is loaded inside 'connected' when it is dlopened), 5 prepares"
for h in "$hook" $hook_b; do
    for i in 1 2 3 4 5; do
        b=""; [ "$h" = "$hook" ] || b=" (B)"
        phases=$(lab_exec nkp env -i LC_ALL=C PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root NKP_HOOK_TIMING=1 \
            "$h" enc prepare begin - < "$LAB_DIR/enc.xml" 2>&1 >/dev/null) || die "prepare with NKP_HOOK_TIMING: $phases"
        lab_exec nkp "$h" enc release end - < "$LAB_DIR/enc.xml" >/dev/null 2>&1 || true
        echo "prepare$b:${phases#nkp: timing}"
    done
done

echo "--- per case: the hook, then /bin/true with the same argv and stdin (ms)"
for c in foreign ignored prepare release miss; do
    for b in "" " (B)"; do
        [ -s "$res.$c$b" ] || continue
        bench_dist "$c$b: hook" "$res.$c$b"
        bench_dist "$c$b: /bin/true" "$res.$c$b.true"
    done
done
echo "--- medians and p95 (ms), ratio of medians hook / /bin/true ($(nproc) vCPUs, load $(cut -d' ' -f1-3 /proc/loadavg))"
python3 - "$res" <<'PY'
import math, os, statistics, sys
def stats(path):
    xs = sorted(float(l) for l in open(path) if l.strip())
    return statistics.median(xs), xs[max(0, math.ceil(0.95 * len(xs)) - 1)], len(xs)
print("%-12s %4s %10s %10s %12s %12s %7s" % ("case", "n", "median", "p95", "true median", "true p95", "ratio"))
for c in ("foreign", "ignored", "prepare", "release", "miss"):
    for b in ("", " (B)"):
        p = "%s.%s%s" % (sys.argv[1], c, b)
        if not os.path.exists(p):
            continue
        m, p95, n = stats(p)
        tm, tp95, _ = stats(p + ".true")
        print("%-12s %4d %10.2f %10.2f %12.2f %12.2f %7.2f" % (c + b, n, m, p95, tm, tp95, m / tm))
PY
