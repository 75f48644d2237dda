#!/bin/bash
# Clones of an nkp VM (issue 16, docs/snapshots-clones.md), lab host a,
# the real guest, nkpd running:
#   virt-clone, and virtinst's Cloner driven as virt-manager's Clone dialog
#   drives it, fail closed on an nkp VM in libvirt 9.0's storage driver
#   (the documented line): no clone defined, no new disk file, the original
#   untouched (and it still boots with its markers at the end);
#   virt-clone --preserve-data and --skip-copy=vda define a clone carrying
#   the original's keysafe: nkpd raises vm-foreign-keysafe naming the
#   original and the fix and does not rewrite it, its start is refused with
#   one line naming `nkpctl vm clone`, nothing changed;
#   nkpctl vm clone makes one: new UUID, keysafe bound to it, new secret
#   UUIDs, LUKS disk under a NEW key (the original's key does not open it,
#   the clone's does and finds the original's disk marker), no marker in
#   clear; the clone boots (fresh vTPM, as virt-clone's) and reads its
#   markers on the next boot; the original still boots with its own;
#   nkpctl vm clone --same-keys: the file copied as it is, the original's
#   DEK (its key opens the clone's disk and finds the marker, also after
#   the clone's boot), keysafe bound to the clone's UUID, new secret UUIDs,
#   no marker in clear; the clone boots; a definition copied by hand with
#   the original's keysafe is refused at start with nkp's line.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-clone "nkpctl vm clone (new or same keys): encrypted, boots; virt-clone fails closed; copied keysafes alarmed and refused" \
    --built libvirt-hooks/nkp-hook --built tests/test-domain --needs qemu-io --needs virt-clone
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
in_clear() { grep -a -c "$1" "${@:2}" | awk -F: '{s+=$NF} END{print s+0}'; }
dek_of() { # DOMAIN: the hex DEK of its disk vda
    lab_virsh a dumpxml --inactive "$1" | lab_exec a "$BUILD/tests/test-domain" --dump-keys / \
        | awk '$1 == "dek:disk:vda" {print $2}'
}
sector0() { # FILE KEYFILE: the disk's first sector, read with that key (or qemu-img's error)
    rm -f "$LAB_DIR/s0.raw"
    qemu-img dd --object "secret,id=s0,file=$2" --image-opts \
        if="driver=qcow2,file.filename=$1,encrypt.key-secret=s0" of="$LAB_DIR/s0.raw" bs=512 count=1 2>&1 \
        && tr -d '\000' < "$LAB_DIR/s0.raw"
}

lab_test_init
lab_host_with_p1 a

dom=g1
mark="NKPCLONE$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/g1.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name g1 --disk "$disk" --marker "$mark" > "$LAB_DIR/g1.xml"
lab_virsh a define "$LAB_DIR/g1.xml" >/dev/null || fail "define"
lab_vm_encrypt a g1
boot_and_write a g1 "$mark"
lab_virsh a destroy g1 >/dev/null
lab_wait_domstate a g1 "shut off" 30 || fail "not shut off"
pass "g1 encrypted, first boot wrote its markers"
nkpd_start   # after the conversion: it would enrol the new definition itself
lab_at_exit nkpd_stop
g1_state() { sha256sum "$disk" | cut -d' ' -f1; lab_virsh a dumpxml --inactive g1; }
g1_before=$(g1_state)
shared_files() { ls "$LAB_DIR/shared" | sort; }
files_before=$(shared_files)

# ---- virt-clone (virt-manager's Clone): libvirt 9.0 refuses, as documented ----------
err=$(lab_exec a timeout 120 virt-clone --connect qemu:///system --original g1 --name g1v \
      --file "$LAB_DIR/shared/g1v.qcow2" 2>&1) && fail "virt-clone of an nkp VM succeeded (update the docs): $err"
echo "# virt-clone: $(grep -m1 -i error <<<"$err")"
grep -q "A single <secret type='passphrase'...> element is expected" <<<"$err" || fail "virt-clone failed otherwise: $err"
lab_virsh a dominfo g1v >/dev/null 2>&1 && fail "virt-clone left g1v defined"
no_alarm_for() { # NAME: nkpd clears the alarm of a definition that went away
    local i
    for ((i = 0; i < 50; i++)); do nk alarms | grep_q -F "VM '$1' carries" || return 0; sleep 0.2; done
    fail "the vm-foreign-keysafe alarm of $1 (defined, then undefined by virt-clone) stayed: $(nk alarms)"
}
no_alarm_for g1v
[ "$(shared_files)" = "$files_before" ] || fail "virt-clone left files: $(diff <(echo "$files_before") <(shared_files))"
pass "virt-clone fails in libvirt's storage driver (documented) and leaves no clone, no file"

