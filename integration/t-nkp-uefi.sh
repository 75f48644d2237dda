#!/bin/bash
# UEFI VMs on nkp hosts (issues 14 and 15): two lab hosts with nkp's default
# [vtpm] policy (enrol), /var/lib/libvirt on a loop ext4 with the 'encrypt'
# feature (LAB_FSCRYPT_LIBVIRT=1), Debian's OVMF picked by libvirt's
# firmware autoselection (Secure Boot, Microsoft keys enrolled), the lab
# guest booted by OVMF from QEMU's fw_cfg (direct kernel boot through the
# kernel's EFI stub) with nkp.efivar=1: it keeps its marker in a
# non-volatile EFI variable too, i.e. in the VM's NVRAM file.
#   setup: `nkpctl host protect` on a (its defaults include the NVRAM
#   directory), `host protect --dir` swtpm and NVRAM on b (same provider,
#   restored on b);
#   1. `virt-install --boot uefi` with no --tpm: virtinst adds its default
#      vTPM; the command succeeds, the guest writes its markers (vTPM NV,
#      disk, EFI variable); nkpd enrols the domain (keysafe, <encryption
#      secret>); neither the vTPM marker nor the EFI variable's value is in
#      the raw image of /var/lib/libvirt (a clear control file is, and the
#      NVRAM file read through the unlocked directory holds the value);
#      stop/start: the vTPM state converted, all three markers read back;
#      `virsh create` of a UEFI vTPM domain (lab_guest_xml --uefi) starts
#      under the host key, nothing in the raw image;
#   2. live migration a → b (--persistent --undefinesource --tls, disks on
#      shared storage): libvirt 9.0 copies no NVRAM file, b's libvirt makes
#      a fresh one from the template and QEMU writes the migrated flash
#      contents into it; b's raw image has no marker; `vm rekey --deep` on
#      b; offline migration b → a with the vTPM state and NVRAM file copied
#      as README says (a's stale copy removed first); cold start on a: the
#      three markers;
#   3. virt-manager's creation path: virtinst's Installer.start_install
#      from Python with the guest the wizard builds for os variant win11
#      (UEFI, default vTPM), direct kernel boot set as in "Customize before
#      install": succeeds, enrolled, no marker in the raw image, markers
#      read back after stop/start.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-uefi "UEFI VMs: virt-install --boot uefi, NVRAM under the host key, migration, deep rekey, virtinst Installer" \
    --needs virt-install --needs mkfs.ext4 --needs openssl \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
[ -f /usr/share/OVMF/OVMF_CODE_4M.ms.fd ] && [ -f /usr/share/qemu/firmware/40-edk2-x86_64-secure-enrolled.json ] ||
    skip_all "Debian's ovmf is not installed (/usr/share/OVMF, /usr/share/qemu/firmware)"
BUILD=$NKP_BUILD_DIR
NVRAM=/var/lib/libvirt/qemu/nvram
export LAB_TLS=1 LAB_FSCRYPT_LIBVIRT=1

