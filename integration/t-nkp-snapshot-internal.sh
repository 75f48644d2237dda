#!/bin/bash
# Internal and plain snapshots of an nkp VM fail closed (issue 16,
# docs/snapshots-clones.md "Internal snapshots"), lab host a, the real guest:
#   every disk nkp encrypts carries snapshot='no', so libvirt 9.0 refuses,
#   before anything is written, `virsh snapshot-create-as VM S` (internal:
#   it crashed QEMU 7.2 on a running LUKS qcow2), `--disk-only` (a plain
#   overlay) and virt-manager's snapshot XML, shut off and running; the
#   running VM keeps running and reads its markers; no file appears in the
#   images directory and none holds the marker in clear; `nkpctl vm
#   snapshot` still works (explicit per-disk snapshot='external', LUKS),
#   live and offline, and the VM boots through its chain; nkpd puts the
#   attribute back on an nkp definition that lacks it (written before nkp
#   set it); a memory snapshot (--memspec) is alarmed (vm-clear-save);
#   one made while nkpd was stopped is alarmed by nkpd's start scan, once
#   (a restart after the alarm was cleared raises nothing), and one into a
#   directory the host key protects (nkpctl host protect) is not;
#   `vm decrypt` removes it.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-snapshot-internal "internal and plain snapshots of nkp VMs refused by libvirt (snapshot='no')" \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd --needs qemu-img
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
luks() { qemu-img info -U "$1" 2>/dev/null | grep_q 'encrypted: yes'; }
in_clear() { grep -a -c "$1" "${@:2}" | awk -F: '{s+=$NF} END{print s+0}'; }
disk_attr() { # DOM [--inactive]: the <disk …> line of vda's disk
    lab_virsh a dumpxml "${@:2}" "$1" | grep "<disk type='file' device='disk'" | head -n1
}
images() { (cd "$LAB_DIR/shared" && ls -A | sort | tr '\n' ' '); }

clear_save_alarm() { # FILE: the vm-clear-save alarm naming FILE, polled up to 30 s
    local i alarm
    for ((i = 0; i < 150; i++)); do # bounds a hang, measures nothing
        alarm=$(nk alarms 2>/dev/null | grep -F vm-clear-save | grep -F -- "$1" || true)
        [ -n "$alarm" ] && break
        sleep 0.2
    done
    echo "$alarm"
}

lab_test_init
# /var/lib/libvirt on fscrypt: a memory snapshot into a protected directory must not alarm
LAB_FSCRYPT_LIBVIRT=1 lab_host_with_p1 a
out=$(nk host protect 2>&1) || fail "host protect: $out"
OFFER=/var/lib/libvirt/qemu/nkp-saves

new_vm() { # NAME MARK
    local disk="$LAB_DIR/shared/$1.qcow2"
    qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
    lab_guest_xml --name "$1" --disk "$disk" --marker "$2" > "$LAB_DIR/$1.xml"
    lab_virsh a define "$LAB_DIR/$1.xml" >/dev/null || fail "define $1"
    lab_vm_encrypt a "$1"
}
# virt-manager's snapshot button (virtManager/details/snapshots.py, virtinst
# DomainSnapshot): a <domainsnapshot> with a name and a description, no
# per-disk mode, snapshotCreateXML with no flag
vmgr_snapshot() { # DOM NAME
    printf '<domainsnapshot><name>%s</name><description>virt-manager</description></domainsnapshot>\n' \
        "$2" > "$LAB_DIR/vmgr-$2.xml"
    lab_virsh a snapshot-create "$1" "$LAB_DIR/vmgr-$2.xml"
}
refused() { # WHAT EXPECTED-LINE COMMAND…: fails with that libvirt line, nothing new in the images dir
    local what=$1 want=$2 before err
    shift 2
    before=$(images)
    err=$("$@" 2>&1) && fail "$what was not refused"
    grep -qF "$want" <<<"$err" || fail "$what: $err (want: $want)"
    [ "$(images)" = "$before" ] || fail "$what left files: $(images) (before: $before)"
    echo "# $what: $err"
}

dom=g1
mark="NKPINT$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base="$LAB_DIR/shared/g1.qcow2"
new_vm g1 "$mark"
mark2="NKPINTB$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
new_vm g2 "$mark2"
disk_attr g1 --inactive | grep_q "snapshot='no'" || fail "vm encrypt did not set snapshot='no': $(disk_attr g1 --inactive)"
pass "vm encrypt writes the encrypted disk with snapshot='no'"