# virt-manager's Clone dialog (virtManager/clone.py, 4.1): a Cloner for the
# source, the clone's name, each disk "clone" to a new path, prepare(),
# start_duplicate().
cloner_py='
import sys
sys.path.insert(0, "/usr/share/virt-manager")
from virtinst import VirtinstConnection, Cloner
conn = VirtinstConnection("qemu:///system")
conn.open(None, None)
cloner = Cloner(conn, src_name="g1")
cloner.set_clone_name("g1m")
for info in cloner.get_nonshare_diskinfos():
    info.set_clone_requested()
    info.set_new_path(sys.argv[1], True)
    info.raise_error()
cloner.prepare()
cloner.start_duplicate(None)
'
err=$(lab_exec a timeout 120 /usr/bin/python3 -c "$cloner_py" "$LAB_DIR/shared/g1m.qcow2" 2>&1) \
    && fail "virtinst's Cloner cloned an nkp VM (update the docs): $err"
echo "# Cloner: $(tail -n1 <<<"$err")"
grep -q "A single <secret type='passphrase'...> element is expected" <<<"$err" || fail "the Cloner failed otherwise: $err"
lab_virsh a dominfo g1m >/dev/null 2>&1 && fail "the Cloner left g1m defined"
[ "$(shared_files)" = "$files_before" ] || fail "the Cloner left files: $(diff <(echo "$files_before") <(shared_files))"
[ "$(g1_state)" = "$g1_before" ] || fail "g1's disk or definition changed"
no_alarm_for g1m
pass "virtinst's Cloner as virt-manager's Clone drives it fails the same way: no clone, no file, g1 untouched"

# ---- virt-clone --preserve-data / --skip-copy: the original's keysafe in a new UUID ---------
foreign_clone() { # NAME: nkpd's alarm, definition left alone, start refused, nothing changed
    local x0 al i err
    x0=$(lab_virsh a dumpxml --inactive "$1")
    for ((i = 0; i < 50; i++)); do
        nk alarms | grep_q -F "VM '$1' carries the nkp keysafe of VM 'g1'" && break
        sleep 0.2
    done
    al=$(nk alarms)
    grep_q "vm-foreign-keysafe" <<<"$al" && grep_q -F "VM '$1' carries the nkp keysafe of VM 'g1' (UUID $ouuid)" <<<"$al" \
        && grep_q -F "nkpctl vm clone 'g1' '$1'" <<<"$al" || fail "$1: no vm-foreign-keysafe alarm naming g1 and the fix: $al"
    sleep 2 # nkpd's enrolment would have rewritten it by now
    [ "$(lab_virsh a dumpxml --inactive "$1")" = "$x0" ] || fail "$1: nkpd rewrote the definition"
    dom=$1
    err=$(lab_virsh a start "$1" 2>&1) && fail "$1 with g1's keysafe started"
    echo "# virsh start $1: $err"
    grep -q "nkp: VM '$1' cannot start: its nkp keysafe was made for the VM UUID '$ouuid'" <<<"$err" \
        && grep -q "nkpctl vm clone SOURCE '$1'" <<<"$err" || fail "$1 refused otherwise: $err"
    [ "$(lab_virsh a domstate "$1")" = "shut off" ] || fail "$1 runs"
    [ "$(g1_state)" = "$g1_before" ] || fail "g1's disk or definition changed"
    lab_virsh a undefine "$1" >/dev/null || fail "undefine $1"
    no_alarm_for "$1"
}
ouuid=$(lab_virsh a domuuid g1 | tr -d '[:space:]')
cp --sparse=always "$disk" "$LAB_DIR/shared/g1p.qcow2"
out=$(lab_exec a timeout 120 virt-clone --connect qemu:///system --original g1 --name g1p \
      --preserve-data --file "$LAB_DIR/shared/g1p.qcow2" 2>&1) || fail "virt-clone --preserve-data: $out"
lab_virsh a dumpxml --inactive g1p | grep_q "<vm uuid=.$ouuid" || fail "g1p does not carry g1's keysafe"
foreign_clone g1p
rm -f "$LAB_DIR/shared/g1p.qcow2"
pass "virt-clone --preserve-data: defined with g1's keysafe; nkpd alarms (naming g1 and nkpctl vm clone), leaves it alone; its start is refused naming the fix; undefined, the alarm goes"
out=$(lab_exec a timeout 120 virt-clone --connect qemu:///system --original g1 --name g1k \
      --skip-copy=vda --auto-clone 2>&1) || fail "virt-clone --skip-copy=vda: $out"