nk() { local h=$1; shift; lab_exec "$h" nkpctl "$@"; }
has_keysafe() { local x; x=$(lab_virsh a dumpxml --inactive "$1") && grep -q 'nkp.invalid/xmlns/keysafe' <<<"$x"; }
new_mark() { echo "NKPUEFI$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
raw_count() { grep -a -c "$2" "$(lab_fscrypt_image "$1")" || true; }
# nvram_count HOST DOM MARK: copies of MARK in DOM's NVRAM file, read in HOST (through fscrypt)
nvram_count() { lab_exec "$1" grep -a -c "$3" "$NVRAM/$2_VARS.fd" || true; }
# efi_marker HOST DOM: the EFI variable line of the guest's last boot
efi_marker() { lab_wait_serial "$1" "$2" 'NKP-EFI-MARKER=|NKP-EFIVAR-WRITTEN=|NKP-ERROR' 10; }
# read_all HOST DOM MARK CONTEXT: cold start, the three markers read back, destroy
read_all() {
    boot_and_read "$1" "$2" "$3" --running "$4"
    local l; l=$(efi_marker "$1" "$2") || fail "$4: no EFI variable line"
    [ "$l" = "NKP-EFI-MARKER=$3" ] || fail "$4: EFI variable: $l (want $3)"
    lab_virsh "$1" destroy "$2" >/dev/null || fail "$4: virsh destroy"
    lab_wait_domstate "$1" "$2" "shut off" 30 || fail "$4: not shut off"
}
wait_enrolled() {
    local i
    for ((i = 0; i < 100; i++)); do has_keysafe "$1" && break; sleep 0.2; done
    has_keysafe "$1" || fail "nkpd did not enrol $1"
    local x; x=$(lab_virsh a dumpxml --inactive "$1")
    grep -q "<encryption secret=" <<<"$x" || fail "$1: no <encryption secret>"
}
# not_in_raw HOST CONTEXT MARK…: no MARK in HOST's raw /var/lib/libvirt image
not_in_raw() {
    local h=$1 ctx=$2 m
    shift 2
    for m in "$@"; do [ "$(raw_count "$h" "$m")" = 0 ] || fail "$ctx: '$m' is in clear in the raw image of $h's /var/lib/libvirt"; done
}

t0=$(lab_now)
lab_test_init
lab_at_exit nkpd_stop
# nkp moves VMs only between hosts that force TLS for migrations (t-nkp-migrate)
export LAB_QEMU_CONF_EXTRA="migrate_tls_force = 1"
lab_host_create a 10.77.0.1/24 && lab_host_create b 10.77.0.2/24 || fail "create the hosts"
lab_link a b 10.77.0.1 10.77.0.2 || fail "veth link"
lab_install_nkp a "$BUILD"
lab_install_nkp b "$BUILD"
lab_host_start a && lab_host_start b || fail "libvirtd"
set_policy enrol
umask 077
printf 'lab password uefi\n' > "$LAB_DIR/pw"
nk a provider create pu >/dev/null || fail "provider create"
nk a provider backup pu --out "$LAB_DIR/pu.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk a provider set-default pu >/dev/null || fail "set-default on a"
nk b provider restore "$LAB_DIR/pu.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider restore on b"
nk b provider set-default pu >/dev/null || fail "set-default on b"
# a: `host protect` with its default directories (the NVRAM one among them);
# b: the two this test needs, named (a host protected before that default).
out=$(nk a host protect 2>&1) || fail "host protect on a: $out"
out=$(nk b host protect --dir /var/lib/libvirt/swtpm 2>&1) || fail "host protect --dir swtpm on b: $out"
out=$(nk b host protect --dir "$NVRAM" 2>&1) || fail "host protect --dir $NVRAM on b: $out"
for h in a b; do
    st=$(nk "$h" host status) || fail "host status on $h"
    grep -Eq "/var/lib/libvirt/swtpm +unlocked" <<<"$st" && grep -Eq "$NVRAM +unlocked" <<<"$st" ||
        fail "host status on $h: $st"
    ctl=$(new_mark)
    lab_exec "$h" sh -c "echo $ctl > /var/lib/libvirt/control.txt"
    [ "$(raw_count "$h" "$ctl")" -ge 1 ] || fail "control: a clear file's content is not in $h's raw image"
done
nkpd_start
pass "hosts a, b ($(lab_since "$t0") s): swtpm and NVRAM directories under the host key of 'pu' (host status: unlocked; a clear control file is found in the raw image)"

# ---- 1. virt-install --boot uefi, virtinst's default vTPM ------------------------------------
dom=u1
mark=$(new_mark)
qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 64M
rm -f "$(lab_serial_path a "$dom")"
t=$(lab_now)
if ! vout=$(lab_exec a timeout 300 virt-install --connect qemu:///system --name "$dom" --import \
        --virt-type qemu --machine q35 --memory 256 --vcpus 1 \
        --disk "path=$LAB_DIR/shared/$dom.qcow2,format=qcow2,bus=virtio" \
        --boot "uefi,kernel=$LAB_GUEST_KERNEL,initrd=$LAB_GUEST_INITRD,kernel_args=console=ttyS0 quiet panic=-1 nkp.efivar=1 nkp.marker=$mark" \
        --serial "file,path=/var/log/nkp-guest/$dom.serial" --graphics none --network none \
        --osinfo detect=on,require=off --noautoconsole 2>&1); then
    fail "virt-install --boot uefi: $vout"
fi
lab_markers_written a "$dom" "$mark" || fail "$dom first boot: $LAB_MARKER_ERR"
[ "$(efi_marker a "$dom")" = "NKP-EFIVAR-WRITTEN=$mark" ] || fail "$dom: EFI variable: $(efi_marker a "$dom" || true)"
timing "virt-install --boot uefi to markers written $(lab_since "$t") s"
x=$(lab_virsh a dumpxml "$dom")
grep -q "<backend type='emulator' version='2.0'" <<<"$x" || fail "virtinst added no emulated vTPM: $x"
grep -q "<loader readonly='yes' secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.ms.fd</loader>" <<<"$x" ||
    fail "firmware: $(grep -E '<loader|<nvram' <<<"$x")"
grep -q "<nvram template='/usr/share/OVMF/OVMF_VARS_4M.ms.fd'>$NVRAM/${dom}_VARS.fd</nvram>" <<<"$x" ||
    fail "NVRAM: $(grep '<nvram' <<<"$x")"
pass "virt-install --boot uefi (no --tpm) succeeded: virtinst's default vTPM, OVMF_CODE_4M.ms.fd (Secure Boot) by libvirt's autoselection; markers in vTPM NV, disk, EFI variable"

wait_enrolled "$dom"
uuid=$(lab_virsh a domuuid "$dom" | tr -d '[:space:]')
[ "$(nvram_count a "$dom" "$mark")" -ge 1 ] || fail "the EFI variable is not in $dom's NVRAM file (the check below would prove nothing)"
not_in_raw a "first run" "$mark"
pass "nkpd enrolled $dom (keysafe, <encryption secret>); first run: the NVRAM file holds the EFI variable, yet neither it nor the vTPM marker is in the raw image"

lab_virsh a destroy "$dom" >/dev/null || fail "destroy $dom"
lab_wait_domstate a "$dom" "shut off" 30 || fail "$dom not shut off"
read_all a "$dom" "$mark" "$dom, start after enrolment"
lab_exec a python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); sys.exit(0 if d[5] & 1 and sys.argv[2].encode() not in d else 1)' \
    "/var/lib/libvirt/swtpm/$uuid/tpm2/tpm2-00.permall" "$mark" || fail "the vTPM state is not swtpm-encrypted after the start"
