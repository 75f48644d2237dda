#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The host key over libvirt's memory images (issue 14), one lab host with
# /var/lib/libvirt on a loop ext4 -O encrypt (LAB_FSCRYPT_LIBVIRT=1):
#   `host protect` (no --dir) encrypts the swtpm, save, dump and NVRAM
#   directories and makes /var/lib/libvirt/qemu/nkp-saves; on an encrypted
#   running guest whose memory holds its marker:
#   `virsh managedsave` / `virsh save` into nkp-saves / `virsh dump
#   --memory-only` into the dump directory: the file holds the marker (read
#   through the filesystem) but the raw image of the filesystem does not (a
#   clear control file is found there); `virsh start` / `virsh restore`
#   resume the guest (its tick counter goes on, no new boot);
#   `host unprotect` refused while a VM runs;
#   "reboot" without the provider (provider deleted, key cache flushed, the
#   filesystem remounted so its fscrypt key is gone): the directories are
#   locked, libvirt does not see the managed-save image, the start of the
#   managed-saved VM AND of a plain VM is refused with the line and the fix,
#   hostkey-locked alarm, the image unreadable (ENOKEY), nothing deleted;
#   provider restore + host unlock: the VM resumes from its image;
#   libvirt-guests (Debian's real libvirt-guests.sh, ON_SHUTDOWN=suspend):
#   stop saves the VM into the protected directory (no marker in the raw
#   image), a reboot with the provider (`nkpctl host load-key`, what
#   nkp-host-unlock.service runs before libvirtd), start resumes it;
#   `host unprotect --dir` of the save directory holding an image keeps it
#   (the VM resumes from it), `host protect --dir` converts it back and
#   `host status` says once to run fstrim.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
GUESTS_SH=/usr/lib/libvirt/libvirt-guests.sh
lab_test t-nkp-hostkey "managed save, save, dump, libvirt-guests under the host key; locked after a reboot without the provider" \
    --needs python3 --needs mkfs.ext4 --built libvirt-hooks/nkp-hook
