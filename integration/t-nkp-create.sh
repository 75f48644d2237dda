#!/bin/bash
# Creating VMs with a vTPM on an nkp host (issue 15), one lab host with nkpd
# and the default [vtpm] policy (enrol), /var/lib/libvirt on a loop ext4
# with the 'encrypt' feature (LAB_FSCRYPT_LIBVIRT=1):
#   before `host protect`: `virsh create` of a vTPM domain is refused with
#   the line naming `nkpctl host protect` and `nkpctl vm create` (never "in
#   a moment"); `nkpctl host protect` encrypts /var/lib/libvirt/swtpm under
#   the host key (host status: unlocked);
#   `virt-install --import --tpm emulator,model=tpm-crb` (transient start,
#   then define) succeeds, the guest writes its markers; nkpd enrols the
#   domain (keysafe + <encryption secret>); while the first run runs, the
#   vTPM state is clear at swtpm's level but the raw image of the
#   filesystem holds no marker (a control file outside the protected
#   directory is found there); stop/start: the prepare step converts the
#   state to the VM's DEK (swtpm-encrypted, no marker) and the markers are
#   read back; `vm encrypt --disks vda` adds the disk to the auto-enrolled
#   VM's keysafe (markers read back); `virsh create` of a vTPM domain starts;
#   under policy=require it is refused with the line naming `nkpctl vm
#   create`, and `nkpctl vm create --transient` starts it encrypted.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
source "$(dirname "$0")/lib/create.sh"
lab_test t-nkp-create "virt-install/virsh create of vTPM VMs: host key, nkpd enrolment, conversion at the next start" \
    --needs virt-install --needs python3 --needs mkfs.ext4 \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
