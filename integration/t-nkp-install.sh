#!/bin/bash
# virt-install with an install phase (issue 15: "--cdrom-style installs that
# reboot into the final definition"), one lab host with nkpd, the default
# [vtpm] policy (enrol) and /var/lib/libvirt/swtpm under the host key
# (LAB_FSCRYPT_LIBVIRT=1, `nkpctl host protect`).  Both runs go through
# virtinst's whole install flow (virtinst/install/installer.py,
# virtinstall.py): a transient *install* domain (createXML, on_reboot=destroy),
# defineXML of the *final* definition while the install runs, a wait until
# the install domain shuts down, then "Restarting guest.": domain.create() of
# the final definition.
#   1. --install kernel=…,initrd=…,kernel_args=…nkp.poweroff=1 (install
#      kernel) with --boot kernel=… (the final definition's, no poweroff);
#   2. --cdrom ISO (xorriso) with --boot kernel=… (the lab guest has no CD
#      boot loader: both phases boot the kernel; the CD is attached for the
#      install and ejected in the final definition, as for an OS installer).
# Each: the install phase writes the markers (vTPM NV, disk) and powers off;
# its vTPM marker is in the swtpm state file but not in the raw image of
# /var/lib/libvirt (a control file outside the protected directory is found
# there); nkpd enrols the final definition meanwhile (keysafe, <encryption
# secret>); virt-install exits 0 after starting the final definition, whose
# prepare step converts the state to the VM's DEK (swtpm-encrypted, no
# marker, not in the raw image); the final boot reads both markers back.
# The serial log is opened in append mode (virt-install --xml) so the install
# phase's lines survive the final start.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
source "$(dirname "$0")/lib/create.sh"
lab_test t-nkp-install "virt-install --install kernel=…: install phase under the host key, final definition enrolled and converted" \
    --needs virt-install --needs python3 --needs mkfs.ext4 \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
