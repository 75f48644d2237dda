#!/bin/bash
# Integration test of the lab itself (no nkp): two lab hosts joined by a veth
# pair, each libvirtd answering over TCP and TLS (a throwaway lab CA) on its
# veth address, each with its own host TPM (swtpm); a plain guest
# (unencrypted vTPM, plain qcow2 on storage both hosts see) is live-migrated
# A→B over plain TCP and back B→A with --tls while it counts; the counter keeps increasing across both
# moves (read on the destination's own serial log) and the guest never
# reboots.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-lab-two-hosts "the lab itself: two hosts on a veth, TCP + TLS, host TPMs, live migration both ways"

export LAB_TLS=1 LAB_HOST_TPM=1
ADDR_A=10.77.0.1
ADDR_B=10.77.0.2

lab_test_init

t=$(lab_now)
lab_host_create a "$ADDR_A/24" || fail "create host a"
lab_host_create b "$ADDR_B/24" || fail "create host b"
lab_link a b "$ADDR_A" "$ADDR_B" || fail "veth link"
lab_host_start a || fail "start host a"
lab_host_start b || fail "start host b"
timing "two hosts + veth up in $(lab_since "$t") s"
lab_exec a busybox ping -c1 -W2 "$ADDR_B" >/dev/null || fail "a cannot ping b over the veth"
[ "$(lab_exec a timeout 20 virsh -q -c "qemu+tcp://$ADDR_B/system" hostname)" = b ] \
    || fail "libvirtd of b does not answer over TCP on $ADDR_B"
[ "$(lab_exec b timeout 20 virsh -q -c "qemu+tcp://$ADDR_A/system" hostname)" = a ] \
    || fail "libvirtd of a does not answer over TCP on $ADDR_A"
[ "$(lab_exec a timeout 20 virsh -q -c "qemu+tls://$ADDR_B/system" hostname)" = b ] \
    || fail "libvirtd of b does not answer over TLS on $ADDR_B"
[ "$(lab_exec b timeout 20 virsh -q -c "qemu+tls://$ADDR_A/system" hostname)" = a ] \
    || fail "libvirtd of a does not answer over TLS on $ADDR_A"
for n in a b; do
    out=$(lab_exec "$n" env TPM2TOOLS_TCTI="$LAB_HOST_TPM_TCTI" tpm2_getcap properties-fixed 2>&1) || true
    grep -q TPM2_PT_MANUFACTURER <<<"$out" || fail "host TPM of $n does not answer: $(tail -n2 <<<"$out")"
done
pass "TLS (lab CA) both ways, a host TPM in each host"
# and the machine's own network namespace has no lab address
ip -o addr 2>/dev/null | grep_q "10\.77\.0\." && fail "a lab address leaked into the machine's namespace"
pass "two hosts, veth $ADDR_A <-> $ADDR_B, libvirtd over TCP both ways"

dom=mig
disk="$LAB_DIR/shared/$dom.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
uuid=$(cat /proc/sys/kernel/random/uuid)
mark="NKPMIG$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define on a"
boot_and_write a "$dom" "$mark"
lab_wait_serial a "$dom" 'NKP-TICK 3$' 30 >/dev/null || fail "guest does not tick on a"
pass "guest running and counting on a"

last_tick() { lab_ticks "$1" "$dom" | tail -n1; }   # HOST: the last NKP-TICK number in its serial log
first_tick() { lab_ticks "$1" "$dom" | head -n1; }

migrate() { # src dst dst_addr [tls]
    local src=$1 dst=$2 daddr=$3 tls=${4:-} t before after first
    local how=(--live --unsafe --persistent --undefinesource) uri="qemu+tcp://$daddr/system"
    if [ -n "$tls" ]; then how+=(--tls); uri="qemu+tls://$daddr/system"; fi
    before=$(last_tick "$src")
    t=$(lab_now)
    lab_virsh "$src" migrate "${how[@]}" "$dom" "$uri" || fail "migrate $src -> $dst ${tls:+(TLS)}"
    timing "live migration $src -> $dst${tls:+ (TLS)}: $(lab_since "$t") s wall (virsh migrate)"
    local info
    info=$(lab_virsh "$dst" domjobinfo "$dom" --completed 2>/dev/null || true)
    if [ -n "$info" ]; then
        timing "$src -> $dst: $(grep -E 'Time elapsed:|Total downtime:' <<<"$info" | tr -s ' ' | tr '\n' ';')"
    fi
    [ "$(lab_virsh "$dst" domstate "$dom")" = running ] || fail "not running on $dst after the move"
    lab_virsh "$src" dominfo "$dom" >/dev/null 2>&1 && fail "still defined on $src after --undefinesource"
    lab_virsh "$dst" dumpxml --inactive "$dom" >/dev/null || fail "no persistent definition on $dst"
    # the counter goes on, on the destination's own log, without a reboot
    first= ; after=
    for ((i = 0; i < 100; i++)); do
        first=$(first_tick "$dst" 2>/dev/null || true)
        after=$(last_tick "$dst" 2>/dev/null || true)
        if [ -n "$first" ] && [ -n "$after" ] && [ "$after" -ge $((first + 3)) ]; then break; fi
        sleep 0.2
    done
    [ -n "$after" ] && [ "$after" -ge $((first + 3)) ] || fail "guest does not tick on $dst (first=$first last=$after)"
    [ "$first" -gt "$before" ] || fail "counter restarted on $dst: $first after $before on $src"
    tr -d '\r' < "$(lab_serial_path "$dst" "$dom")" | grep_q -E 'NKP-GUEST-UP|NKP-MARKERS-WRITTEN' \
        && fail "the guest rebooted on $dst"
    pass "live-migrated $src -> $dst${tls:+ over TLS}: counter went on ($before on $src, $first..$after on $dst)"
}

migrate a b "$ADDR_B"
# the vTPM state travelled in the stream into b's own swtpm directory
[ -e "$(lab_path b "/var/lib/libvirt/swtpm/$uuid/tpm2/tpm2-00.permall")" ] || fail "no vTPM state on b after the move"
pass "vTPM state arrived in b's own /var/lib/libvirt/swtpm"
migrate b a "$ADDR_A" tls

lab_virsh a destroy "$dom" >/dev/null || fail "destroy on a"
t=$(lab_now)
procs=$(lab_procs_snapshot a b)
[ -n "$procs" ] || fail "no processes seen in the hosts before cleanup"
lab_cleanup_all
timing "cleanup of both hosts $(lab_since "$t") s"
left=$(lab_procs_alive "$procs")
[ -z "$left" ] || fail "processes of the hosts left: $left"
grep -q " $LAB_DIR[/ ]" /proc/self/mountinfo && fail "mounts left under $LAB_DIR"
[ ! -e "$LAB_DIR" ] || [ "${LAB_KEEP:-0}" = 1 ] || fail "$LAB_DIR not removed"
pass "both hosts down: no processes, no mounts, no state"
lab_test_done