# ---- shut off ----------------------------------------------------------------------
nothing="unsupported configuration: nothing selected for snapshot"
refused "internal snapshot, shut off" "$nothing" lab_virsh a snapshot-create-as g1 i0
refused "plain disk-only snapshot, shut off" "$nothing" lab_virsh a snapshot-create-as g1 d0 --disk-only
refused "virt-manager's snapshot, shut off" "$nothing" vmgr_snapshot g1 v0
[ -z "$(lab_virsh a snapshot-list g1 --name | tr -d '\n')" ] || fail "a snapshot was recorded"
pass "shut off: internal, plain disk-only and virt-manager snapshots refused by libvirt, nothing written"

# ---- running ------------------------------------------------------------------------
boot_and_write a g1 "$mark"
all="unsupported configuration: internal and full system snapshots require all disks to be selected for snapshot"
refused "internal snapshot, running" "$all" lab_virsh a snapshot-create-as g1 i1
refused "plain disk-only snapshot, running" "$nothing" lab_virsh a snapshot-create-as g1 d1 --disk-only --atomic
refused "virt-manager's snapshot, running" "$all" vmgr_snapshot g1 v1
[ "$(lab_domstate a g1)" = running ] || fail "g1 is $(lab_domstate a g1) after the refused snapshots"
[ -z "$(lab_virsh a snapshot-list g1 --name | tr -d '\n')" ] || fail "a snapshot was recorded"
pass "running: internal, plain disk-only and virt-manager snapshots refused by libvirt, the VM still runs"

# ---- nkp's own snapshots still work ---------------------------------------------------
out=$(nk vm snapshot g1 s1 2>&1) || fail "vm snapshot (live): $out"
echo "# $out"
luks "$LAB_DIR/shared/g1.s1" || fail "the live overlay is not LUKS"
[ "$(lab_domstate a g1)" = running ] || fail "g1 is $(lab_domstate a g1) after vm snapshot"
disk_attr g1 | grep_q "snapshot='no'" || fail "the running definition lost snapshot='no': $(disk_attr g1)"
refused "internal snapshot over nkp's overlay, running" "$all" lab_virsh a snapshot-create-as g1 i2
lab_virsh a destroy g1 >/dev/null
lab_wait_domstate a g1 "shut off" 30 || fail "not shut off"
out=$(nk vm snapshot g1 s2 2>&1) || fail "vm snapshot (offline): $out"
luks "$LAB_DIR/shared/g1.s2" || fail "the offline overlay is not LUKS"
disk_attr g1 --inactive | grep_q "snapshot='no'" || fail "the definition lost snapshot='no': $(disk_attr g1 --inactive)"
refused "internal snapshot over nkp's overlays, shut off" "$nothing" lab_virsh a snapshot-create-as g1 i3
boot_and_read a g1 "$mark"
[ "$(lab_virsh a snapshot-list g1 --name | tr -d '\n ')" = s1s2 ] || fail "snapshots: $(lab_virsh a snapshot-list g1 --name)"
pass "nkpctl vm snapshot works (live and offline, LUKS, snapshot='no' kept); the VM boots through the chain with its markers"

