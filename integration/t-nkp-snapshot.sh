#!/bin/bash
# Snapshots of an nkp VM (issue 16, docs/snapshots-clones.md), lab host a,
# the real guest:
#   nkpctl vm snapshot live (paused right after start, so the guest's first
#   writes land in the overlay) and offline: LUKS overlays, no marker in
#   clear in any file; snapshot -> stop -> start reads the markers through
#   the chain; blockcommit --active --pivot back into the base;
#   the guests write live data (lab_guest_xml --live: a sector a second,
#   "NKPLIVE <marker> n "): nkp's overlays, written while the guest runs on
#   them, hold none in clear, virsh's plain overlay does (the control); the
#   live sectors written before a stop, a commit or an encrypt-layer are read
#   back by the guest at its next boot (lab_live_kept);
#   a plain overlay made by `virsh snapshot-create-as --disk-only` of the
#   running VM (started paused) is sealed by nkpd at once: a LUKS
#   FILE.nkp-seal over it that the VM writes to (no snapshot-list entry),
#   logged, the vm-plain-layer alarm says so, before the guest writes
#   anything: then neither file holds its marker or a live sector in clear;
#   vm status names the plain layer, the start is refused with one line
#   naming it and the fix; none for nkp's own snapshots; a transient VM's
#   plain snapshot is sealed too (it stays transient); the control: with
#   [disks] seal_plain_layers = false nothing is sealed and the live
#   sectors are in clear in the plain overlay;
#   [disks] allow_plain_layers = true lets it start; nkpctl vm
#   encrypt-layer fixes the plain layer, now in the middle of the chain
#   (backing kept, the seal above still over it), the alarm goes, it starts
#   with its markers; the same for a plain overlay
#   virsh made offline (no chain in the definition: encrypt-layer reads it
#   from the qcow2 headers).  libvirt 9.0's limits (revert of
#   external snapshots, internal snapshots of LUKS qcow2) are checked as
#   documented.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-snapshot "encrypted snapshots, plain layers detected, refused, fixed" \
    --built libvirt-hooks/nkp-hook --needs qemu-img
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
luks() { qemu-img info -U "$1" 2>/dev/null | grep_q 'encrypted: yes'; }
in_clear() { grep -a -c "$1" "${@:2}" | awk -F: '{s+=$NF} END{print s+0}'; }
# live_past HOST DOM N: wait until the guest wrote live sector N (fail after 60 s)
live_past() { lab_live_wait "$1" "$2" "$3" || fail "$2 wrote no live sector $3 in 60 s (last: $(lab_live_written "$1" "$2"))"; }

lab_test_init
lab_host_with_p1 a

new_vm() { # NAME MARK
    local disk="$LAB_DIR/shared/$1.qcow2"
    qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
    lab_guest_xml --name "$1" --disk "$disk" --marker "$2" --live > "$LAB_DIR/$1.xml"
    lab_virsh a define "$LAB_DIR/$1.xml" >/dev/null || fail "define $1"
    lab_vm_encrypt a "$1"
}

# ---- nkpctl vm snapshot, live: the guest's first writes go to the overlay ----
dom=g1
mark="NKPSNAP$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base="$LAB_DIR/shared/g1.qcow2"
new_vm g1 "$mark"
mark2="NKPPLAIN$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
new_vm g2 "$mark2"
nkpd_start   # after the conversions: it would enrol the new definitions itself
lab_at_exit nkpd_stop
rm -f "$(lab_serial_path a g1)"
lab_virsh a start --paused g1 >/dev/null || fail "start --paused"
out=$(nk vm snapshot g1 s1 2>&1) || fail "vm snapshot (live): $out"
echo "# $out"
s1="$LAB_DIR/shared/g1.s1"
luks "$s1" || fail "the live overlay $s1 is not LUKS"
qemu-img info -U "$s1" | grep_q "backing file: $base" || fail "overlay does not back onto the base"
lab_virsh a snapshot-list g1 --name | grep_q -x s1 || fail "libvirt does not list snapshot s1"
lab_virsh a resume g1 >/dev/null || fail "resume"
lab_markers_written a g1 "$mark" || fail "first boot over the overlay: $LAB_MARKER_ERR"
live_past a g1 3    # all four written after the overlay was made (started paused)
[ "$(in_clear "$mark" "$s1" "$base")" = 0 ] || fail "the marker is in clear in the overlay or the base"
[ "$(lab_live_count "$mark" "$s1" "$base")" = 0 ] || fail "live sectors in clear in the overlay or the base"
lab_virsh a destroy g1 >/dev/null
lab_wait_domstate a g1 "shut off" 30 || fail "not shut off"
live=$(lab_live_written a g1)
pass "vm snapshot (live, atomic): LUKS overlay over the base, the guest's writes in it (markers, live sectors 0..$live), none in clear"