lab_virsh a dumpxml --inactive g1k | grep_q "<source file='$disk'" || fail "g1k does not share g1's disk"
foreign_clone g1k
pass "virt-clone --skip-copy=vda (g1's own disk file): the same alarm and refusal, g1 untouched"
[ "$(shared_files)" = "$files_before" ] || fail "files left: $(diff <(echo "$files_before") <(shared_files))"

# ---- nkpctl vm clone -------------------------------------------------------------------
clone="$LAB_DIR/shared/g1c.qcow2"
t=$(lab_now)
out=$(nk vm clone g1 g1c --file "vda=$clone" 2>&1) || fail "vm clone: $out"
timing "vm clone (64 MiB disk) $(lab_since "$t") s"
echo "# $out"
ox=$(lab_virsh a dumpxml --inactive g1); cx=$(lab_virsh a dumpxml --inactive g1c)
ouuid=$(sed -n 's|.*<uuid>\(.*\)</uuid>.*|\1|p' <<<"$ox"); cuuid=$(sed -n 's|.*<uuid>\(.*\)</uuid>.*|\1|p' <<<"$cx")
[ -n "$cuuid" ] && [ "$cuuid" != "$ouuid" ] || fail "clone UUID '$cuuid' (original '$ouuid')"
secs() { grep -o "uuid='[0-9a-f-]*'" <<<"$1" | sort -u; }
[ -z "$(comm -12 <(secs "$ox") <(secs "$cx"))" ] || fail "the clone shares secret UUIDs with g1: $(comm -12 <(secs "$ox") <(secs "$cx"))"
grep -q "<source file='$clone'" <<<"$cx" || fail "the clone's disk is not $clone"
qemu-img info "$clone" | grep_q 'encrypted: yes' || fail "the clone's disk is not LUKS"
st=$(nk --json vm status g1c) || fail "vm status g1c"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="p1", d' <<<"$st" \
    || fail "vm status g1c: $st"
[ "$(in_clear "$mark" "$clone")" = 0 ] || fail "the marker is in clear in the clone's disk"
dek_of g1 > "$LAB_DIR/k.orig"; dek_of g1c > "$LAB_DIR/k.clone"
[ -s "$LAB_DIR/k.orig" ] && [ -s "$LAB_DIR/k.clone" ] || fail "cannot read the DEKs back"
cmp -s "$LAB_DIR/k.orig" "$LAB_DIR/k.clone" && fail "the clone has the original's DEK"
tr -d '\n' < "$LAB_DIR/k.orig" > "$LAB_DIR/k1"; tr -d '\n' < "$LAB_DIR/k.clone" > "$LAB_DIR/k2"
out=$(sector0 "$clone" "$LAB_DIR/k1") && fail "the original's key opens the clone's disk: $out"
grep -qi "invalid password" <<<"$out" || fail "original key on the clone: $out"
out=$(sector0 "$clone" "$LAB_DIR/k2") || fail "the clone's key does not open its disk: $out"
grep -q "NKPDISK1 $mark" <<<"$out" || fail "the clone's disk does not hold the original's marker: $out"
rm -f "$LAB_DIR"/k1 "$LAB_DIR"/k2 "$LAB_DIR"/k.orig "$LAB_DIR"/k.clone
pass "vm clone: new UUID, new secret UUIDs, LUKS under a new DEK (the original's does not open it), the original's disk marker inside, none in clear"

# Like virt-clone, vm clone keeps file paths it is not asked to change: the
# serial log too.  Give the clone its own, as an administrator would.
lab_virsh a dumpxml --inactive g1c | sed "s|/nkp-guest/g1.serial|/nkp-guest/g1c.serial|" > "$LAB_DIR/g1c.xml"
lab_virsh a define "$LAB_DIR/g1c.xml" >/dev/null || fail "define g1c with its own serial log"
dom=g1c
boot_and_write a g1c "$mark" "clone (fresh vTPM)"
lab_virsh a destroy g1c >/dev/null
lab_wait_domstate a g1c "shut off" 30 || fail "clone not shut off"
boot_and_read a g1c "$mark"
[ "$(in_clear "$mark" "$clone")" = 0 ] || fail "the marker is in clear in the clone's disk after its boots"
dom=g1
boot_and_read a g1 "$mark"
pass "the clone boots (fresh vTPM, as virt-clone's clones) and reads its markers; the original still boots with its own"

