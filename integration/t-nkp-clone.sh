#!/bin/bash
# Clones of an nkp VM (issue 16, docs/snapshots-clones.md), lab host a,
# the real guest:
#   virt-clone of an nkp VM fails in libvirt 9.0's storage driver with the
#   documented line and leaves no clone defined; nkpctl vm clone makes one:
#   new UUID, keysafe bound to it, new secret UUIDs, LUKS disk under a NEW
#   key (the original's key does not open it, the clone's does and finds
#   the original's disk marker), no marker in clear; the clone boots (fresh
#   vTPM, as virt-clone's) and reads its markers on the next boot; the
#   original still boots with its own; a definition copied by hand with the
#   original's keysafe is refused at start with nkp's line.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-clone "nkpctl vm clone: new keys, encrypted, boots; virt-clone's failure; copied keysafe refused" \
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
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
umask 077
printf 'lab password\n' > "$LAB_DIR/pw"
nk provider create p1 >/dev/null || fail "provider create"
nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "backup"
nk provider set-default p1 >/dev/null || fail "set-default"

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

# ---- virt-clone (virt-manager's Clone): libvirt 9.0 refuses, as documented ----------
err=$(lab_exec a timeout 120 virt-clone --connect qemu:///system --original g1 --name g1v \
      --file "$LAB_DIR/shared/g1v.qcow2" 2>&1) && fail "virt-clone of an nkp VM succeeded (update the docs): $err"
echo "# virt-clone: $(grep -m1 -i error <<<"$err")"
grep -q "A single <secret type='passphrase'...> element is expected" <<<"$err" || fail "virt-clone failed otherwise: $err"
lab_virsh a dominfo g1v >/dev/null 2>&1 && fail "virt-clone left g1v defined"
pass "virt-clone fails in libvirt's storage driver (documented) and leaves no clone"

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

# ---- a definition copied by hand with g1's keysafe ----------------------------------------
dom=g1h
hx=$(sed -e "s|<name>g1</name>|<name>g1h</name>|" -e "s|<uuid>$ouuid</uuid>|<uuid>$(cat /proc/sys/kernel/random/uuid)</uuid>|" <<<"$ox")
printf '%s\n' "$hx" > "$LAB_DIR/g1h.xml"
lab_virsh a define "$LAB_DIR/g1h.xml" >/dev/null || fail "define the hand copy"
err=$(lab_virsh a start g1h 2>&1) && fail "a hand copy with another VM's keysafe started"
echo "# virsh: $err"
grep -q "nkp: VM 'g1h' cannot start" <<<"$err" && grep -q "was made for the VM UUID '$ouuid'" <<<"$err" \
    || fail "hand copy refused otherwise: $err"
pass "a definition copied by hand with g1's keysafe is refused at start with nkp's line"

lab_test_done
