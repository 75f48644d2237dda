#!/bin/bash
# New disks follow the VM (issue 15), one lab host with nkpd running:
#   a lab VM (vTPM + empty qcow2 vda) is defined: nkpd enrols its vTPM and
#   encrypts vda in one step (keysafe: vtpm + disk:vda); the guest writes
#   its markers;
#   an empty qcow2 attached with `virsh attach-disk --config` (VM shut off)
#   is LUKS before the next start (nkpd, its DEK in the VM's keysafe, the
#   vTPM key unchanged); the guest writes a marker on it, which is not in
#   clear in the file and is read back after stop/start;
#   the same attach while the VM runs (persistent definition only): nothing
#   is converted while it runs, `vm status` says so, and nkpd converts it
#   when the VM stops;
#   a qcow2 that already holds data (qemu-io) attached: left plain, `vm
#   status` shows plain-data and a vm-plain-disk alarm names VM and disk;
#   under [disks] policy=require the start is refused with one line naming
#   the disk and the fix, and no file changes; `vm encrypt --disks vdd`
#   fixes it (alarm cleared) and the VM starts with its markers;
#   [disks] policy=off: a new empty disk is left plain.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-disks "new disks of an nkp VM: encrypted by nkpd while empty, data disks alarmed, [disks] policy" \
    --needs python3 --needs qemu-io \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