boot_and_read a g1 "$mark"
lab_live_kept a g1 "$live" || fail "live sector $live not read back through the chain (found: $(lab_live_found a g1 | tr '\n' ' '))"
pass "snapshot -> stop -> start: markers and the last live sector read through the encrypted chain"

# ---- offline snapshot, then commit back ---------------------------------------------
out=$(nk vm snapshot g1 s2 2>&1) || fail "vm snapshot (offline): $out"
s2="$LAB_DIR/shared/g1.s2"
luks "$s2" || fail "the offline overlay is not LUKS"
[ -z "$(nk vm status g1 | grep 'plain layer' || true)" ] || fail "vm status names a plain layer: $(nk vm status g1)"
boot_and_read a g1 "$mark" --running
# live sectors beyond any the disk held: written into s2 only, before the commit
live=$(lab_live_found a g1 | sort -n | tail -n1)
live_past a g1 $(( ${live:--1} + 2 ))
live=$(lab_live_written a g1)
[ "$(lab_live_count "$mark" "$s2")" = 0 ] || fail "live sectors in clear in the active overlay $s2"
err=$(lab_virsh a blockcommit g1 vda --active --pivot --wait 2>&1) || fail "blockcommit: $err"
chain=$(lab_virsh a dumpxml g1 | sed -n '/<disk/,/<\/disk>/p')
grep -q "<source file='$base'" <<<"$chain" || fail "after blockcommit the active layer is not the base: $chain"
grep -q "<backingStore type=" <<<"$chain" && fail "a backing layer left after blockcommit: $chain"
luks "$base" || fail "the base is no longer LUKS"
[ "$(in_clear "$mark" "$base")" = 0 ] || fail "marker in clear in the base after the commit"
lab_virsh a destroy g1 >/dev/null
lab_wait_domstate a g1 "shut off" 30 || fail "not shut off"
[ "$(lab_live_count "$mark" "$base")" = 0 ] || fail "live sectors in clear in the base after the commit"
boot_and_read a g1 "$mark"
lab_live_kept a g1 "$live" || fail "live sector $live (written in s2 before the commit) not in the base (found: $(lab_live_found a g1 | tr '\n' ' '))"
pass "offline vm snapshot (LUKS), start over 3 layers, live sectors into the top one, blockcommit --active --pivot into the base: encrypted, markers and live sector $live read"

# ---- libvirt 9.0's limits, as documented -----------------------------------------
err=$(lab_virsh a snapshot-revert g1 s1 2>&1) && fail "snapshot-revert of an external snapshot worked (docs say it does not)"
grep -q "revert to external snapshot not supported" <<<"$err" || fail "snapshot-revert: $err"
err=$(lab_virsh a snapshot-create-as g1 int0 2>&1) && fail "an internal snapshot of a shut-off nkp VM worked (docs say it does not)"
grep -q "nothing selected for snapshot" <<<"$err" || fail "internal snapshot (snapshot='no'): $err"
pass "libvirt 9.0 refuses snapshot-revert of external snapshots and offline internal snapshots of nkp disks (as documented)"

