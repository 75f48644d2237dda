#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): shallow rekey of N running VMs on one lab host
# (integration/lab.sh), for N = 1, 10, 100 (as many as the machine allows).
# Each VM is a real domain with an nkp-encrypted vTPM (swtpm running) and a
# live keysafe, started --paused: the rekey touches only the keysafes in the
# live and persistent definitions, so guest CPU is irrelevant and paused
# guests keep 2 TCG vCPUs free for the measurement.  Per N:
#   - `nkpctl vm rekey --all` (alternating between providers p1 and p2),
#     RUNS times: wall time / N = time per VM;
#   - single-VM `nkpctl vm rekey VM --provider …` on up to 20 VMs: wall time
#     of each command (process start and libvirt connection included).
# Every command runs through nsenter into the lab host.  Prints each sample,
# then medians.  Stops adding VMs when MemAvailable would drop below 2 GiB
# and says so.  The lab's EXIT trap stops and removes everything it started.
#   sudo bench/bench-rekey-shallow.sh [BUILD_DIR] [COUNTS] [RUNS]
#   (default: build, "1 10 100", 5)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BUILD=$(cd "${1:-build}" && pwd)
COUNTS=${2:-1 10 100}
RUNS=${3:-5}
source "$here/../integration/lab.sh"
source "$here/bench-lib.sh"
bench_need_lab
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || bench_die "build first (ninja -C $BUILD)"

BATCH=8          # VMs started at once
VM_MEM_MIB=64    # guest RAM (paused: mostly untouched)
PER_VM_KIB=$((160 * 1024)) # generous: qemu (TCG) + swtpm resident, measured ~60-90 MiB
ms_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", (b-a)*1000}'; }
median() { sort -n | awk '{a[NR]=$1} END{if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2}'; }
mem_avail_kib() { awk '/^MemAvailable:/{print $2}' /proc/meminfo; }
nk() { lab_exec a nkpctl "$@"; }

lab_init || bench_die "guest build failed"
lab_host_up a || bench_die "host a did not come up"
lab_install_nkp a "$BUILD"
umask 077
printf 'bench password\n' > "$LAB_DIR/pw"
for p in p1 p2; do
    nk provider create "$p" >/dev/null || bench_die "provider create $p"
    nk provider backup "$p" --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" >/dev/null || bench_die "backup $p"
done
nk provider set-default p1 >/dev/null || bench_die "set-default"
echo "# machine: $(nproc) vCPUs, $(($(mem_avail_kib) / 1024)) MiB available, load $(cut -d' ' -f1-3 /proc/loadavg)"

running=0
# grow_to N: define, encrypt (vTPM) and start paused VMs until N run.
grow_to() {
    local want=$1 i d pids t
    t=$(lab_now)
    while [ "$running" -lt "$want" ]; do
        local batch=()
        for ((i = running + 1; i <= want && ${#batch[@]} < BATCH; i++)); do
            if [ "$(mem_avail_kib)" -lt $((2 * 1024 * 1024 + PER_VM_KIB * (${#batch[@]} + 1))) ]; then
                echo "# stopped at $running running VMs: MemAvailable $(($(mem_avail_kib) / 1024)) MiB"
                return 1
            fi
            d=$(printf 'r%03d' "$i")
            qemu-img create -q -f qcow2 "$LAB_DIR/shared/$d.qcow2" 1M
            lab_guest_xml --name "$d" --disk "$LAB_DIR/shared/$d.qcow2" --mem "$VM_MEM_MIB" > "$LAB_DIR/$d.xml"
            lab_virsh a define "$LAB_DIR/$d.xml" >/dev/null || bench_die "define $d"
            nk vm encrypt "$d" --disks= >/dev/null || bench_die "vm encrypt $d"
            batch+=("$d")
        done
        pids=()
        for d in "${batch[@]}"; do
            lab_virsh a start --paused "$d" > "$LAB_DIR/$d.start" 2>&1 &
            pids+=($!)
        done
        for i in "${!pids[@]}"; do
            wait "${pids[$i]}" || bench_die "start ${batch[$i]}: $(cat "$LAB_DIR/${batch[$i]}.start")"
        done
        running=$((running + ${#batch[@]}))
    done
    echo "# $running VMs running (paused), grown in $(lab_since "$t") s, MemAvailable $(($(mem_avail_kib) / 1024)) MiB"
}

summary=()
target=p2
for n in $COUNTS; do
    short=""
    grow_to "$n" || short=" (only $running could run)"
    [ "$running" -gt 0 ] || bench_die "no VM runs"
    n=$running
    all=()
    for ((r = 1; r <= RUNS; r++)); do
        t=$(lab_now)
        out=$(nk --json vm rekey --all --provider "$target") || bench_die "--all: $out"
        ms=$(ms_since "$t")
        ok=$(python3 -c 'import json,sys; d=json.load(sys.stdin); print(sum(v["result"]=="rekeyed" and v["running"] for v in d))' <<<"$out")
        [ "$ok" = "$n" ] || bench_die "--all rekeyed $ok of $n running VMs"
        per=$(awk -v a="$ms" -v n="$n" 'BEGIN{printf "%.1f", a/n}')
        echo "N=$n --all run $r to $target: $ms ms total, $per ms per VM"
        all+=("$per")
        if [ "$target" = p2 ]; then target=p1; else target=p2; fi
    done
    singles=()
    m=$n; [ "$m" -le 20 ] || m=20
    for ((i = 1; i <= m; i++)); do
        d=$(printf 'r%03d' "$i")
        t=$(lab_now)
        nk vm rekey "$d" --provider "$target" >/dev/null || bench_die "rekey $d"
        singles+=("$(ms_since "$t")")
    done
    echo "N=$n single rekeys ($m VMs): ${singles[*]} ms"
    for ((i = 1; i <= n; i++)); do
        d=$(printf 'r%03d' "$i")
        [ "$(lab_virsh a domstate "$d" | head -n1)" = paused ] || bench_die "$d is no longer paused/running"
    done
    med_all=$(printf '%s\n' "${all[@]}" | median)
    med_one=$(printf '%s\n' "${singles[@]}" | median)
    summary+=("N=$n$short: vm rekey --all median $med_all ms per VM ($RUNS runs); single vm rekey median $med_one ms ($m VMs)")
done

echo
echo "Shallow rekey of running VMs (vTPM encrypted, paused, TCG lab host; wall time through nsenter):"
printf '  %s\n' "${summary[@]}"