files=("$LAB_DIR"/shared/*)
[ "$(in_clear "$mark" "${files[@]}")" = 0 ] || fail "the marker is in clear in: $(grep -a -l "$mark" "${files[@]}")"
pass "no file in the images directory holds the marker in clear (${#files[@]} files: $(images))"

# ---- an nkp definition without the attribute (written before nkp set it) -------------
dom=g2
lab_virsh a dumpxml --inactive g2 | sed "s/ snapshot='no'//" > "$LAB_DIR/g2-old.xml"
nkpd_start
lab_at_exit nkpd_stop
lab_virsh a define "$LAB_DIR/g2-old.xml" >/dev/null || fail "define g2 without snapshot='no'"
# polled up to 10 s (bounds a hang, measures nothing)
for ((i = 0; i < 50; i++)); do
    disk_attr g2 --inactive | grep_q "snapshot='no'" && break
    sleep 0.2
done
disk_attr g2 --inactive | grep_q "snapshot='no'" || fail "nkpd did not set snapshot='no' on g2: $(disk_attr g2 --inactive)"
grep_q "VM 'g2': snapshot='no' set on 1 encrypted disk" "$LAB_DIR/nkpd.log" || fail "nkpd did not log it"
refused "internal snapshot of g2 after nkpd's fix" "$nothing" lab_virsh a snapshot-create-as g2 i4
boot_and_write a g2 "$mark2"
refused "internal snapshot of the running g2" "$all" lab_virsh a snapshot-create-as g2 i5
pass "nkpd sets snapshot='no' on an nkp definition that lacks it; internal snapshots of it refused"

# a memory snapshot (--memspec, no disk) writes the guest's memory in clear,
# like virsh save: libvirt sends no event for it, nkpd's alarm names the file
# (seen while QEMU writes it, or, when the job was over before any look, in
# the snapshot's metadata once libvirt writes the status XML at its end)
ms="$LAB_DIR/shared/g2.mem"
lab_virsh a snapshot-create-as g2 m1 --memspec "file=$ms,snapshot=external" >/dev/null \
    || fail "virsh snapshot-create-as --memspec"
alarm=$(clear_save_alarm "$ms")
[ -n "$alarm" ] || fail "no vm-clear-save alarm naming $ms: $(nk alarms 2>&1)"
echo "# $alarm"
[ "$(in_clear "$mark2" "$ms")" -gt 0 ] || fail "control: the memory file holds no marker (the search finds nothing?)"
[ "$(lab_domstate a g2)" = running ] || fail "g2 is $(lab_domstate a g2) after the memory snapshot"
lab_virsh a snapshot-delete g2 m1 --metadata >/dev/null || fail "snapshot-delete m1"
rm -f "$ms"
nk alarms clear vm-clear-save >/dev/null
pass "a memory snapshot (--memspec) of a running nkp VM: vm-clear-save alarm naming the file"

# memory snapshots made while nkpd was not running: the start scan alarms the
# one in clear (by snapshot name and file) and records it; the one into a
# protected directory is not alarmed
scans() { grep -c "memory snapshots of nkp VMs checked" "$LAB_DIR/nkpd.log" || true; }
record() { lab_exec a cat /var/lib/nkp/memory-snapshots 2>/dev/null || true; }
nkpd_stop
msp="$OFFER/g2-protected.mem"
ms2="$LAB_DIR/shared/g2-offline.mem"
lab_virsh a snapshot-create-as g2 m3 --memspec "file=$msp,snapshot=external" >/dev/null \
    || fail "virsh snapshot-create-as --memspec into $OFFER"
lab_virsh a snapshot-create-as g2 m2 --memspec "file=$ms2,snapshot=external" >/dev/null \
    || fail "virsh snapshot-create-as --memspec, nkpd stopped"
[ "$(in_clear "$mark2" "$ms2")" -gt 0 ] || fail "control: the memory file holds no marker"
lab_exec a test -s "$msp" || fail "control: libvirt wrote no $msp"
nkpd_start
alarm=$(clear_save_alarm "$ms2")
[ -n "$alarm" ] || fail "nkpd's start scan raised no vm-clear-save naming $ms2: $(nk alarms 2>&1)"
echo "# $alarm"
grep_q -F "Snapshot 'm2' of VM 'g2'" <<<"$alarm" || fail "the alarm does not name snapshot m2: $alarm"
nk alarms 2>/dev/null | grep_q -F -- "$msp" && fail "a memory snapshot into $OFFER was alarmed: $(nk alarms 2>&1)"
grep_q " m2\$" <<<"$(record)" || fail "m2 not in the record: $(record)"
grep_q " m3\$" <<<"$(record)" && fail "m3 (protected) in the record: $(record)"
pass "a memory snapshot made while nkpd was stopped: alarmed by its start scan with the file; one into $OFFER not"

nk alarms clear vm-clear-save >/dev/null
before=$(scans)
nkpd_stop
nkpd_start
for ((i = 0; i < 150; i++)); do # polled up to 30 s (bounds a hang, measures nothing)
    [ "$(scans)" -gt "$before" ] && break
    sleep 0.2
done
[ "$(scans)" -gt "$before" ] || fail "nkpd did not log its start scan"
nk alarms 2>/dev/null | grep_q vm-clear-save && fail "raised again after a restart: $(nk alarms 2>&1)"
lab_virsh a snapshot-delete g2 m2 --metadata >/dev/null || fail "snapshot-delete m2"
lab_virsh a snapshot-delete g2 m3 --metadata >/dev/null || fail "snapshot-delete m3"
rm -f "$ms2"
lab_exec a rm -f "$msp"
pass "cleared, then nkpd restarted: the recorded memory snapshot is not alarmed again"
lab_virsh a destroy g2 >/dev/null
lab_wait_domstate a g2 "shut off" 30 || fail "g2 not shut off"

out=$(nk vm decrypt g2 2>&1) || fail "vm decrypt: $out"
sleep 1 # nkpd sees the define (it must leave a plain VM alone)
disk_attr g2 --inactive | grep_q "snapshot=" && fail "vm decrypt left the snapshot attribute: $(disk_attr g2 --inactive)"
boot_and_read a g2 "$mark2"
pass "vm decrypt removes snapshot='no' (libvirt's default again); the plain VM boots with its markers"

lab_test_done