# ---- a plain overlay made behind nkp's back: nkpd seals it --------------------------
dom=g2
rm -f "$(lab_serial_path a g2)"
lab_virsh a start --paused g2 >/dev/null || fail "start --paused g2"
lab_virsh a snapshot-create-as g2 p1 --disk-only --atomic --diskspec vda,snapshot=external >/dev/null || fail "virsh snapshot-create-as"
p1="$LAB_DIR/shared/g2.p1"
seal="$p1.nkp-seal"
# nkpd, not vm status: polled up to 30 s (the seal makes a LUKS file: a
# loaded machine is slow; the wait bounds a hang, it measures nothing)
for ((i = 0; i < 150; i++)); do
    nk alarms | grep_q -F "nkpd sealed it: the guest's writes since go to the encrypted '$seal'" && break
    sleep 0.2
done
al=$(nk alarms)
echo "# $al"
grep_q -F "VM 'g2': its disk vda has a plain (unencrypted) layer '$p1'" <<<"$al" \
    || fail "nkpd raised no vm-plain-layer alarm for the plain snapshot of the running g2: $al"
grep_q -F "nkpd sealed it: the guest's writes since go to the encrypted '$seal', but what it wrote before is in clear in '$p1'" <<<"$al" \
    || fail "the alarm does not say the layer was sealed under $seal: $al"
grep_q -F "nkpctl vm encrypt-layer 'g2' '$p1'" <<<"$al" || fail "the alarm does not name encrypt-layer: $al"
# nkpd handles events in order: g1's (nkp's own live and offline snapshots,
# their starts and the commit) were looked at before g2's
grep_q -E "^vm-plain-layer +g1 " <<<"$al" && fail "nkp's own snapshots of g1 raised vm-plain-layer: $al"
# the overlay is a layer of an nkp disk, not a new plain disk (whose fix, vm encrypt --disks, is wrong here)
grep_q -E "^vm-plain-disk +g2:vda " <<<"$al" && fail "nkpd took the plain overlay for a new plain disk: $al"
grep_q -F "VM 'g2': disk vda: plain layer '$p1' sealed under '$seal'" "$LAB_DIR/nkpd.log" || fail "nkpd did not log the seal"
grep_q "plain (unencrypted) disk layer '$p1'" "$LAB_DIR/nkpd.log" || fail "nkpd did not log the plain layer"
luks "$p1" && fail "libvirt made an encrypted overlay by itself (the test's premise changed)"
luks "$seal" || fail "the seal $seal is not LUKS"
qemu-img info -U "$seal" | grep_q "backing file: $p1" || fail "the seal does not back onto $p1"
lab_virsh a dumpxml g2 | grep_q "<source file='$seal'" || fail "the running g2 does not write to $seal: $(lab_virsh a dumpxml g2 | sed -n '/<disk/,/<\/disk>/p')"
[ ! -e "$seal.nkp-new" ] || fail "the seal's temporary file was left"
snaps=$(lab_virsh a snapshot-list g2 --name | sed '/^$/d' | tr '\n' ' ')
[ "$snaps" = "p1 " ] || fail "virsh snapshot-list g2 lists more than the admin's p1: $snaps"
pass "nkpd seals virsh's plain snapshot of the running g2 at once: LUKS $seal over it, the VM writes there, no snapshot-list entry, alarm says so (fix named), logged"
lab_virsh a resume g2 >/dev/null
lab_markers_written a g2 "$mark2" || fail "g2 first boot: $LAB_MARKER_ERR"
live_past a g2 2
[ "$(in_clear "$mark2" "$p1" "$seal")" = 0 ] || fail "the guest's marker is in clear in $p1 or $seal (sealed before the guest wrote anything)"
[ "$(lab_live_count "$mark2" "$p1" "$seal")" = 0 ] || fail "live sectors in clear in $p1 or $seal"
st=$(nk vm status g2) || fail "vm status g2"
echo "# $st"
grep -q "g2: disk vda has a plain layer '$p1': nkpctl vm encrypt-layer 'g2' '$p1'" <<<"$st" || fail "vm status does not name the plain layer: $st"
# its active layer is the seal: vda is "encrypted", the plain layer below is listed
nk --json vm status g2 | python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["plain_layers"]==["vda '"$p1"'"], d
vda=[x for x in d["disks"] if x["target"]=="vda"][0]; assert vda["state"]=="encrypted", vda' \
    || fail "vm status --json: plain_layers, and vda's state encrypted (its active layer is the seal)"