nk() { lab_exec a nkpctl "$@"; }
has_keysafe() { create_has_keysafe "$1"; }
new_mark() { echo "NKPCREATE$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
state_info() { create_state_info "$@"; }
raw_count() { create_raw_count "$1"; }

create_host_up pc

# ---- before host protect: virsh create refused with the line ------------------------------
[ -n "$LAB_GUEST_KERNEL" ] || lab_guest_build
qemu-img create -q -f qcow2 "$LAB_DIR/shared/t0.qcow2" 64M
lab_guest_xml --name t0 --disk "$LAB_DIR/shared/t0.qcow2" --marker "$(new_mark)" > "$LAB_DIR/t0.xml"
if err=$(lab_virsh a create "$LAB_DIR/t0.xml" 2>&1); then fail "virsh create of a vTPM domain started with an unprotected state dir"; fi
grep -q "nkpctl host protect" <<<"$err" && grep -q "nkpctl vm create" <<<"$err" || fail "refusal line: $err"
! grep -q "in a moment" <<<"$err" || fail "the refusal promises a retry: $err"
pass "unprotected swtpm dir: virsh create refused, naming 'nkpctl host protect' and 'nkpctl vm create'"

out=$(nk host protect 2>&1) || fail "host protect: $out"
st=$(nk host status) || fail "host status"
grep -Eq "/var/lib/libvirt/swtpm +unlocked" <<<"$st" || fail "host status: $st"
pass "host protect: /var/lib/libvirt/swtpm encrypted by the host key of 'pc' (host status: unlocked)"

# A control: a marker written in clear on the same filesystem is found in the raw image.
ctl=$(new_mark)
lab_exec a sh -c "echo $ctl > /var/lib/libvirt/control.txt"
[ "$(raw_count "$ctl")" -ge 1 ] || fail "control: a clear file's content is not visible in the raw image"

# ---- virt-install --import: transient start, then define ------------------------------------
mark=$(new_mark)
dom=c1
qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 64M
rm -f "$(lab_serial_path a "$dom")"
if ! vout=$(lab_exec a timeout 300 virt-install --connect qemu:///system --name "$dom" --import \
        --virt-type qemu --machine q35 --memory 256 --vcpus 1 \
        --disk "path=$LAB_DIR/shared/$dom.qcow2,format=qcow2,bus=virtio" \
        --tpm emulator,model=tpm-crb \
        --boot "kernel=$LAB_GUEST_KERNEL,initrd=$LAB_GUEST_INITRD,kernel_args=console=ttyS0 quiet panic=-1 nkp.marker=$mark" \
        --serial "file,path=/var/log/nkp-guest/$dom.serial" --graphics none --network none \
        --osinfo detect=on,require=off --noautoconsole 2>&1); then
    fail "virt-install: $vout"
fi
lab_markers_written a "$dom" "$mark" || fail "$dom first boot: $LAB_MARKER_ERR"
pass "virt-install --import --tpm emulator succeeded; the guest wrote its markers"

for ((i = 0; i < 50; i++)); do has_keysafe "$dom" && break; sleep 0.2; done
has_keysafe "$dom" || fail "nkpd did not enrol $dom"
lab_virsh a dumpxml --inactive "$dom" | grep_q "<encryption secret=" || fail "$dom: no <encryption secret>"
for ((i = 0; i < 50; i++)); do grep -q "converted to its own key at its next start" "$LAB_DIR/nkpd.log" && break; sleep 0.2; done
grep -q "converted to its own key at its next start" "$LAB_DIR/nkpd.log" || fail "nkpd's note is missing"
uuid=$(lab_virsh a domuuid "$dom" | tr -d '[:space:]')
pass "nkpd enrolled $dom after its transient first start (keysafe, <encryption secret>)"

info=$(state_info "$uuid" "$mark") || fail "cannot read the vTPM state in the host"
[[ $info =~ ^flag=0\ marker=[1-9] ]] ||
    fail "first run: expected clear swtpm state holding the marker, got $info"
[ "$(raw_count "$mark")" = 0 ] || fail "the vTPM marker is in clear in the raw image of /var/lib/libvirt"
pass "first run: the state is clear at swtpm's level ($info) but not in the raw image (control found)"

lab_virsh a destroy "$dom" >/dev/null || fail "destroy $dom"
lab_wait_domstate a "$dom" "shut off" 30 || fail "$dom not shut off"
boot_and_read a "$dom" "$mark" "$dom, start after enrolment"
info=$(state_info "$uuid" "$mark")
[ "$info" = "flag=1 marker=0" ] || fail "after the start: state $info (want swtpm-encrypted, no marker)"
[ "$(raw_count "$mark")" = 0 ] || fail "the marker is in the raw image after the conversion"
boot_and_read a "$dom" "$mark" "$dom, stop/start"
pass "next start: state converted to the VM's DEK (swtpm-encrypted, no marker); markers survive stop/start"

# ---- vm encrypt --disks on the auto-enrolled VM ------------------------------------------------
ks_before=$(lab_virsh a dumpxml --inactive "$dom" | grep -o "<encryption secret='[^']*'" | head -1)
lab_vm_encrypt a "$dom" --disks vda
st=$(nk --json vm status "$dom") || fail "vm status $dom"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="pc" and "vtpm:vtpm" in d["objects"] and "disk:vda" in d["objects"], d' <<<"$st" ||
    fail "vm status after --disks vda: $st"
qemu-img info "$LAB_DIR/shared/$dom.qcow2" | grep_q "encrypted: yes" || fail "vda is not LUKS after vm encrypt --disks vda"
lab_virsh a dumpxml --inactive "$dom" | grep_q "$ks_before" || fail "the vTPM's secret changed"
[ "$(grep -a -c "$mark" "$LAB_DIR/shared/$dom.qcow2" || true)" = 0 ] || fail "the disk marker is in clear in the LUKS qcow2"
boot_and_read a "$dom" "$mark" "$dom, after vm encrypt --disks vda"
pass "vm encrypt --disks vda on the auto-enrolled VM: disk added to its keysafe (LUKS, same vTPM key); markers read back"

# ---- virsh create of a vTPM domain (transient) ------------------------------------------------
m2=$(new_mark)
qemu-img create -q -f qcow2 "$LAB_DIR/shared/t2.qcow2" 64M
lab_guest_xml --name t2 --disk "$LAB_DIR/shared/t2.qcow2" --marker "$m2" > "$LAB_DIR/t2.xml"
rm -f "$(lab_serial_path a t2)"
err=$(lab_virsh a create "$LAB_DIR/t2.xml" 2>&1) || fail "virsh create t2: $err"
lab_markers_written a t2 "$m2" || fail "t2: $LAB_MARKER_ERR"
[ "$(raw_count "$m2")" = 0 ] || fail "t2's vTPM marker is in the raw image"
lab_virsh a destroy t2 >/dev/null || true
pass "virsh create of a vTPM domain starts; its state is under the host key"

# ---- policy = require ----------------------------------------------------------------------------
set_policy require
qemu-img create -q -f qcow2 "$LAB_DIR/shared/t3.qcow2" 64M
lab_guest_xml --name t3 --disk "$LAB_DIR/shared/t3.qcow2" --marker "$(new_mark)" > "$LAB_DIR/t3.xml"
if err=$(lab_virsh a create "$LAB_DIR/t3.xml" 2>&1); then fail "policy=require: a plain vTPM started"; fi
grep -q "policy=require" <<<"$err" && grep -q "nkpctl vm create" <<<"$err" || fail "require line: $err"
pass "policy=require: virsh create of a plain vTPM refused, naming 'nkpctl vm create'"
m3=$(new_mark)
lab_guest_xml --name t3 --disk "$LAB_DIR/shared/t3.qcow2" --marker "$m3" > "$LAB_DIR/t3.xml"
rm -f "$(lab_serial_path a t3)"
out=$(nk vm create "$LAB_DIR/t3.xml" --transient 2>&1) || fail "vm create --transient: $out"
lab_markers_written a t3 "$m3" || fail "t3: $LAB_MARKER_ERR"
lab_virsh a dumpxml t3 | grep_q 'nkp.invalid/xmlns/keysafe' || fail "t3 runs without its keysafe"
uuid3=$(lab_virsh a domuuid t3 | tr -d '[:space:]')
[ "$(state_info "$uuid3" "$m3")" = "flag=1 marker=0" ] || fail "t3's vTPM state is not swtpm-encrypted"
lab_virsh a destroy t3 >/dev/null || true
lab_virsh a dominfo t3 >/dev/null 2>&1 && fail "t3 still exists after destroy (it should be transient)"
set_policy enrol
pass "policy=require: nkpctl vm create --transient starts it with its vTPM encrypted from the first byte"

lab_test_done