new_mark() { echo "NKPDISKS$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
luks() { qemu-img info -U "$1" | grep_q "encrypted: yes"; }
in_clear() { [ "$(grep -a -c "$1" "$2" || true)" != 0 ]; }
disks_conf() { printf '[tpm]\ntcti=none\n[disks]\npolicy=%s\n' "$1" > "$(lab_path a /etc/nkp)/nkp.conf"; }
# disk_state TARGET: its state in `nkpctl --json vm status $dom`
disk_state() {
    nk --json vm status "$dom" | python3 -c 'import json,sys
d = json.load(sys.stdin)
print(" ".join(x["state"] for x in d["disks"] if x["target"] == sys.argv[1]))' "$1"
}
wait_luks() { # FILE SECONDS
    local i
    for ((i = 0; i < $2 * 5; i++)); do luks "$1" && return 0; sleep 0.2; done
    return 1
}
attach() { # FILE TARGET [virsh attach-disk options…]
    local f=$1 t=$2
    shift 2
    lab_virsh a attach-disk "$dom" "$f" "$t" --driver qemu --subdriver qcow2 --targetbus virtio "$@" >/dev/null ||
        fail "attach-disk $t $*"
}
boot_disk2() { # WHAT MARK CONTEXT: the guest's line for vdb must be NKP-DISK2-WHAT=MARK
    local line
    line=$(lab_wait_serial a "$dom" 'NKP-DISK2-|NKP-ERROR' 60) || fail "$3: no line for the second disk"
    [ "$line" = "NKP-DISK2-$1=$2" ] || fail "$3: the guest said '$line' (want NKP-DISK2-$1=$2)"
}

ASSERT_ON_FAIL+=('[ -z "${dom:-}" ] || { lab_virsh a dumpxml --inactive "$dom"; nk vm status "$dom"; nk alarms; } 2>&1 | sed "s/^/# state: /"')
t0=$(lab_now)
lab_test_init
lab_at_exit nkpd_stop
lab_host_create a || fail "host a"
lab_install_nkp a "$BUILD"
lab_host_start a || fail "host a did not start"
disks_conf enrol
pass "host a up ($(lab_since "$t0") s)"

umask 077
printf 'lab password disks\n' > "$LAB_DIR/pw"
nk provider create pd >/dev/null || fail "provider create"
nk provider backup pd --out "$LAB_DIR/pd.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default pd >/dev/null || fail "set-default"
nkpd_start
grep -q "\[disks\] policy=enrol" "$LAB_DIR/nkpd.log" || fail "nkpd does not log its [disks] policy"

# ---- a new VM: its vTPM and its empty vda in one step ------------------------------------------
dom=d1
mark=$(new_mark)
m2=$(new_mark)
vda=$LAB_DIR/shared/$dom.qcow2
qemu-img create -q -f qcow2 "$vda" 64M
lab_guest_xml --name "$dom" --disk "$vda" --marker "$mark" |
    sed "s|<cmdline>\([^<]*\)</cmdline>|<cmdline>\1 nkp.marker2=$m2</cmdline>|" > "$LAB_DIR/$dom.xml"
grep -q "nkp.marker2=$m2" "$LAB_DIR/$dom.xml" || fail "cannot add nkp.marker2 to the cmdline"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define $dom"
wait_luks "$vda" 60 || fail "nkpd did not encrypt the empty vda of the new VM"
for ((i = 0; i < 50; i++)); do [ "$(disk_state vda)" = encrypted ] && break; sleep 0.2; done
st=$(nk --json vm status "$dom") || fail "vm status"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="pd" and "vtpm:vtpm" in d["objects"] and "disk:vda" in d["objects"], d' <<<"$st" ||
    fail "vm status of the new VM: $st"
grep -q "new vTPM and its new empty disk(s) vda are now encrypted" "$LAB_DIR/nkpd.log" || fail "nkpd's note is missing"
vtpm_secret=$(lab_virsh a dumpxml --inactive "$dom" | grep -o "<encryption secret='[^']*'" | head -1)
[ -n "$vtpm_secret" ] || fail "no <encryption secret> on the vTPM"
boot_and_write a "$dom" "$mark" "$dom first boot"
lab_wait_serial a "$dom" 'NKP-DISK2-NONE' 30 >/dev/null || fail "the guest saw a second disk that is not there"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
pass "define of a VM with a plain vTPM and an empty vda: nkpd encrypts both at once (keysafe vtpm + disk:vda); markers written"

# ---- attach-disk --config of an empty qcow2, VM shut off ----------------------------------------
vdb=$LAB_DIR/shared/$dom-vdb.qcow2
qemu-img create -q -f qcow2 "$vdb" 64M
attach "$vdb" vdb --config
wait_luks "$vdb" 60 || fail "nkpd did not make the new empty vdb LUKS"
for ((i = 0; i < 50; i++)); do [ "$(disk_state vdb)" = encrypted ] && break; sleep 0.2; done
[ "$(disk_state vdb)" = encrypted ] || fail "vm status: vdb is $(disk_state vdb)"
lab_virsh a dumpxml --inactive "$dom" | grep_q "$vtpm_secret" || fail "the vTPM's secret changed"
st=$(nk vm status "$dom") || fail "vm status"
grep -q "^  disk vdb: encrypted: by pd (luks)" <<<"$st" || fail "vm status (human) of vdb: $st"
note "vm status: $st"
pass "attach-disk --config of an empty qcow2 (VM shut off): LUKS before the next start, its key in the VM's keysafe (vTPM key unchanged)"

boot_and_read a "$dom" "$mark" --running "$dom, with the new vdb"
boot_disk2 WRITTEN "$m2" "$dom first boot with vdb"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
! in_clear "$m2" "$vdb" || fail "the marker of vdb is in clear in its file"
luks "$vdb" || fail "vdb is not LUKS after the guest wrote to it"
boot_and_read a "$dom" "$mark" --running "$dom, stop/start"
boot_disk2 MARKER "$m2" "$dom stop/start"
pass "the guest wrote a marker on vdb; not in clear in the file; read back after stop/start"

# ---- attach-disk --config while the VM runs ----------------------------------------------------
vdc=$LAB_DIR/shared/$dom-vdc.qcow2
qemu-img create -q -f qcow2 "$vdc" 64M
attach "$vdc" vdc --config
sleep 2
luks "$vdc" && fail "vdc was converted while the VM runs"
[ "$(disk_state vdc)" = plain-empty ] || fail "vm status while running: vdc is $(disk_state vdc)"
nk vm status "$dom" | grep_q "disk vdc: plain-empty: is empty; nkpd encrypts it once the VM is shut off" ||
    fail "vm status while running: $(nk vm status "$dom")"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
wait_luks "$vdc" 60 || fail "nkpd did not encrypt vdc when the VM stopped"
pass "attach-disk --config while running: left alone while it runs (vm status says so), LUKS once the VM stopped"

# ---- a disk that holds data -----------------------------------------------------------------------
vdd=$LAB_DIR/shared/$dom-vdd.qcow2
qemu-img create -q -f qcow2 "$vdd" 64M
qemu-io -f qcow2 -c "write -P 0x5a 0 64k" "$vdd" >/dev/null || fail "qemu-io write"
# nkpd's define ends its conversion: a definition changed before that would be lost (README).
for ((i = 0; i < 100; i++)); do [ "$(disk_state vdc)" = encrypted ] && break; sleep 0.2; done
[ "$(disk_state vdc)" = encrypted ] || fail "vm status: vdc is $(disk_state vdc) after the stop"
attach "$vdd" vdd --config
for ((i = 0; i < 100; i++)); do nk alarms 2>/dev/null | grep_q "vm-plain-disk" && break; sleep 0.2; done
al=$(nk alarms) || fail "alarms"
grep -q "vm-plain-disk" <<<"$al" && grep -q "$dom:vdd" <<<"$al" || fail "no vm-plain-disk alarm for $dom:vdd: $al"
grep -q "nkpctl vm encrypt '$dom' --disks vdd" <<<"$al" || fail "the alarm does not name the fix: $al"
luks "$vdd" && fail "a disk holding data was converted automatically"
[ "$(disk_state vdd)" = plain-data ] || fail "vm status: vdd is $(disk_state vdd)"
pass "a qcow2 holding data attached: left plain, vm status plain-data, vm-plain-disk alarm naming $dom:vdd and the fix"

disks_conf require
sum_before=$(sha256sum "$vdd" "$vda" "$vdb" | sha256sum)
if err=$(lab_virsh a start "$dom" 2>&1); then fail "policy=require: a VM with a plain disk started"; fi
grep -q "disk 'vdd' is not encrypted" <<<"$err" && grep -q "policy=require" <<<"$err" &&
    grep -q "nkpctl vm encrypt '$dom' --disks vdd" <<<"$err" || fail "require line: $err"
[ "$(sha256sum "$vdd" "$vda" "$vdb" | sha256sum)" = "$sum_before" ] || fail "a refused start changed a disk"
[ "$(lab_domstate a "$dom")" = "shut off" ] || fail "not shut off after the refusal"
pass "[disks] policy=require: the start is refused with one line naming vdd and the fix; no disk changed"

lab_vm_encrypt a "$dom" --disks vdd
luks "$vdd" || fail "vdd is not LUKS after vm encrypt --disks vdd"
nk alarms | grep_q "$dom:vdd" && fail "the vm-plain-disk alarm is still there: $(nk alarms)"
boot_and_read a "$dom" "$mark" --running "$dom, policy=require after vm encrypt --disks vdd"
boot_disk2 MARKER "$m2" "$dom after vm encrypt --disks vdd"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
pass "vm encrypt --disks vdd: LUKS, alarm cleared, the VM starts under policy=require with its markers"

# ---- policy=off --------------------------------------------------------------------------------------
nkpd_stop
disks_conf off
nkpd_start
vde=$LAB_DIR/shared/$dom-vde.qcow2
qemu-img create -q -f qcow2 "$vde" 64M
attach "$vde" vde --config
sleep 3
luks "$vde" && fail "policy=off: the new disk was converted"
nk vm status "$dom" | grep_q "disk vde: plain-empty: is empty; left plain (\[disks\] policy=off)" ||
    fail "policy=off: vm status: $(nk vm status "$dom")"
pass "[disks] policy=off: a new empty disk is left plain (vm status says why)"

lab_test_done