nk() { lab_exec a nkpctl "$@"; }
has_keysafe() { create_has_keysafe "$1"; }
new_mark() { echo "NKPINSTALL$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
state_info() { create_state_info "$@"; }
raw_count() { create_raw_count "$1"; }

create_host_up pi
out=$(nk host protect 2>&1) || fail "host protect: $out"
st=$(nk host status) || fail "host status"
grep -Eq "/var/lib/libvirt/swtpm +unlocked" <<<"$st" || fail "host status: $st"
# A control: a marker written in clear on the same filesystem is found in the raw image.
ctl=$(new_mark)
lab_exec a sh -c "echo $ctl > /var/lib/libvirt/control.txt"
[ "$(raw_count "$ctl")" -ge 1 ] || fail "control: a clear file's content is not visible in the raw image"
pass "host protect: /var/lib/libvirt/swtpm under the host key of 'pi'; a clear control file is seen in the raw image"

# install_flow DOM MARK WHAT VIRT-INSTALL-ARGS…: virt-install (common options,
# DOM's disk, tpm-crb, the serial log in append mode, --noautoconsole --wait)
# in the background; the install phase writes MARK, the state is checked
# before the final start converts it, nkpd's enrolment of the final
# definition, virt-install's exit and restart, then the final boot's markers
# and the converted state.
install_flow() {
    local d=$1 m=$2 what=$3 t vpid_rc=0 info final serial line tline uuid i
    shift 3
    dom=$d      # lab_test_dump's logs on a failure
    qemu-img create -q -f qcow2 "$LAB_DIR/shared/$d.qcow2" 64M
    rm -f "$(lab_serial_path a "$d")"
    t=$(lab_now)
    lab_exec a timeout 900 virt-install --connect qemu:///system --name "$d" \
        --virt-type qemu --machine q35 --memory 256 --vcpus 1 \
        --disk "path=$LAB_DIR/shared/$d.qcow2,format=qcow2,bus=virtio" \
        --tpm emulator,model=tpm-crb \
        --serial "file,path=/var/log/nkp-guest/$d.serial" --xml ./devices/serial/source/@append=on \
        --graphics none --network none --osinfo detect=on,require=off \
        --noautoconsole --wait 12 "$@" > "$LAB_DIR/virt-install.$d.out" 2>&1 &
    vpid=$!
    vout=$LAB_DIR/virt-install.$d.out

    lab_markers_written a "$d" "$m" || fail "$what, install phase: $LAB_MARKER_ERR"
    timing "$what: virt-install start to install-phase markers written $(lab_since "$t") s"
    # Read at once: the guest powers off right after writing, and virt-install
    # then starts the final definition, whose prepare step converts the state.
    uuid=$(lab_virsh a domuuid "$d" | tr -d '[:space:]')
    info=$(state_info "$uuid" "$m") || fail "$what: cannot read the vTPM state in the host"
    [ "$(raw_count "$m")" = 0 ] || fail "$what, install phase: the vTPM marker is in clear in the raw image of /var/lib/libvirt"
    if [[ $info =~ ^flag=0\ marker=[1-9] ]]; then
        pass "$what, install phase: the state is clear at swtpm's level ($info) but not in the raw image (control found)"
    else
        note "$what, install phase: state already converted when read ($info); not in the raw image (control found)"
    fi

    for ((i = 0; i < 50; i++)); do has_keysafe "$d" && break; sleep 0.2; done
    has_keysafe "$d" || fail "$what: nkpd did not enrol $d's final definition"
    final=$(lab_virsh a dumpxml --inactive "$d") || fail "dumpxml --inactive $d"
    grep_q "<encryption secret=" <<<"$final" || fail "$what: $d's final definition has no <encryption secret>"
    pass "$what, install phase (transient start): markers written; nkpd enrolled the final definition (keysafe, <encryption secret>)"

    wait "$vpid" || vpid_rc=$?
    vpid=
    [ "$vpid_rc" = 0 ] || fail "$what: virt-install exited $vpid_rc"
    grep_q "Restarting guest" "$vout" || fail "$what: virt-install did not restart into the final definition"
    timing "$what: virt-install, whole flow $(lab_since "$t") s"

    # Final boot: the serial log (append mode) holds the install phase's lines first.
    serial=$(lab_serial_lines a "$d")
    grep_q -x "NKP-POWEROFF" <<<"$serial" || fail "$what: the install phase did not power off by itself: $serial"
    line=$(lab_wait_serial a "$d" 'NKP-DISK-MARKER=|NKP-ERROR' 240) || fail "$what, final boot: no marker line within 240 s"
    [ "$line" = "NKP-DISK-MARKER=$m" ] || fail "$what, final boot, disk marker: $line (want $m)"
    tline=$(lab_wait_serial a "$d" 'NKP-TPM-MARKER=' "$LAB_TPM_MARKER_WAIT") || fail "$what, final boot: no TPM marker line"
    [ "$tline" = "NKP-TPM-MARKER=$m" ] || fail "$what, final boot, TPM marker: $tline (want $m)"
    timing "$what: virt-install start to final-boot markers read $(lab_since "$t") s"
    info=$(state_info "$uuid" "$m")
    [ "$info" = "flag=1 marker=0" ] || fail "$what, after the final start: state $info (want swtpm-encrypted, no marker)"
    [ "$(raw_count "$m")" = 0 ] || fail "$what: the vTPM marker is in the raw image after the final start"
    pass "$what: virt-install exited 0 after 'Restarting guest.'; the final definition's start converted the state to the VM's DEK (swtpm-encrypted, no marker, not in the raw image); both markers read back"
}
vpid=
lab_at_exit '[ -z "$vpid" ] || kill "$vpid" 2>/dev/null || true'
ASSERT_ON_FAIL+=('[ -z "${vout:-}" ] || sed "s/^/# virt-install: /" "$vout"')
[ -n "$LAB_GUEST_KERNEL" ] || lab_guest_build
boot() { echo "kernel=$LAB_GUEST_KERNEL,initrd=$LAB_GUEST_INITRD,kernel_args=console=ttyS0 quiet panic=-1 nkp.marker=$1${2:+ $2}"; }

# ---- 1. --install kernel=…: install kernel (powers off), final definition's --boot kernel --------
mark=$(new_mark)
install_flow i1 "$mark" "--install kernel=" \
    --install "$(boot "$mark" nkp.poweroff=1),kernel_args_overwrite=yes" --boot "$(boot "$mark")"
lab_virsh a dumpxml --inactive i1 | grep_q "<cmdline>console=ttyS0 quiet panic=-1 nkp.marker=$mark</cmdline>" ||
    fail "i1's final definition does not boot --boot's kernel line"
pass "--install kernel=: the final definition boots --boot's kernel line (the install kernel line only in the install phase)"
lab_virsh a destroy i1 >/dev/null || fail "destroy i1"

# ---- 2. --cdrom ISO: the CD-ROM install path (CD attached for the install, ejected after) -------
# The guest has no boot loader for a CD: both phases boot --boot's kernel
# directly (nkp.poweroff=1: the final boot powers off too, after reading).
lab_exec a sh -c "mkdir -p /var/lib/libvirt/boot/cd && echo NKP-INSTALL-CD > /var/lib/libvirt/boot/cd/README &&
    xorriso -as mkisofs -quiet -V NKPCD -o /var/lib/libvirt/boot/nkp-install.iso /var/lib/libvirt/boot/cd" ||
    fail "xorriso: cannot make the install ISO"
mark=$(new_mark)
install_flow c1 "$mark" "--cdrom ISO" --cdrom /var/lib/libvirt/boot/nkp-install.iso --boot "$(boot "$mark" nkp.poweroff=1)"
final=$(lab_virsh a dumpxml --inactive c1)
grep_q "device=.cdrom" <<<"$final" || fail "c1's final definition has no CD-ROM drive: virt-install took another path"
! grep_q "nkp-install.iso" <<<"$final" || fail "c1's final definition still holds the install ISO"
pass "--cdrom ISO: the final definition keeps an empty CD-ROM drive (virtinst ejected the install media)"

lab_test_done