not_in_raw a "after stop/start" "$mark"
pass "stop/start: vTPM state converted to the VM's DEK; vTPM, disk and EFI markers read back; nothing in the raw image"

# ---- 1b. virsh create of a UEFI vTPM domain (lab_guest_xml --uefi) ---------------------------
m2=$(new_mark)
qemu-img create -q -f qcow2 "$LAB_DIR/shared/t2.qcow2" 64M
lab_guest_xml --name t2 --disk "$LAB_DIR/shared/t2.qcow2" --marker "$m2" --uefi --poweroff > "$LAB_DIR/t2.xml"
rm -f "$(lab_serial_path a t2)"
err=$(lab_virsh a create "$LAB_DIR/t2.xml" 2>&1) || fail "virsh create of a UEFI vTPM domain: $err"
lab_markers_written a t2 "$m2" || fail "t2: $LAB_MARKER_ERR"
[ "$(efi_marker a t2)" = "NKP-EFIVAR-WRITTEN=$m2" ] || fail "t2: EFI variable: $(efi_marker a t2 || true)"
lab_wait_serial a t2 'NKP-POWEROFF' 60 >/dev/null || fail "t2 did not power off"
[ "$(nvram_count a t2 "$m2")" -ge 1 ] || fail "the EFI variable is not in t2's NVRAM file"
not_in_raw a "t2 (virsh create)" "$m2"
pass "virsh create of a UEFI vTPM domain: started (host key), markers and EFI variable written, none in the raw image"