# ---- nkpctl vm clone --same-keys -------------------------------------------------------------
sclone="$LAB_DIR/shared/g1s.qcow2"
t=$(lab_now)
out=$(nk vm clone g1 g1s --same-keys --file "vda=$sclone" 2>&1) || fail "vm clone --same-keys: $out"
timing "vm clone --same-keys (64 MiB disk) $(lab_since "$t") s"
echo "# $out"
sx=$(lab_virsh a dumpxml --inactive g1s)
suuid=$(sed -n 's|.*<uuid>\(.*\)</uuid>.*|\1|p' <<<"$sx")
[ -n "$suuid" ] && [ "$suuid" != "$ouuid" ] || fail "same-keys clone UUID '$suuid'"
grep -q "<vm uuid=.$suuid" <<<"$sx" || fail "the same-keys clone's keysafe is not bound to its UUID $suuid"
[ -z "$(comm -12 <(secs "$ox") <(secs "$sx"))" ] || fail "the same-keys clone shares secret UUIDs with g1"
grep -q "<source file='$sclone'" <<<"$sx" || fail "the same-keys clone's disk is not $sclone"
qemu-img info "$sclone" | grep_q 'encrypted: yes' || fail "the same-keys clone's disk is not LUKS"
[ "$(in_clear "$mark" "$sclone")" = 0 ] || fail "the marker is in clear in the same-keys clone's disk"
dek_of g1 > "$LAB_DIR/k.orig"; dek_of g1s > "$LAB_DIR/k.clone"
[ -s "$LAB_DIR/k.orig" ] && cmp -s "$LAB_DIR/k.orig" "$LAB_DIR/k.clone" || fail "the same-keys clone does not have g1's DEK"
tr -d '\n' < "$LAB_DIR/k.orig" > "$LAB_DIR/k1"
out=$(sector0 "$sclone" "$LAB_DIR/k1") || fail "g1's key does not open the same-keys clone's disk: $out"
grep -q "NKPDISK1 $mark" <<<"$out" || fail "the same-keys clone's disk does not hold g1's marker: $out"
st=$(nk --json vm status g1s) || fail "vm status g1s"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="p1", d' <<<"$st" \
    || fail "vm status g1s: $st"
pass "vm clone --same-keys: new UUID and secret UUIDs, keysafe bound to the clone, g1's DEK opens its disk and finds g1's marker, none in clear"
lab_virsh a dumpxml --inactive g1s | sed "s|/nkp-guest/g1.serial|/nkp-guest/g1s.serial|" > "$LAB_DIR/g1s.xml"
lab_virsh a define "$LAB_DIR/g1s.xml" >/dev/null || fail "define g1s with its own serial log"
dom=g1s
boot_and_write a g1s "$mark" "same-keys clone (fresh vTPM)"
lab_virsh a destroy g1s >/dev/null
lab_wait_domstate a g1s "shut off" 30 || fail "same-keys clone not shut off"
out=$(sector0 "$sclone" "$LAB_DIR/k1") && grep -q "NKPDISK1 $mark" <<<"$out" || fail "after its boot, g1's key does not open the same-keys clone: $out"
[ "$(in_clear "$mark" "$sclone")" = 0 ] || fail "the marker is in clear in the same-keys clone's disk after its boot"
rm -f "$LAB_DIR"/k1 "$LAB_DIR"/k.orig "$LAB_DIR"/k.clone
pass "the same-keys clone boots (its disk opened under its own secret) and stays LUKS under g1's DEK"

# ---- a definition copied by hand with g1's keysafe ----------------------------------------
dom=g1h
hx=$(sed -e "s|<name>g1</name>|<name>g1h</name>|" -e "s|<uuid>$ouuid</uuid>|<uuid>$(cat /proc/sys/kernel/random/uuid)</uuid>|" <<<"$ox")
printf '%s\n' "$hx" > "$LAB_DIR/g1h.xml"
lab_virsh a define "$LAB_DIR/g1h.xml" >/dev/null || fail "define the hand copy"
err=$(lab_virsh a start g1h 2>&1) && fail "a hand copy with another VM's keysafe started"
echo "# virsh: $err"
grep -q "nkp: VM 'g1h' cannot start" <<<"$err" && grep -q "was made for the VM UUID '$ouuid'" <<<"$err" \
    && grep -q "nkpctl vm clone" <<<"$err" || fail "hand copy refused otherwise: $err"
pass "a definition copied by hand with g1's keysafe is refused at start with nkp's line"

lab_test_done