[ -x "$GUESTS_SH" ] || skip_all "$GUESTS_SH is not installed (libvirt-clients)"
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
SAVE=/var/lib/libvirt/qemu/save
DUMP=/var/lib/libvirt/qemu/dump
OFFER=/var/lib/libvirt/qemu/nkp-saves
# raw_count MARK: copies of MARK in the raw filesystem image (what a stolen disk shows)
raw_count() {
    python3 - "$(lab_fscrypt_image a)" "$1" <<'PY'
import mmap, sys
with open(sys.argv[1], "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
    n, i, needle = 0, 0, sys.argv[2].encode()
    while (i := m.find(needle, i)) >= 0:
        n, i = n + 1, i + 1
    print(n)
PY
}
# file_count PATH MARK: copies of MARK in PATH read through the filesystem, inside the host
file_count() { lab_exec a python3 -c 'import sys; print(open(sys.argv[1], "rb").read().count(sys.argv[2].encode()))' "$1" "$2"; }
# no_clear_copy WHAT PATH: PATH holds the marker in clear at the file level, the raw image holds none
no_clear_copy() {
    local n
    n=$(file_count "$2" "$mark") || fail "$1: cannot read $2"
    [ "$n" -ge 1 ] || fail "$1: $2 does not hold the guest's marker (not guest memory?)"
    [ "$(raw_count "$mark")" = 0 ] || fail "$1: the marker is in clear in the raw image of /var/lib/libvirt"
    echo "$n"
}
last_tick() { lab_ticks a "$dom" | tail -n1; }
# Before a resume: the serial log goes, so a cold boot would show its boot lines there.
fresh_serial() { rm -f "$(lab_serial_path a "$dom")"; }
# resumed CONTEXT TICK: the guest runs on from TICK (a later tick, no new boot line)
resumed() {
    local i t
    for ((i = 0; i < 300; i++)); do
        t=$(last_tick); [ -n "$t" ] && [ "$t" -gt "$2" ] && break
        sleep 0.2
    done
    [ -n "$t" ] && [ "$t" -gt "$2" ] || fail "$1: the guest does not tick on after $2 (last: ${t:-none})"
    ! grep -q 'NKP-MARKERS-WRITTEN\|NKP-DISK-MARKER' <<<"$(lab_serial_lines a "$dom")" || fail "$1: the guest booted again instead of resuming"
}
wait_tick() { # the guest ticks: its last tick number
    local i t=
    for ((i = 0; i < 300; i++)); do t=$(last_tick); [ -n "$t" ] && break; sleep 0.2; done
    [ -n "$t" ] || fail "the guest does not tick"
    echo "$t"
}

t0=$(lab_now)
lab_test_init
LAB_FSCRYPT_LIBVIRT=1 LAB_FSCRYPT_SIZE=1G lab_host_create a || fail "host a"
lab_install_nkp a "$BUILD"
lab_host_start a || fail "host a did not start"
pass "host a up: /var/lib/libvirt on a loop ext4 -O encrypt ($(lab_since "$t0") s)"

umask 077
printf 'lab password hostkey\n' > "$LAB_DIR/pw"
nk provider create p1 >/dev/null || fail "provider create"
nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default p1 >/dev/null || fail "set-default"

# ---- host protect: the defaults ------------------------------------------------------------
lab_exec a rmdir "$DUMP" || fail "rmdir $DUMP (to see host protect make it)"
out=$(nk host protect 2>&1) || fail "host protect: $out"
st=$(nk host status) || fail "host status"
for d in /var/lib/libvirt/swtpm "$SAVE" "$DUMP" /var/lib/libvirt/qemu/nvram "$OFFER"; do
    grep -Eq "^  $d +unlocked$" <<<"$st" || fail "host status does not show $d unlocked: $st"
done
[ "$(lab_exec a stat -c '%a %U' "$OFFER" "$DUMP")" = $'750 root\n755 root' ] ||
    fail "modes/owners of the made directories: $(lab_exec a stat -c '%n %a %U' "$OFFER" "$DUMP")"
pass "host protect: swtpm, save, dump (made again), nvram and nkp-saves (made) unlocked under the host key"

# ---- an encrypted guest that holds its marker in memory ----------------------------------
dom=g1
mark="NKPHK$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M
lab_guest_xml --name "$dom" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
lab_vm_encrypt a "$dom"
boot_and_write a "$dom" "$mark"
tick=$(wait_tick)
ctl="NKPCTL$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
lab_exec a sh -c "echo $ctl > /var/lib/libvirt/control.txt"
[ "$(raw_count "$ctl")" -ge 1 ] || fail "control: a clear file's content is not visible in the raw image"
pass "$dom encrypted and running; control: a clear file on the same filesystem is readable in the raw image"

out=$(nk host unprotect 2>&1) && fail "host unprotect ran while $dom runs"
grep -q "while VMs run ($dom)" <<<"$out" || fail "unprotect refusal: $out"
grep -Eq "^  $SAVE +unlocked$" <<<"$(nk host status)" || fail "the refused unprotect changed $SAVE"
pass "host unprotect refused while a VM runs, naming it; nothing changed"

# ---- virsh managedsave / start -----------------------------------------------------------------
t=$(lab_now)
lab_virsh a managedsave "$dom" >/dev/null || fail "managedsave"
timing "managedsave into the protected directory $(lab_since "$t") s"
n=$(no_clear_copy "managedsave" "$SAVE/$dom.save")
tick=$(last_tick)
fresh_serial
lab_virsh a start "$dom" >/dev/null || fail "start from the managed save"
resumed "start after managedsave" "$tick"
lab_exec a test ! -e "$SAVE/$dom.save" || fail "the managed-save image is still there after the restore"
pass "virsh managedsave: the image holds the marker $n times, the raw image none; virsh start resumes the guest"

# ---- virsh save into nkp-saves / restore ---------------------------------------------------------
lab_virsh a save "$dom" "$OFFER/$dom.save" >/dev/null || fail "virsh save"
n=$(no_clear_copy "virsh save" "$OFFER/$dom.save")
tick=$(last_tick)
fresh_serial
lab_virsh a restore "$OFFER/$dom.save" >/dev/null || fail "virsh restore"
resumed "virsh restore" "$tick"
lab_exec a rm -f "$OFFER/$dom.save"
pass "virsh save into $OFFER: the file holds the marker $n times, the raw image none; virsh restore resumes"

# ---- virsh dump --memory-only into the dump directory ------------------------------------------
lab_virsh a dump "$dom" "$DUMP/$dom.core" --memory-only >/dev/null || fail "virsh dump"
n=$(no_clear_copy "virsh dump" "$DUMP/$dom.core")
lab_exec a rm -f "$DUMP/$dom.core"
pass "virsh dump --memory-only into $DUMP: the dump holds the marker $n times, the raw image none"

# ---- a reboot without the provider: locked, nothing deleted --------------------------------------
lab_virsh a managedsave "$dom" >/dev/null || fail "managedsave before the reboot"
qemu-img create -q -f qcow2 "$LAB_DIR/shared/plain.qcow2" 16M
lab_guest_xml --name plain --disk "$LAB_DIR/shared/plain.qcow2" --no-tpm > "$LAB_DIR/plain.xml"
lab_virsh a define "$LAB_DIR/plain.xml" >/dev/null || fail "define plain"
nk provider delete p1 --force >/dev/null 2>&1 || fail "provider delete --force"
lab_host_stop a
nk host flush-cache >/dev/null || fail "host flush-cache"
lab_fscrypt_remount a || fail "remount /var/lib/libvirt"
lab_host_start a || fail "host a did not come back"
grep -Eq "^  $SAVE +locked$" <<<"$(nk host status)" || fail "after the reboot $SAVE is not locked: $(nk host status)"
out=$(nk host load-key 2>&1) && fail "host load-key succeeded without the provider: $out"
grep -q "nkpctl provider restore" <<<"$out" || fail "load-key line: $out"
listing=$(lab_exec a ls -l "$SAVE")
[ "$(lab_exec a ls "$SAVE" | wc -l)" = 1 ] || fail "the locked save directory: $listing"
lab_exec a test ! -e "$SAVE/$dom.save" || fail "the image's clear name is visible while locked"
grep -Eq '^Managed save: +no' <<<"$(lab_virsh a dominfo "$dom")" ||
    fail "libvirt sees the managed-save image while locked: $(lab_virsh a dominfo "$dom")"
enc=$(lab_exec a ls "$SAVE")
errno=$(lab_exec a python3 -c 'import sys
try:
    open(sys.argv[1], "rb").read(1); print("readable")
except OSError as e:
    print(e.errno)' "$SAVE/$enc")
[ "$errno" = 126 ] || fail "the locked image: open gave '$errno', want ENOKEY (126)"
for vm in "$dom" plain; do
    if err=$(lab_virsh a start "$vm" 2>&1); then fail "$vm started while the host key's directories are locked"; fi
    echo "# virsh start $vm: $err"
    grep -q "nkp: VM '$vm' cannot start: the host key's directories are locked" <<<"$err" || fail "$vm: refusal line: $err"
    grep -q "nkpctl provider restore" <<<"$err" && grep -q "nkpctl host unlock" <<<"$err" || fail "$vm: refusal lacks the fix: $err"
    [ "$(lab_domstate a "$vm")" = "shut off" ] || fail "$vm is not shut off after the refusal"
done
grep -q "hostkey-locked" <<<"$(nk alarms)" || fail "no hostkey-locked alarm: $(nk alarms 2>&1)"
[ "$(lab_exec a ls -l "$SAVE")" = "$listing" ] || fail "the refused starts changed the save directory"
pass "reboot without the provider: directories locked, libvirt sees no managed save (it would cold-boot), starts of $dom and of a plain VM refused with the line and the fix, alarm, image unreadable (ENOKEY), nothing deleted"

nk provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider restore"
out=$(nk host unlock 2>&1) || fail "host unlock: $out"
grep -Eq "^  $SAVE +unlocked$" <<<"$(nk host status)" || fail "host unlock did not unlock $SAVE"
grep -q "hostkey-locked" <<<"$(nk alarms 2>/dev/null)" && fail "hostkey-locked alarm still there after unlock"
tick=$(last_tick)
fresh_serial
lab_virsh a start "$dom" >/dev/null || fail "start after restore + unlock"
resumed "start after restore + unlock" "$tick"
pass "provider restore + host unlock: the managed-saved VM resumes from its image"

# ---- libvirt-guests: ON_SHUTDOWN=suspend, reboot with the provider, ON_BOOT=start ----------------
printf 'ON_BOOT=start\nON_SHUTDOWN=suspend\nURIS=default\n' > "$LAB_DIR/libvirt-guests"
lab_exec a mount --bind "$LAB_DIR/libvirt-guests" /etc/default/libvirt-guests || fail "libvirt-guests config"
tick=$(last_tick)
out=$(lab_exec a "$GUESTS_SH" stop 2>&1) || fail "libvirt-guests.sh stop: $out"
echo "# libvirt-guests stop: $(tr '\n' ' ' <<<"$out")"
[ "$(lab_domstate a "$dom")" = "shut off" ] || fail "libvirt-guests stop did not suspend $dom"
n=$(no_clear_copy "libvirt-guests stop" "$SAVE/$dom.save")
lab_host_stop a
nk host flush-cache >/dev/null || fail "host flush-cache"
lab_fscrypt_remount a || fail "remount /var/lib/libvirt"
grep -Eq "^  $SAVE +locked$" <<<"$(nk host status)" || fail "not locked after the second reboot"
out=$(nk host load-key 2>&1) || fail "host load-key (the boot unit's command): $out"
lab_host_start a || fail "host a did not come back"
lab_exec a mount --bind "$LAB_DIR/libvirt-guests" /etc/default/libvirt-guests 2>/dev/null || true
fresh_serial
out=$(lab_exec a "$GUESTS_SH" start 2>&1) || fail "libvirt-guests.sh start: $out"
echo "# libvirt-guests start: $(tr '\n' ' ' <<<"$out")"
resumed "libvirt-guests start" "$tick"
pass "libvirt-guests.sh stop (suspend): image in $SAVE, marker $n times in it, none in the raw image; reboot + host load-key (before libvirtd); start resumes"

# ---- unprotect / protect again a save directory holding an image ----------------------------------
lab_virsh a managedsave "$dom" >/dev/null || fail "managedsave before unprotect"
sum=$(lab_exec a sha256sum "$SAVE/$dom.save" | cut -d' ' -f1)
out=$(nk host unprotect --dir "$SAVE" 2>&1) || fail "host unprotect --dir $SAVE: $out"
st=$(nk host status)
! grep -q "^  $SAVE " <<<"$st" || fail "$SAVE still listed as protected: $st"
[ "$(lab_exec a sha256sum "$SAVE/$dom.save" | cut -d' ' -f1)" = "$sum" ] || fail "unprotect changed the image"
[ "$(raw_count "$mark")" -ge 1 ] || fail "after unprotect the image is still not in clear (was the directory really turned plain?)"
lab_exec a sh -c "ls -d $SAVE.nkp-* 2>/dev/null" && fail "unprotect left siblings"
out=$(nk host protect --dir "$SAVE" 2>&1) || fail "host protect --dir $SAVE (with an image): $out"
grep -q "run fstrim" <<<"$out" || fail "protect of a non-empty directory does not say to run fstrim: $out"
st=$(nk host status)
grep -q "run fstrim on /var/lib/libvirt ($SAVE)" <<<"$st" || fail "host status does not say to run fstrim: $st"
grep -q fstrim <<<"$(nk host status)" && fail "host status says fstrim twice"
[ "$(lab_exec a sha256sum "$SAVE/$dom.save" | cut -d' ' -f1)" = "$sum" ] || fail "protect changed the image"
tick=$(last_tick)
fresh_serial
lab_virsh a start "$dom" >/dev/null || fail "start after unprotect + protect"
resumed "start after unprotect + protect" "$tick"
pass "host unprotect --dir $SAVE kept the image (in clear now), protect converted it back (fstrim said once); the VM resumes"

lab_test_done
