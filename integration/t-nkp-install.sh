#!/bin/bash
# virt-install with an install phase (issue 15: "--cdrom-style installs that
# reboot into the final definition"), one lab host with nkpd, the default
# [vtpm] policy (enrol) and /var/lib/libvirt/swtpm under the host key
# (LAB_FSCRYPT_LIBVIRT=1, `nkpctl host protect`).
# virt-install --install kernel=…,initrd=… runs virtinst's whole install flow
# (virtinst/install/installer.py, virtinstall.py): a transient *install*
# domain (createXML, the install kernel, nkp.poweroff=1, on_reboot=destroy),
# then defineXML of the *final* definition (--boot kernel=…, no poweroff)
# while the install runs, a wait until the install domain shuts down, then
# "Restarting guest.": domain.create() of the final definition.
#   install phase: the guest writes its markers (vTPM NV, disk) and powers
#   off; nkpd enrols the final definition meanwhile (keysafe, <encryption
#   secret>); the vTPM marker is in the swtpm state file but not in the raw
#   image of /var/lib/libvirt (a control file outside the protected
#   directory is found there);
#   final start (by virt-install itself, which exits 0): the hook's prepare
#   step converts the state to the VM's DEK (swtpm-encrypted, no marker, not
#   in the raw image) and the guest reads both markers back.
# The serial log is opened in append mode (virt-install --xml) so the install
# phase's lines survive the final start.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-install "virt-install --install kernel=…: install phase under the host key, final definition enrolled and converted" \
    --needs virt-install --needs python3 --needs mkfs.ext4 \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
