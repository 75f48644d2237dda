#!/bin/bash
# Encrypted backups and block copies of an nkp VM, and the alarms for copies
# made behind nkp's back (issue 16; issue 14's save/dump alarms).  Two lab
# hosts, a and b, sharing $LAB_DIR/shared; provider p1 on both; nkpd on a.
#   1. nkpctl vm backup (full, then --incremental) of the running encrypted
#      guest: LUKS qcow2 images, neither marker in clear anywhere in DIR,
#      no alarm; a hostile manifest is refused and writes nothing;
#   2. nkpctl vm blockcopy: a LUKS qcow2 without the marker, no alarm;
#   3. restore-backup on a (the VM is there) refused, nothing written; on b
#      it defines the VM, which boots there with its TPM and disk markers;
#      a full backup of it shut off is LUKS too, --incremental refused;
#   4. behind nkp's back, each raises an alarm naming the VM (and the file
#      where nkpd can see it), `vm status` shows it, and the copy really
#      holds the marker in clear: virsh backup-begin (push, plain),
#      virtnbdbackup (-l copy: -l full refuses nkp's checkpoints), virsh
#      blockcopy, virsh save outside the protected directories, virsh dump;
#      a save into the host key's directories (`host protect` on a) and a
#      managed save raise none.
# The guest writes live data all along (lab_guest_xml --live: a sector a
# second, "NKPLIVE <marker> n "), and each copy is searched once the guest
# wrote more after it started: nkp's images and copy hold no live sector in
# clear, each plain copy (backup-begin, virtnbdbackup, blockcopy) holds some;
# the VM restored on b reads the last live sector written before the
# incremental (the incremental carried it).
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-backup "nkp backup full+incremental, restore on another host, blockcopy; alarms for plain backups, virtnbdbackup, blockcopy, save, dump" \
    --needs virtnbdbackup --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd
BUILD=$NKP_BUILD_DIR