# ---- 2. migration a -> b, deep rekey on b ------------------------------------------------------
[ "$(lab_exec b sh -c "ls $NVRAM | wc -l")" = 0 ] || fail "b already has an NVRAM file"
rm -f "$(lab_serial_path a "$dom")"
lab_virsh a start "$dom" >/dev/null || fail "start $dom on a"
lab_wait_serial a "$dom" 'NKP-TICK 1$' 240 >/dev/null || fail "$dom does not tick on a"
t=$(lab_now)
err=$(lab_virsh a migrate --live --unsafe --persistent --undefinesource --tls "$dom" qemu+tls://10.77.0.2/system 2>&1) ||
    fail "migrate a -> b: $err"
timing "live migration a -> b $(lab_since "$t") s"
lab_wait_serial b "$dom" 'NKP-TICK [0-9]+$' 60 >/dev/null || fail "$dom does not tick on b"
x=$(lab_virsh b dumpxml --inactive "$dom") || fail "no persistent $dom on b"
note "b's persistent definition: $(sed -n '/<os/,/<\/os>/p' <<<"$x" | grep -Ev '<kernel|<initrd|<cmdline' | tr -s ' \n' ' ')"
x=$(lab_virsh b dumpxml "$dom") || fail "no $dom on b"
grep -q "$NVRAM/${dom}_VARS.fd</nvram>" <<<"$x" || fail "$dom on b runs without its NVRAM file: $(grep -E '<loader|<nvram' <<<"$x")"
for ((i = 0; i < 50; i++)); do [ "$(nvram_count b "$dom" "$mark")" -ge 1 ] && break; sleep 0.2; done
[ "$(nvram_count b "$dom" "$mark")" -ge 1 ] || fail "b's NVRAM file lacks the EFI variable after the migration"
not_in_raw b "after the migration" "$mark"
stale=$(lab_exec a sh -c "ls $NVRAM" | tr "\n" " ")
note "a's NVRAM directory after --undefinesource: '${stale}'"
pass "live migration a -> b: b's NVRAM file (made from the template) holds the migrated variable store, not in b's raw image"

lab_virsh b destroy "$dom" >/dev/null || fail "destroy $dom on b"
lab_wait_domstate b "$dom" "shut off" 30 || fail "$dom not shut off on b"
out=$(nk b vm rekey "$dom" --deep 2>&1) || fail "vm rekey --deep on b: $out"
pass "deep rekey of $dom on b: $out"

# Offline migration b -> a, as README says: libvirt copies neither the vTPM
# state nor the NVRAM file, and --undefinesource deletes the source's vTPM
# state (not its NVRAM).  So the administrator first copies both from b into
# a's protected directories (here pipes; ssh in real life; a's stale NVRAM
# copy from the live migration is overwritten), migrates, then removes b's
# NVRAM file.
lab_exec a test ! -e "/var/lib/libvirt/swtpm/$uuid" || fail "a still has a vTPM state of $dom"
lab_exec b tar -C /var/lib/libvirt/swtpm -cf - "$uuid" | lab_exec a tar -C /var/lib/libvirt/swtpm -xpf - ||
    fail "copying the vTPM state b -> a"
lab_exec a rm "$NVRAM/${dom}_VARS.fd" || fail "removing the stale NVRAM copy on a"
lab_exec b cat "$NVRAM/${dom}_VARS.fd" | lab_exec a sh -c "umask 077; cat > '$NVRAM/${dom}_VARS.fd'" ||
    fail "copying the NVRAM file b -> a"
err=$(lab_virsh b migrate --offline --persistent --undefinesource --tls "$dom" qemu+tls://10.77.0.1/system 2>&1) ||
    fail "offline migration b -> a: $err"
lab_exec b test ! -e "/var/lib/libvirt/swtpm/$uuid" || note "b kept the vTPM state after --undefinesource"
lab_exec b rm -f "$NVRAM/${dom}_VARS.fd" || fail "removing the NVRAM file on b"
[ "$(nvram_count a "$dom" "$mark")" -ge 1 ] || fail "the copied NVRAM file on a lacks the variable"
not_in_raw a "after the NVRAM copy" "$mark"
read_all a "$dom" "$mark" "$dom back on a (offline migration + NVRAM copy), after the deep rekey"
not_in_raw a "after the start on a" "$mark"
pass "offline migration b -> a with the vTPM state and NVRAM file copied by the administrator: vTPM, disk and EFI markers read back after the deep rekey; nothing in a's raw image"

# ---- 3. virt-manager's creation path: virtinst Installer.start_install, win11 ------------------
dom=w1
mark=$(new_mark)
qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 64M
rm -f "$(lab_serial_path a "$dom")"
t=$(lab_now)
cat > "$LAB_DIR/wizard.py" <<'PY'
# As virt-manager's "Create a new virtual machine" wizard (virtManager/createvm.py,
# _GuestData.build_guest / build_installer, then Installer.start_install):
# "Import existing disk image", OS win11 (its UEFI default), then in
# "Customize configuration before install": direct kernel boot, a file
# serial port, a virtio disk bus (the lab guest has no AHCI driver), no NIC.
import sys
sys.path.insert(0, "/usr/share/virt-manager")
import virtinst
name, disk_path, kernel, initrd, args = sys.argv[1:6]
conn = virtinst.VirtinstConnection("qemu:///system")
conn.open(None, None)
capsinfo = conn.caps.guest_lookup(os_type="hvm", arch="x86_64", typ="qemu", machine="q35")
guest = virtinst.Guest(conn)
guest.set_capabilities_defaults(capsinfo)
guest.set_os_name("win11")
if guest.prefers_uefi():                 # the wizard's _set_caps_state
    guest.enable_uefi()
    guest.uefi_requested = True
disk = virtinst.DeviceDisk(conn)
disk.set_source_path(disk_path)
disk.driver_type = "qcow2"
disk.bus = "virtio"
guest.add_device(disk)
guest.name = name
guest.vcpus = 1
guest.currentMemory = guest.memory = 256 * 1024
guest.os.kernel, guest.os.initrd, guest.os.kernel_args = kernel, initrd, args
serial = virtinst.DeviceSerial(conn)
serial.type = "file"
serial.source.path = "/var/log/nkp-guest/%s.serial" % name
guest.add_device(serial)
installer = virtinst.Installer(conn)
installer.start_install(guest)
print("created", name)
PY
out=$(lab_exec a timeout 300 /usr/bin/python3 "$LAB_DIR/wizard.py" "$dom" "$LAB_DIR/shared/$dom.qcow2" \
      "$LAB_GUEST_KERNEL" "$LAB_GUEST_INITRD" "console=ttyS0 quiet panic=-1 nkp.efivar=1 nkp.marker=$mark" 2>&1) ||
    fail "virtinst Installer: $out"
lab_markers_written a "$dom" "$mark" || fail "$dom first boot: $LAB_MARKER_ERR"
[ "$(efi_marker a "$dom")" = "NKP-EFIVAR-WRITTEN=$mark" ] || fail "$dom: EFI variable: $(efi_marker a "$dom" || true)"
timing "Installer.start_install to markers written $(lab_since "$t") s"
x=$(lab_virsh a dumpxml "$dom")
grep -q "<backend type='emulator' version='2.0'" <<<"$x" && grep -q "OVMF_CODE_4M.ms.fd</loader>" <<<"$x" &&
    grep -q "<hyperv mode=" <<<"$x" || fail "$dom: not a Windows-like UEFI guest with virtinst's default vTPM: $x"
wait_enrolled "$dom"
[ "$(nvram_count a "$dom" "$mark")" -ge 1 ] || fail "the EFI variable is not in $dom's NVRAM file"
not_in_raw a "$dom, first run" "$mark"
pass "virtinst Installer.start_install (the wizard's win11 guest: UEFI, default vTPM) succeeded; enrolled by nkpd; nothing in the raw image"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy $dom"
lab_wait_domstate a "$dom" "shut off" 30 || fail "$dom not shut off"
read_all a "$dom" "$mark" "$dom, stop/start"
not_in_raw a "$dom, after stop/start" "$mark"
pass "$dom stop/start: vTPM, disk and EFI markers read back; nothing in the raw image"

lab_test_done