has_keysafe() { lab_virsh a dumpxml --inactive "$1" | grep_q 'nkp.invalid/xmlns/keysafe'; }
new_mark() { echo "NKPINSTALL$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
# state_info UUID MARK: "flag=<0|1> marker=<count>" of the vTPM state file, read in the host
state_info() {
    lab_exec a python3 - "/var/lib/libvirt/swtpm/$1/tpm2/tpm2-00.permall" "$2" <<'PY'
import sys
d = open(sys.argv[1], "rb").read()
print("flag=%d marker=%d" % (d[5] & 1, d.count(sys.argv[2].encode())))
PY
}
raw_count() { grep -a -c "$1" "$(lab_fscrypt_image a)" || true; }

t0=$(lab_now)
lab_test_init
lab_at_exit nkpd_stop
LAB_FSCRYPT_LIBVIRT=1 lab_host_create a || fail "host a"
lab_install_nkp a "$BUILD"
lab_host_start a || fail "host a did not start"
set_policy enrol
pass "host a up: /var/lib/libvirt on a loop ext4 -O encrypt ($(lab_since "$t0") s)"

umask 077
printf 'lab password install\n' > "$LAB_DIR/pw"
nk provider create pi >/dev/null || fail "provider create"
nk provider backup pi --out "$LAB_DIR/pi.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default pi >/dev/null || fail "set-default"
nkpd_start
out=$(nk host protect 2>&1) || fail "host protect: $out"
st=$(nk host status) || fail "host status"
grep -Eq "/var/lib/libvirt/swtpm +unlocked" <<<"$st" || fail "host status: $st"
# A control: a marker written in clear on the same filesystem is found in the raw image.
ctl=$(new_mark)
lab_exec a sh -c "echo $ctl > /var/lib/libvirt/control.txt"
[ "$(raw_count "$ctl")" -ge 1 ] || fail "control: a clear file's content is not visible in the raw image"
pass "host protect: /var/lib/libvirt/swtpm under the host key of 'pi'; a clear control file is seen in the raw image"

# ---- virt-install --install: install domain, final definition, restart ---------------------
[ -n "$LAB_GUEST_KERNEL" ] || lab_guest_build
mark=$(new_mark)
dom=i1
qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 64M
rm -f "$(lab_serial_path a "$dom")"
args="console=ttyS0 quiet panic=-1 nkp.marker=$mark"
t=$(lab_now)
lab_exec a timeout 900 virt-install --connect qemu:///system --name "$dom" \
    --virt-type qemu --machine q35 --memory 256 --vcpus 1 \
    --disk "path=$LAB_DIR/shared/$dom.qcow2,format=qcow2,bus=virtio" \
    --tpm emulator,model=tpm-crb \
    --install "kernel=$LAB_GUEST_KERNEL,initrd=$LAB_GUEST_INITRD,kernel_args=$args nkp.poweroff=1,kernel_args_overwrite=yes" \
    --boot "kernel=$LAB_GUEST_KERNEL,initrd=$LAB_GUEST_INITRD,kernel_args=$args" \
    --serial "file,path=/var/log/nkp-guest/$dom.serial" --xml ./devices/serial/source/@append=on \
    --graphics none --network none --osinfo detect=on,require=off \
    --noautoconsole --wait 12 > "$LAB_DIR/virt-install.out" 2>&1 &
vpid=$!
lab_at_exit '[ -z "$vpid" ] || kill "$vpid" 2>/dev/null || true'
ASSERT_ON_FAIL+=('sed "s/^/# virt-install: /" "$LAB_DIR/virt-install.out"')

lab_markers_written a "$dom" "$mark" || fail "install phase: $LAB_MARKER_ERR"
timing "virt-install start to install-phase markers written $(lab_since "$t") s"
# Read at once: the guest powers off right after writing, and virt-install
# then starts the final definition, whose prepare step converts the state.
uuid=$(lab_virsh a domuuid "$dom" | tr -d '[:space:]')
info=$(state_info "$uuid" "$mark") || fail "cannot read the vTPM state in the host"
[ "$(raw_count "$mark")" = 0 ] || fail "install phase: the vTPM marker is in clear in the raw image of /var/lib/libvirt"
if [[ $info =~ ^flag=0\ marker=[1-9] ]]; then
    pass "install phase: the state is clear at swtpm's level ($info) but not in the raw image (control found)"
else
    note "install phase: state already converted when read ($info); not in the raw image (control found)"
fi

for ((i = 0; i < 50; i++)); do has_keysafe "$dom" && break; sleep 0.2; done
has_keysafe "$dom" || fail "nkpd did not enrol $dom's final definition"
final=$(lab_virsh a dumpxml --inactive "$dom") || fail "dumpxml --inactive $dom"
grep_q "<encryption secret=" <<<"$final" || fail "$dom's final definition has no <encryption secret>"
grep_q "<cmdline>$args</cmdline>" <<<"$final" || fail "$dom's final definition is not --boot's: $final"
pass "install phase (transient start, install kernel): markers written; nkpd enrolled the final definition (keysafe, <encryption secret>)"

rc=0
wait "$vpid" || rc=$?
vpid=
[ "$rc" = 0 ] || fail "virt-install exited $rc"
grep_q "Restarting guest" "$LAB_DIR/virt-install.out" || fail "virt-install did not restart into the final definition"
timing "virt-install, whole flow $(lab_since "$t") s"
pass "virt-install exited 0 after 'Restarting guest.' (final definition started by virt-install)"

# Final boot: the serial log (append mode) holds the install phase's lines first.
serial=$(lab_serial_lines a "$dom")
grep_q -x "NKP-POWEROFF" <<<"$serial" || fail "the install phase did not power off by itself: $serial"
line=$(lab_wait_serial a "$dom" 'NKP-DISK-MARKER=|NKP-ERROR' 240) || fail "final boot: no marker line within 240 s"
[ "$line" = "NKP-DISK-MARKER=$mark" ] || fail "final boot, disk marker: $line (want $mark)"
tline=$(lab_wait_serial a "$dom" 'NKP-TPM-MARKER=' "$LAB_TPM_MARKER_WAIT") || fail "final boot: no TPM marker line"
[ "$tline" = "NKP-TPM-MARKER=$mark" ] || fail "final boot, TPM marker: $tline (want $mark)"
timing "virt-install start to final-boot markers read $(lab_since "$t") s"
lab_virsh a dumpxml "$dom" | grep_q 'nkp.invalid/xmlns/keysafe' || fail "the final boot runs without its keysafe"
info=$(state_info "$uuid" "$mark")
[ "$info" = "flag=1 marker=0" ] || fail "after the final start: state $info (want swtpm-encrypted, no marker)"
[ "$(raw_count "$mark")" = 0 ] || fail "the vTPM marker is in the raw image after the final start"
pass "final definition: converted to the VM's DEK at its start (swtpm-encrypted, no marker, not in the raw image); both markers read back"

lab_virsh a destroy "$dom" >/dev/null || fail "destroy $dom"
lab_test_done