nk() { local h=$1; shift; lab_exec "$h" nkpctl "$@"; }
# in_clear FILE…: the files holding the marker in clear
in_clear() { grep -l -a -F -- "$mark" "$@" 2>/dev/null || true; }
# live_now: the last live sector the guest on a reported; live_past N: wait for sector N (60 s)
live_now() { lab_live_written a "$dom"; }
live_past() { lab_live_wait a "$dom" "$1" || fail "the guest wrote no live sector $1 in 60 s (last: $(live_now))"; }
live() { lab_live_count "$mark" "$@"; }
luks() { [ "$(qemu-img info --output=json "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("format-specific",{}).get("data",{}).get("encrypt",{}).get("format",""))')" = luks ]; }
# wait_alarm KIND PATTERN: an alarm of KIND on a whose line matches PATTERN (20 s)
wait_alarm() {
    local i out
    for ((i = 0; i < 100; i++)); do
        out=$(nk a alarms 2>/dev/null | grep -F "$1" || true)
        if [ -n "$out" ] && grep -qF -- "$2" <<<"$out"; then ALARM=$out; return 0; fi
        sleep 0.2
    done
    ALARM=$(nk a alarms 2>&1 || true)
    return 1
}
no_clear_alarm() { ! nk a alarms 2>/dev/null | grep_q 'vm-clear-'; }

lab_test_init
t=$(lab_now)
# a's /var/lib/libvirt can be protected by the host key (a save there must not alarm)
LAB_FSCRYPT_LIBVIRT=1 LAB_FSCRYPT_SIZE=1G lab_host_create a || fail "host a"
lab_host_start a || fail "host a did not start"
lab_host_up b || fail "host b did not come up"
lab_install_nkp a "$BUILD"
lab_install_nkp b "$BUILD"
timing "two hosts up in $(lab_since "$t") s"

umask 077
printf 'lab password for p1\n' > "$LAB_DIR/pw"
nk a provider create p1 >/dev/null || fail "provider create"
nk a provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk a provider set-default p1 >/dev/null || fail "provider set-default"
nk b provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider restore on b"
out=$(nk a host protect 2>&1) || fail "host protect on a: $out"
OFFER=/var/lib/libvirt/qemu/nkp-saves

dom=vm1
mark="NKPBAK$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
# 768 MiB: a memory-only dump of it lasts long enough for nkpd's half-second
# look (libvirt 9.0 sends no event for dumps; a 256 MiB dump was missed once)
lab_guest_xml --name "$dom" --disk "$disk" --marker "$mark" --mem 768 --live > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
lab_vm_encrypt a "$dom"
nkpd_start   # after the conversion: it would enrol the vTPM of the new definition itself
lab_at_exit nkpd_stop
boot_and_write a "$dom" "$mark"
live_past 2
pass "encrypted guest running on a, markers and live sectors 0..$(live_now) written"

# ---- 1. nkp backup, full then incremental -----------------------------------------
bk=$LAB_DIR/shared/bk
t=$(lab_now)
out=$(nk a vm backup "$dom" "$bk" 2>&1) || fail "vm backup: $out"
timing "full backup $(lab_since "$t") s"
live_past $(( $(live_now) + 2 ))   # the guest writes on: the incremental has something to hold
inc_live=$(live_now)                # on the disk before the incremental starts
t=$(lab_now)
out=$(nk a vm backup "$dom" "$bk" --incremental 2>&1) || fail "vm backup --incremental: $out"
timing "incremental backup $(lab_since "$t") s"
live_past $(( $(live_now) + 2 ))
grep -q "level 1" <<<"$out" || fail "the incremental is not level 1: $out"
for f in "$bk/vda.0.qcow2" "$bk/vda.1.qcow2"; do luks "$f" || fail "$f is not LUKS"; done
[ -s "$bk/domain.xml" ] && [ -s "$bk/manifest" ] && [ -s "$bk/vtpm.permall" ] || fail "the backup lacks a file: $(ls "$bk")"
# (domain.xml holds the marker on the lab kernel's command line: not guest data)
[ -z "$(in_clear "$bk"/*.qcow2 "$bk"/vtpm.permall)" ] || fail "the marker is in clear in: $(in_clear "$bk"/*.qcow2 "$bk"/vtpm.permall)"
[ "$(live "$bk"/*)" = 0 ] || fail "$(live "$bk"/*) live sectors in clear in the backup"
[ "$(lab_virsh a checkpoint-list "$dom" --name | grep -c '^nkp-')" = 2 ] || fail "not two nkp checkpoints: $(lab_virsh a checkpoint-list "$dom")"
echo "# manifest: $(tr '\n' '|' < "$bk/manifest")"
sleep 3; no_clear_alarm || fail "nkp's own backup raised an alarm: $(nk a alarms)"
pass "vm backup full + incremental of the live guest: LUKS images, no marker or live sector in clear, two checkpoints, no alarm"

# a hostile manifest: refused with one line, nothing defined or written on b
cp -r "$bk" "$LAB_DIR/shared/evil"
sed -i 's/^level=1 /level=7 /' "$LAB_DIR/shared/evil/manifest"
before=$(ls "$LAB_DIR/shared")
if out=$(nk b vm restore-backup "$LAB_DIR/shared/evil" 2>&1); then fail "a damaged manifest was restored"; fi
[ "$(wc -l <<<"$out")" = 1 ] && grep -q "damaged" <<<"$out" || fail "damaged manifest: $out"
[ "$before" = "$(ls "$LAB_DIR/shared")" ] && ! lab_virsh b dominfo "$dom" >/dev/null 2>&1 || fail "a refused restore left something"
pass "a damaged manifest is refused with one line, nothing written: $out"
# an altered definition (a disk added to the VM's XML): the MAC refuses it
rm -rf "$LAB_DIR/shared/evil"; cp -r "$bk" "$LAB_DIR/shared/evil"
sed -i 's|</devices>|<disk type="file" device="disk"><source file="/etc/shadow"/><target dev="vdz"/></disk></devices>|' "$LAB_DIR/shared/evil/domain.xml"
if out=$(nk b vm restore-backup "$LAB_DIR/shared/evil" 2>&1); then fail "an altered domain.xml was restored"; fi
grep -q "was altered" <<<"$out" || fail "altered domain.xml: $out"
[ "$before" = "$(ls "$LAB_DIR/shared")" ] && ! lab_virsh b dominfo "$dom" >/dev/null 2>&1 || fail "a refused restore left something"
rm -rf "$LAB_DIR/shared/evil"
pass "an altered domain.xml is refused (MAC): $out"

# ---- 2. nkp blockcopy ------------------------------------------------------------------
copy=$LAB_DIR/shared/nkpcopy.qcow2
n0=$(live_now)
out=$(nk a vm blockcopy "$dom" vda "$copy" 2>&1) || fail "vm blockcopy: $out"
live_past $((n0 + 2))
luks "$copy" || fail "the nkp block copy is not LUKS"
[ -z "$(in_clear "$copy")" ] || fail "the marker is in clear in the nkp block copy"
[ "$(live "$copy")" = 0 ] || fail "live sectors in clear in the nkp block copy"
sleep 3; no_clear_alarm || fail "nkp's own block copy raised an alarm: $(nk a alarms)"
[ "$(lab_domstate a "$dom")" = running ] || fail "the VM stopped"
pass "vm blockcopy of the live guest: a LUKS copy, no marker or live sector in clear, no alarm, the VM runs on its own disk"

# ---- 3. restore ----------------------------------------------------------------------------
before=$(ls "$LAB_DIR/shared")
if out=$(nk a vm restore-backup "$bk" --name vm1r 2>&1); then fail "restore next to the original worked"; fi
grep -q "is defined on this host" <<<"$out" || fail "restore on a: $out"
[ "$before" = "$(ls "$LAB_DIR/shared")" ] || fail "the refused restore wrote files"
mkdir -p "$LAB_DIR/shared/b"
out=$(nk b vm restore-backup "$bk" --disk-dir "$LAB_DIR/shared/b" 2>&1) || fail "restore on b: $out"
restored=$LAB_DIR/shared/b/$dom-vda.qcow2
luks "$restored" || fail "the restored disk is not LUKS"
[ -z "$(in_clear "$restored")" ] && [ "$(live "$restored")" = 0 ] || fail "the marker or a live sector is in clear in the restored disk"
boot_and_read b "$dom" "$mark" "restored on b"
lab_live_kept b "$dom" "$inc_live" || fail "the restored disk lacks live sector $inc_live (written before the incremental; found: $(lab_live_found b "$dom" | tr '\n' ' '))"
pass "restored on b from full + incremental: encrypted, boots with its TPM and disk markers and live sector $inc_live"
# the restored VM, shut off on b: a full backup is a qemu-img copy under the same key
off=$LAB_DIR/shared/bk-off
out=$(nk b vm backup "$dom" "$off" 2>&1) || fail "backup of the shut-off VM: $out"
luks "$off/vda.0.qcow2" && [ -z "$(in_clear "$off/vda.0.qcow2")" ] && [ "$(live "$off/vda.0.qcow2")" = 0 ] \
    || fail "the offline backup is not LUKS or holds the marker or a live sector"
if out=$(nk b vm backup "$dom" "$off" --incremental 2>&1); then fail "an incremental of a shut-off VM worked"; fi
grep -q "shut off" <<<"$out" || fail "incremental of a shut-off VM: $out"
pass "shut-off VM: full backup LUKS without the marker; --incremental refused with one line"

# ---- 4. behind nkp's back ---------------------------------------------------------------------
# 4a. virsh backup-begin, push mode, default target (beside the disk, plain qcow2)
n0=$(live_now)
lab_virsh a backup-begin "$dom" >/dev/null || fail "virsh backup-begin"
wait_alarm vm-clear-copy "$dom" || fail "no alarm for virsh backup-begin: $ALARM"
live_past $((n0 + 2))
for ((i = 0; i < 300; i++)); do   # the push job ends by itself (bounds a hang, measures nothing)
    lab_virsh a domjobinfo "$dom" 2>/dev/null | grep_q -E '^Job type: +None' && break
    sleep 0.2
done
plain=$(ls "$disk".[0-9]* 2>/dev/null || true)
[ -n "$(in_clear $plain)" ] || fail "the plain backup holds no marker (nothing to alarm about?)"
[ "$(live $plain)" -gt 0 ] || fail "control: the plain backup holds no live sector (the search finds nothing?)"
lab_exec a nkpctl vm status "$dom" | grep_q "copy in clear" || fail "vm status does not show the copy"
echo "# alarm: $ALARM"
pass "virsh backup-begin: vm-clear-copy alarm, vm status shows it; its copy holds $(live $plain) live sectors in clear"
nk a alarms clear vm-clear-copy >/dev/null

# 4b. virtnbdbackup (pull mode).  -l full refuses a VM with checkpoints it
# did not make ("Foreign checkpoint found": nkp's); -l copy is the same full
# read of the disks without a checkpoint.
vnb=$LAB_DIR/shared/vnb
if lab_exec a virtnbdbackup -U qemu:///system -d "$dom" -l full -o "$vnb.full" > "$LAB_DIR/vnb.log" 2>&1; then
    note "virtnbdbackup -l full ran despite nkp's checkpoints"
else
    grep -q "Foreign checkpoint" "$LAB_DIR/vnb.log" || fail "virtnbdbackup -l full: $(tail -3 "$LAB_DIR/vnb.log")"
fi
n0=$(live_now)
lab_exec a virtnbdbackup -U qemu:///system -d "$dom" -l copy -o "$vnb" > "$LAB_DIR/vnb.log" 2>&1 \
    || fail "virtnbdbackup: $(tail -3 "$LAB_DIR/vnb.log")"
wait_alarm vm-clear-copy "$dom" || fail "no alarm for virtnbdbackup: $ALARM"
live_past $((n0 + 2))
[ -n "$(in_clear "$vnb"/*)" ] || fail "virtnbdbackup's copy holds no marker"
[ "$(live "$vnb"/*)" -gt 0 ] || fail "control: virtnbdbackup's copy holds no live sector"
echo "# alarm: $ALARM"
pass "virtnbdbackup -l copy: vm-clear-copy alarm (-l full refuses nkp's checkpoints); $(live "$vnb"/*) live sectors in clear in its copy"
nk a alarms clear vm-clear-copy >/dev/null

# 4c. virsh blockcopy, plain
pc=$LAB_DIR/shared/plaincopy.qcow2
n0=$(live_now)
lab_virsh a blockcopy "$dom" vda "$pc" --wait --finish --transient-job >/dev/null || fail "virsh blockcopy"
wait_alarm vm-clear-copy "vda" || fail "no alarm for virsh blockcopy: $ALARM"
# the copy ended (--finish) before nkpd handled READY: the destination
# comes from the status XML nkpd read while the copy ran
grep -qF -- "$pc" <<<"$ALARM" || fail "the blockcopy alarm does not name '$pc': $ALARM"
live_past $((n0 + 2))
[ -n "$(in_clear "$pc")" ] || fail "the plain block copy holds no marker"
[ "$(live "$pc")" -gt 0 ] || fail "control: the plain block copy holds no live sector"
echo "# alarm: $ALARM"
pass "virsh blockcopy: vm-clear-copy alarm naming the disk and its destination; $(live "$pc") live sectors in clear in the copy"
nk a alarms clear vm-clear-copy >/dev/null

# 4d. virsh dump, virsh save outside the protected directories
lab_virsh a dump "$dom" "$LAB_DIR/shared/vm1.core" --memory-only >/dev/null || fail "virsh dump"
if wait_alarm vm-clear-save "dumped"; then
    echo "# alarm: $ALARM"
    grep -qF "$LAB_DIR/shared/vm1.core" <<<"$ALARM" || fail "the dump alarm does not name the file: $ALARM"
    pass "virsh dump: vm-clear-save alarm naming the file"
else
    fail "no alarm for virsh dump: $ALARM"
fi
nk a alarms clear vm-clear-save >/dev/null
# the same with nkpd's periodic look of jobs off: the status XML libvirt
# writes when the dump job starts is what makes nkpd look
nkpd_stop
NKPD_ENV="NKP_TEST_COPY_WATCH_IDLE_MS=3600000" nkpd_start
lab_virsh a dump "$dom" "$LAB_DIR/shared/vm1b.core" --memory-only >/dev/null || fail "virsh dump (2)"
wait_alarm vm-clear-save "$LAB_DIR/shared/vm1b.core" || fail "no alarm naming the dump without the periodic look: $ALARM"
pass "virsh dump seen through the status XML alone (no periodic look): alarm naming the file"
nkpd_stop
nkpd_start
nk a alarms clear vm-clear-save >/dev/null
lab_virsh a save "$dom" "$LAB_DIR/shared/vm1.save" >/dev/null || fail "virsh save"
wait_alarm vm-clear-save "saved" || fail "no alarm for virsh save: $ALARM"
echo "# alarm: $ALARM"
grep -qF "$LAB_DIR/shared/vm1.save" <<<"$ALARM" || note "the save alarm does not name the file (the save was faster than nkpd's look)"
lab_exec a nkpctl vm status "$dom" | grep_q "copy in clear" || fail "vm status does not show the save"
lab_virsh a restore "$LAB_DIR/shared/vm1.save" >/dev/null || fail "virsh restore"
pass "virsh save outside the protected directories: vm-clear-save alarm, vm status shows it; restored"
nk a alarms clear vm-clear-save >/dev/null

# 4e. saves into the protected directories: no alarm
lab_virsh a save "$dom" "$OFFER/vm1.save" >/dev/null || fail "virsh save into $OFFER"
lab_virsh a restore "$OFFER/vm1.save" >/dev/null || fail "virsh restore from $OFFER"
lab_virsh a managedsave "$dom" >/dev/null || fail "virsh managedsave"
sleep 4
no_clear_alarm || fail "a save into a protected directory raised an alarm: $(nk a alarms)"
lab_virsh a start "$dom" >/dev/null || fail "start from the managed save"
pass "virsh save into $OFFER and managedsave (protected by the host key): no alarm"

lab_virsh a destroy "$dom" >/dev/null || true
lab_virsh b destroy "$dom" >/dev/null 2>&1 || true
lab_test_done