lab_virsh a destroy g2 >/dev/null
lab_wait_domstate a g2 "shut off" 30 || fail "g2 not shut off"
live2=$(lab_live_written a g2)
err=$(lab_virsh a start g2 2>&1) && fail "g2 started with a plain layer"
echo "# virsh: $err"
grep -q "nkp: VM 'g2' cannot start: its disk vda has a plain (unencrypted) layer '$p1'" <<<"$err" || fail "start error: $err"
grep -q "nkpctl vm encrypt-layer 'g2' '$p1'" <<<"$err" || fail "start error lacks the fix: $err"
nk alarms | grep_q "vm-plain-layer" || fail "no vm-plain-layer alarm: $(nk alarms)"
pass "sealed g2: no marker nor live sector (0..$live2) in clear in $p1 or $seal; vm status names $p1; start refused with the fix; vm-plain-layer alarm"

conf=$(lab_path a /etc/nkp)/nkp.conf
cp "$conf" "$LAB_DIR/nkp.conf.saved"
printf '[disks]\nallow_plain_layers = true\n' >> "$conf"
lab_virsh a start g2 >/dev/null || fail "allow_plain_layers = true did not let g2 start"
lab_virsh a destroy g2 >/dev/null
lab_wait_domstate a g2 "shut off" 30 || fail "g2 not shut off"
cp "$LAB_DIR/nkp.conf.saved" "$conf"
pass "[disks] allow_plain_layers = true lets it start"

t=$(lab_now)
out=$(nk vm encrypt-layer g2 "$p1" 2>&1) || fail "vm encrypt-layer: $out"
timing "vm encrypt-layer $(lab_since "$t") s"
luks "$p1" || fail "the layer is not LUKS after encrypt-layer"
qemu-img info -U "$p1" | grep_q "backing file: $LAB_DIR/shared/g2.qcow2" || fail "encrypt-layer lost the backing reference"
[ ! -e "$p1.nkp-new" ] || fail "encrypt-layer left $p1.nkp-new"
qemu-img info -U "$seal" | grep_q "backing file: $p1" || fail "the seal no longer backs onto $p1"
nk vm status g2 | grep_q "plain layer" && fail "vm status still names a plain layer"
nk alarms | grep_q "vm-plain-layer" && fail "the vm-plain-layer alarm stayed"
out=$(nk vm encrypt-layer g2 "$p1" 2>&1) && fail "a second encrypt-layer succeeded"
grep -q "is not a plain layer" <<<"$out" || fail "second encrypt-layer: $out"
boot_and_read a g2 "$mark2"
lab_live_kept a g2 "$live2" || fail "live sector $live2 lost by encrypt-layer (found: $(lab_live_found a g2 | tr '\n' ' '))"
pass "vm encrypt-layer of $p1 in the middle of the chain (sealed): LUKS in place, backing kept, alarm cleared, the VM starts with its markers and live sector $live2"

# ---- a plain overlay made offline by virsh (libvirt writes no chain) ----------------
dom=g1
lab_virsh a snapshot-create-as g1 p2 --disk-only --diskspec vda,snapshot=external >/dev/null || fail "virsh snapshot-create-as (offline)"
p2="$LAB_DIR/shared/g1.p2"
luks "$p2" && fail "libvirt made an encrypted offline overlay by itself (the test's premise changed)"
err=$(lab_virsh a start g1 2>&1) && fail "g1 started with a plain offline overlay"
echo "# virsh: $err"
grep -q "plain (unencrypted) layer '$p2'\|Unexpected enum value 0 for virStorageEncryptionEngine" <<<"$err" \
    || fail "start with an offline plain overlay: $err"
nk vm status g1 | grep_q "plain layer '$p2'" || fail "vm status does not name $p2: $(nk vm status g1)"
out=$(nk vm encrypt-layer g1 "$p2" 2>&1) || fail "vm encrypt-layer (offline overlay): $out"
luks "$p2" || fail "the offline layer is not LUKS after encrypt-layer"
lab_virsh a dumpxml --inactive g1 | grep_q "<source file='$base'>" || fail "the chain below $p2 is not in the definition"
boot_and_read a g1 "$mark"
pass "offline plain overlay by virsh: start refused, named by vm status; encrypt-layer (chain from the qcow2 headers) fixes it, markers read"

