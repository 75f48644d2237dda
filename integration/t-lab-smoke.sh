#!/bin/bash
# Integration test of the lab itself (no nkp): one lab host, a guest whose
# vTPM state is encrypted (<encryption secret=…>) and whose disk is a LUKS
# qcow2, both with ephemeral private secrets defined by hand. First boot
# writes a marker into a TPM NV index and onto the disk, the second boot
# reads both back; neither the vTPM state file nor the qcow2 holds the marker
# in clear (a control guest without encryption shows the check can see it).
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-lab-smoke "the lab itself: one host, encrypted vTPM + LUKS disk by hand, markers, nothing in clear"

t0=$(lab_now)
lab_test_init
timing "guest kernel+initramfs ready in $(lab_since "$t0") s"

t=$(lab_now)
lab_host_up a || fail "host a did not come up"
timing "host up in $(lab_since "$t") s"
[ "$(lab_exec a hostname)" = a ] || fail "hostname in host a is not 'a'"
grep -q "$(cat "$LAB_DIR/hosts/a/host_uuid")" <(lab_virsh a sysinfo 2>/dev/null; lab_virsh a capabilities) \
    || fail "host a does not report its own host_uuid"
pass "host a up (own namespaces, hostname, host_uuid)"

dom=smoke
mark="NKPSMOKE$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
umask 077
head -c 32 /dev/urandom > "$LAB_DIR/vtpm.key"                 # any bytes work for swtpm
head -c 32 /dev/urandom | base64 -w0 > "$LAB_DIR/disk.key"    # LUKS: UTF-8 text

t=$(lab_now)
lab_luks_create "$disk" 64M "$LAB_DIR/disk.key" || fail "qemu-img create (LUKS qcow2)"
grep -q 'format: luks' <<<"$(qemu-img info "$disk")" || fail "qcow2 is not LUKS-encrypted"
timing "LUKS qcow2 created in $(lab_since "$t") s"

t=$(lab_now)
tpmsec=$(lab_secret_define a --usage vtpm --target "$dom-vtpm" "$LAB_DIR/vtpm.key") || fail "vtpm secret"
disksec=$(lab_secret_define a --usage volume --target "$disk" "$LAB_DIR/disk.key") || fail "volume secret"
timing "two ephemeral private secrets defined in $(lab_since "$t") s"
lab_virsh a secret-get-value "$tpmsec" >/dev/null 2>&1 && fail "private secret value is readable"
ls "$(lab_path a /etc/libvirt/secrets)" | grep_q . && fail "ephemeral secret written to /etc/libvirt/secrets"
pass "ephemeral private secrets defined (value not readable, nothing on disk)"

uuid=$(cat /proc/sys/kernel/random/uuid)
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" \
    --tpm-secret "$tpmsec" --disk-secret "$disksec" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"

serial=$(lab_serial_path a "$dom")
boot_and_write a "$dom" "$mark"
lab_wait_serial a "$dom" 'NKP-TICK 1$' 30 >/dev/null || fail "guest does not tick"
pass "first boot wrote the markers ($mark)"

t=$(lab_now)
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
timing "destroy $(lab_since "$t") s"
rm -f "$serial"

for boot in 2 3; do
    boot_and_read a "$dom" "$mark" --running "boot #$boot"
    pass "boot #$boot read both markers back"
    t=$(lab_now)
    if [ $boot = 2 ]; then
        lab_virsh a destroy "$dom" >/dev/null || fail "destroy #$boot"
    else
        # graceful: ACPI power button -> the guest's acpid powers off
        lab_virsh a shutdown "$dom" >/dev/null || fail "shutdown #$boot"
        lab_wait_domstate a "$dom" "shut off" 60 || fail "guest ignored virsh shutdown"
        lab_wait_serial a "$dom" 'NKP-ACPI-POWEROFF' 1 >/dev/null || fail "no NKP-ACPI-POWEROFF line"
        timing "virsh shutdown to shut off $(lab_since "$t") s"
        pass "virsh shutdown powers the guest off"
    fi
    rm -f "$serial"
done

state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
ls "$state"/tpm2-00.permall >/dev/null 2>&1 || fail "no vTPM state file under $state"
for f in "$state"/*; do
    if grep -a -q "$mark" "$f"; then fail "marker in clear in $f"; fi
done
# an encrypted state file is incompressible
sz=$(stat -c %s "$state/tpm2-00.permall"); gz=$(gzip -c "$state/tpm2-00.permall" | wc -c)
[ "$gz" -ge $((sz * 95 / 100)) ] || fail "vTPM state compresses ($gz/$sz): not encrypted?"
grep -a -q "$mark" "$disk" && fail "marker in clear in the qcow2"
pass "vTPM state and qcow2 hold no marker in clear (permall $sz bytes, gzip $gz)"

# Control: the same guest without encryption leaves the marker visible, so the
# checks above can see it when it is there.
cdom=control
cmark="NKPCTRL$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
cdisk="$LAB_DIR/shared/$cdom.qcow2"
cuuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$cdisk" 64M || fail "qemu-img create (plain)"
lab_guest_xml --name "$cdom" --uuid "$cuuid" --disk "$cdisk" --marker "$cmark" --poweroff > "$LAB_DIR/$cdom.xml"
lab_virsh a define "$LAB_DIR/$cdom.xml" >/dev/null || fail "define control"
t=$(lab_now)
dom=$cdom
lab_virsh a start "$cdom" >/dev/null || fail "start control"
lab_wait_serial a "$cdom" 'NKP-POWEROFF' 240 >/dev/null || fail "control guest did not power off"
lab_wait_domstate a "$cdom" "shut off" 20 || fail "control guest still running after poweroff"
timing "control guest (plain, nkp.poweroff=1) start to shut off $(lab_since "$t") s"
grep -a -q "$cmark" "$(lab_path a "/var/lib/libvirt/swtpm/$cuuid/tpm2")/tpm2-00.permall" \
    || fail "control: marker not found in the clear vTPM state (the check is blind)"
grep -a -q "$cmark" "$cdisk" || fail "control: marker not found in the plain qcow2 (the check is blind)"
pass "control guest: marker visible in clear state and plain qcow2 (checks are meaningful)"

# Down, and nothing left behind.
hostdir=$LAB_DIR/hosts/a
procs=$(lab_procs_snapshot a)
[ -n "$procs" ] || fail "no processes seen in host a before host down"
t=$(lab_now)
lab_host_down a || fail "host down"
timing "host down in $(lab_since "$t") s"
left=$(lab_procs_alive "$procs")
[ -z "$left" ] || fail "processes of host a left: $left"
grep -q " $LAB_DIR[/ ]" /proc/self/mountinfo && fail "mounts left under $LAB_DIR"
[ ! -e "$hostdir" ] || fail "$hostdir not removed"
pass "host down: no processes, no mounts, state removed"
lab_test_done
