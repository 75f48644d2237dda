# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Helpers shared by the lab benchmarks (sourced; not a benchmark itself).

bench_now_ns() { date +%s%N; }

# bench_die TEXT: "NAME: TEXT" on stderr (NAME: the benchmark's file name),
# then the commands in BENCH_ON_DIE (log dumps), exit 1.  A benchmark prints
# figures, not test lines: one that cannot measure stops here; the lab's
# EXIT trap still ends everything it started.
BENCH_ON_DIE=()
bench_die() {
    local c
    echo "$(basename "$0" .sh): $*" >&2
    for c in "${BENCH_ON_DIE[@]}"; do eval "$c" || true; done
    exit 1
}

# bench_need_lab: stops (bench_die) with the reason when the lab cannot run here.
bench_need_lab() {
    local why
    why=$(lab_check_env) || bench_die "cannot run here: $why"
}

# bench_table SAMPLES BASE V…: SAMPLES has lines "VARIANT METRIC VALUE";
# prints, per METRIC (in order of first appearance), n and the median of
# each variant V and of BASE, and the ratio of each V's median to BASE's.
bench_table() {
    python3 - "$@" <<'PY'
import statistics, sys
path, base, vs = sys.argv[1], sys.argv[2], sys.argv[3:]
d, order = {}, []
for line in open(path):
    f = line.split()
    if len(f) != 3:
        continue
    v, m, x = f
    if m not in order:
        order.append(m)
    d.setdefault((v, m), []).append(float(x))
w = max([len(m) for m in order] + [6])
cols = vs + [base]
cw = max([len(c) for c in cols] + [9]) + 1
print("%-*s %3s" % (w, "metric", "n") + "".join("%*s" % (cw, c) for c in cols)
      + "".join("%*s" % (len(v) + len(base) + 2, v + "/" + base) for v in vs))
for m in order:
    xs = {c: d.get((c, m), []) for c in cols}
    if not all(xs.values()):
        continue
    med = {c: statistics.median(x) for c, x in xs.items()}
    print("%-*s %3d" % (w, m, min(len(x) for x in xs.values()))
          + "".join("%*.1f" % (cw, med[c]) for c in cols)
          + "".join("%*.2f" % (len(v) + len(base) + 2, med[v] / med[base] if med[base] else float("nan")) for v in vs))
PY
}

# bench_dist NAME FILE: one value per line → "NAME: n N, median M, p95 P, min, max".
bench_dist() {
    python3 - "$1" "$2" <<'PY'
import math, statistics, sys
xs = sorted(float(l) for l in open(sys.argv[2]) if l.strip())
p95 = xs[max(0, math.ceil(0.95 * len(xs)) - 1)]
print("%s: n %d, median %.1f, p95 %.1f, min %.1f, max %.1f" % (sys.argv[1], len(xs), statistics.median(xs), p95, xs[0], xs[-1]))
PY
}

# bench_hook_times HOST DOM N OUT: runs nkp's hook inside lab host HOST the
# way libvirt runs it (same argv "DOM prepare begin -" / "DOM release end -",
# the domain XML on a stdin pipe, libvirt's environment LC_ALL=C PATH=…
# HOME=/root, stdout to /dev/null), N prepare+release pairs, each timed
# from fork to exit status (python3 subprocess in the host, so no nsenter
# per sample). Interleaved with each pair: /bin/true with the same argv and
# stdin (the cost of fork+exec+pipe alone). Writes OUT.prepare, OUT.release,
# OUT.exec (ms, one per line). The XML: `virsh dumpxml --inactive
# --security-info DOM` (what libvirt formats for prepare, minus runtime ids).
bench_hook_times() {
    local host=$1 dom=$2 n=$3 out=$4
    lab_virsh "$host" dumpxml --inactive --security-info "$dom" > "$out.xml" || return 1
    lab_exec "$host" python3 - /etc/libvirt/hooks/qemu.d/nkp "$dom" "$out.xml" "$n" "$out" <<'PY'
import subprocess, sys, time
hook, dom, xmlpath, n, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
xml = open(xmlpath, "rb").read()
env = {"LC_ALL": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
def run(argv):
    t = time.perf_counter_ns()
    p = subprocess.run(argv, input=xml, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = (time.perf_counter_ns() - t) / 1e6
    if p.returncode != 0:
        sys.exit("hook %s failed (%d): %s" % (" ".join(argv[1:]), p.returncode, p.stderr.decode(errors="replace").strip()))
    return dt
res = {"prepare": [], "release": [], "exec": []}
for i in range(n):
    res["prepare"].append(run([hook, dom, "prepare", "begin", "-"]))
    res["release"].append(run([hook, dom, "release", "end", "-"]))
    res["exec"].append(run(["/bin/true", dom, "prepare", "begin", "-"]))
for k, v in res.items():
    with open(out + "." + k, "w") as f:
        f.write("".join("%.3f\n" % x for x in v))
PY
}

# bench_host_with_p1 BUILD: lab host a up with BUILD's nkp installed,
# provider p1 made, backed up ($LAB_DIR/p1.p12, password in $LAB_DIR/pw)
# and the default; umask 077.
bench_host_with_p1() {
    lab_host_up a || bench_die "host a"
    lab_install_nkp a "$1"
    umask 077
    printf 'bench password\n' > "$LAB_DIR/pw"
    lab_exec a nkpctl provider create p1 >/dev/null || bench_die "provider create"
    lab_exec a nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" \
        --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup"
    lab_exec a nkpctl provider set-default p1 >/dev/null || bench_die "set-default"
}

# bench_data_vm DOM SIZE_MIB MARKER: a shut-off nkp VM DOM on host a whose
# SIZE_MIB disk ($LAB_DIR/shared/DOM.qcow2) holds data in every cluster past
# the guest's marker sector (nothing for a copy to skip), encrypted by p1.
bench_data_vm() {
    local dom=$1 size=$2 disk=$LAB_DIR/shared/$1.qcow2 i out
    qemu-img create -q -f qcow2 "$disk" "${size}M"
    qemu-io -f qcow2 -c "write -P 0x5a 1M $((size - 1))M" "$disk" >/dev/null || bench_die "qemu-io"
    lab_guest_xml --name "$dom" --disk "$disk" --marker "$3" > "$LAB_DIR/$dom.xml"
    lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || bench_die "define"
    # TCG on a loaded host: libvirt's CPU probe can fail once
    for i in 1 2 3 4; do
        if out=$(lab_exec a nkpctl vm encrypt "$dom" 2>&1); then return 0; fi
        grep -q "Unable to get accurate CPU usage" <<<"$out" && [ "$i" -lt 4 ] || bench_die "vm encrypt: $out"
    done
}