# ---- a transient VM: libvirt rewrites only its running definition -----------------
dom=g2
lab_virsh a dumpxml --inactive g2 > "$LAB_DIR/g2t.xml" || fail "dumpxml g2"
lab_virsh a undefine g2 --keep-tpm --keep-nvram --snapshots-metadata >/dev/null || fail "undefine g2"
lab_virsh a create "$LAB_DIR/g2t.xml" --paused >/dev/null || fail "virsh create (transient g2)"
p3="$LAB_DIR/shared/g2.p3"
lab_virsh a snapshot-create-as g2 p3 --disk-only --atomic --diskspec "vda,snapshot=external,file=$p3" >/dev/null || fail "virsh snapshot-create-as (transient g2)"
for ((i = 0; i < 150; i++)); do # up to 30 s, as above
    nk alarms | grep_q -F "encrypted '$p3.nkp-seal'" && break
    sleep 0.2
done
nk alarms | grep_q -F "VM 'g2': its disk vda has a plain (unencrypted) layer '$p3'" \
    || fail "nkpd raised no vm-plain-layer alarm for the plain snapshot of the transient g2: $(nk alarms)"
nk alarms | grep_q -F "nkpd sealed it: the guest's writes since go to the encrypted '$p3.nkp-seal'" \
    || fail "nkpd did not seal the plain snapshot of the transient g2: $(nk alarms)"
luks "$p3.nkp-seal" || fail "the transient g2's seal is not LUKS"
lab_virsh a dumpxml g2 | grep_q "<source file='$p3.nkp-seal'" || fail "the transient g2 does not write to its seal"
[ ! -e "$(lab_path a /etc/libvirt/qemu)/g2.xml" ] || fail "the seal made the transient g2 persistent"
lab_virsh a destroy g2 >/dev/null
pass "transient VM: nkpd seals its plain snapshot from its running definition (ROOT/run/libvirt/qemu), and it stays transient"

# ---- the control: seal_plain_layers = false, the guest writes in clear ------------
dom=g1
nkpd_stop
conf=$(lab_path a /etc/nkp)/nkp.conf
printf '[disks]\nseal_plain_layers = false\n' >> "$conf"
nkpd_start
rm -f "$(lab_serial_path a g1)"
lab_virsh a start --paused g1 >/dev/null || fail "start --paused g1"
p5="$LAB_DIR/shared/g1.p5"
lab_virsh a snapshot-create-as g1 p5 --disk-only --atomic --diskspec "vda,snapshot=external,file=$p5" >/dev/null || fail "virsh snapshot-create-as (g1, control)"
for ((i = 0; i < 50; i++)); do
    nk alarms | grep_q -F "plain (unencrypted) layer '$p5'" && break
    sleep 0.2
done
nk alarms | grep_q -F "VM 'g1': its disk vda has a plain (unencrypted) layer '$p5', made behind nkp's back (virsh snapshot-create-as?), so the guest's writes land in it in clear; shut" \
    || fail "seal_plain_layers = false: no alarm, or it is not the unsealed one: $(nk alarms)"
nk alarms | grep_q -F "virsh blockcommit 'g1' vda" || fail "the unsealed alarm does not name blockcommit: $(nk alarms)"
lab_virsh a resume g1 >/dev/null
live_past a g1 2
[ ! -e "$p5.nkp-seal" ] || fail "seal_plain_layers = false: nkpd sealed $p5 all the same"
[ "$(lab_live_count "$mark" "$p5")" -gt 0 ] || fail "control: no live sector in clear in the unsealed plain overlay (the search finds nothing?)"
lab_virsh a destroy g1 >/dev/null
cp "$LAB_DIR/nkp.conf.saved" "$conf"
pass "control, [disks] seal_plain_layers = false: not sealed, the alarm names both fixes, the guest's live sectors are in clear in $p5 ($(lab_live_count "$mark" "$p5") found: the search works)"

lab_test_done
