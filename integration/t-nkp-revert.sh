#!/bin/bash
# nkpctl vm revert (issue 16, docs/snapshots-clones.md "Reverting"), lab
# host a, the real guest with two encrypted disks (vda: its marker M1 from
# the first boot; vdb: empty until a boot whose command line says
# nkp.marker2=X writes X on it):
#   the guest writes M1; `nkpctl vm snapshot r1 s1` (offline, vdb empty);
#   a boot with nkp.marker2=M2 writes M2 on vdb (into s1's overlay); stop;
#   refusals first (VM running, no such snapshot, a layer file missing),
#   nothing changed; `nkpctl vm revert r1 s1`: a new LUKS layer per disk
#   over its state at s1, the old overlays listed as left behind, s1
#   libvirt's current snapshot, the vTPM named as kept; the guest reads M1
#   and finds vdb empty again (writes M3: the state at s1); revert twice
#   (--delete-abandoned removes the first revert's layers, s1's own files
#   untouched): vdb empty again (M4); a kill after the new overlays are
#   renamed, before the define, leaves the VM on its old chain (it boots
#   with M4 on vdb); a snapshot s2 over that state, a revert to s1 that
#   leaves s2's layers on an abandoned branch, `vm rekey --deep`: the old
#   DEKs open no file (branch included), the records of s1 and s2 name the
#   new secrets, and a revert to s2 (only on the branch) boots with M4;
#   every layer LUKS, no marker in clear in any file.
#   libvirt 9.0's own snapshot-revert of it is refused (the reason for all
#   this).
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-revert "vm revert: back to a disk-only snapshot, encrypted, twice, crash-safe" \
    --built libvirt-hooks/nkp-hook --built tests/test-domain --needs qemu-img --needs qemu-io
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
luks() { qemu-img info -U "$1" 2>/dev/null | grep_q 'encrypted: yes'; }
new_mark() { echo "NKPREV$1$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"; }
# in_clear MARK: how many times MARK is in clear in the files of the images dir
in_clear() { grep -a -c "$1" "$images"/* 2>/dev/null | awk -F: '{s+=$NF} END{print s+0}'; }
# set_marker2 X: the guest's next boots write X on an empty vdb
set_marker2() {
    lab_virsh a dumpxml --inactive "$dom" |
        sed -E "s| nkp\.marker2=[^ <]*||; s|<cmdline>([^<]*)</cmdline>|<cmdline>\1 nkp.marker2=$1</cmdline>|" \
        > "$LAB_DIR/$dom.next.xml"
    lab_virsh a define "$LAB_DIR/$dom.next.xml" >/dev/null || fail "define with nkp.marker2=$1"
}
# boot WHAT MARK2 CONTEXT: start, vda's markers M1, vdb's line NKP-DISK2-WHAT=MARK2, stop
boot() {
    local line
    boot_and_read a "$dom" "$m1" --running "$3"
    line=$(lab_wait_serial a "$dom" 'NKP-DISK2-|NKP-ERROR' 60) || fail "$3: no line for vdb"
    [ "$line" = "NKP-DISK2-$1=$2" ] || fail "$3: the guest said '$line' (want NKP-DISK2-$1=$2)"
    lab_virsh a destroy "$dom" >/dev/null
    lab_wait_domstate a "$dom" "shut off" 30 || fail "$3: not shut off"
}
# chain TARGET: the files of the disk's chain in the definition, active first
chain() {
    lab_virsh a dumpxml --inactive "$dom" | python3 -c 'import sys, xml.etree.ElementTree as E
d = E.fromstring(sys.stdin.read())
for disk in d.iter("disk"):
    if disk.find("target").get("dev") != sys.argv[1]: continue
    n = disk
    while n is not None and n.find("source") is not None:
        print(n.find("source").get("file")); n = n.find("backingStore")' "$1"
}
keys_of() { # DOM → "dek:KIND:ID HEX" lines (test-only key dump, as t-nkp-chain)
    lab_virsh a dumpxml --inactive "$1" | lab_exec a "$BUILD/tests/test-domain" --dump-keys / | grep '^dek:'
}
disk_keyfile() { # TARGET OUT: the hex DEK of r1's disk TARGET, no newline
    keys_of r1 | awk -v t="dek:disk:$1" '$1 == t {printf "%s", $2}' > "$2"
    [ -s "$2" ] || fail "no key for $1"
}
opens() { # KEYFILE FILE: qemu-io opens FILE alone (no backing) with that key
    qemu-io --object "secret,id=k,file=$1,format=raw" -r -c 'read 0 512' \
        "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$2\"},\"backing\":null,\"encrypt\":{\"key-secret\":\"k\"}}" 2>&1
}
all_luks() { # every layer of vda's and vdb's chains is LUKS
    local f
    for f in $(chain vda) $(chain vdb); do luks "$f" || fail "$1: layer $f is not LUKS"; done
}

ASSERT_ON_FAIL+=('[ -z "${dom:-}" ] || { lab_virsh a dumpxml --inactive "$dom"; lab_virsh a snapshot-list "$dom"; ls -l "$images"; } 2>&1 | sed "s/^/# state: /"')
lab_test_init
images=$LAB_DIR/shared
lab_host_with_p1 a

# ---- r1: vda (M1) and an empty vdb, both encrypted; snapshot s1; M2 on vdb after it ----
dom=r1
m1=$(new_mark A); m2=$(new_mark B); m3=$(new_mark C); m4=$(new_mark D)
vda=$images/r1.qcow2
vdb=$images/r1-vdb.qcow2
qemu-img create -q -f qcow2 "$vda" 64M
qemu-img create -q -f qcow2 "$vdb" 64M
lab_guest_xml --name r1 --disk "$vda" --marker "$m1" > "$LAB_DIR/r1.xml"
lab_virsh a define "$LAB_DIR/r1.xml" >/dev/null || fail "define r1"
lab_virsh a attach-disk r1 "$vdb" vdb --driver qemu --subdriver qcow2 --targetbus virtio --config >/dev/null ||
    fail "attach-disk vdb"
lab_vm_encrypt a r1
luks "$vda" && luks "$vdb" || fail "vm encrypt did not make both disks LUKS"
boot_and_write a r1 "$m1" "r1 first boot"
lab_virsh a destroy r1 >/dev/null
lab_wait_domstate a r1 "shut off" 30 || fail "not shut off"

out=$(nk vm snapshot r1 s1 2>&1) || fail "vm snapshot r1 s1: $out"
s1a=$images/r1.s1
s1b=$images/r1-vdb.s1
luks "$s1a" && luks "$s1b" || fail "the overlays of s1 are not LUKS"
set_marker2 "$m2"
boot WRITTEN "$m2" "after s1: the guest writes M2 on vdb"
pass "r1: M1 on vda, snapshot s1 (vdb empty), then M2 written on vdb after it"

# ---- refusals: nothing changed ------------------------------------------------------
lab_virsh a start r1 >/dev/null || fail "start r1"
err=$(nk vm revert r1 s1 2>&1) && fail "vm revert of a running VM worked"
grep -q "VM 'r1' is running; shut it off first" <<<"$err" || fail "running: $err"
lab_virsh a destroy r1 >/dev/null
lab_wait_domstate a r1 "shut off" 30 || fail "not shut off"
before=$(lab_virsh a dumpxml --inactive r1; ls -l --time-style=+%s.%N "$images")
err=$(nk vm revert r1 nosuch 2>&1) && fail "vm revert to a missing snapshot worked"
grep -q "VM 'r1' has no snapshot 'nosuch'" <<<"$err" || fail "no such snapshot: $err"
mv "$vda" "$vda.away"
err=$(nk vm revert r1 s1 2>&1) && fail "vm revert with a layer file missing worked"
mv "$vda.away" "$vda"
grep -q "snapshot 's1' needs '$vda' (disk vda), which is missing" <<<"$err" || fail "missing layer: $err"
[ "$(wc -l <<<"$err")" = 1 ] || fail "refusals are one line: $err"
after=$(lab_virsh a dumpxml --inactive r1; ls -l --time-style=+%s.%N "$images")
[ "$before" = "$after" ] || fail "a refusal changed something: $(diff <(echo "$before") <(echo "$after"))"
err=$(lab_virsh a snapshot-revert r1 s1 2>&1) && fail "libvirt reverted an external snapshot by itself (docs say it cannot)"
grep -q "revert to external snapshot not supported" <<<"$err" || fail "virsh snapshot-revert: $err"
pass "refused, nothing changed: VM running, no such snapshot, a layer file missing; virsh snapshot-revert cannot"

# ---- revert: the state at s1 -----------------------------------------------------------
set_marker2 "$m3"   # (the command line is not part of what a revert changes)
t=$(lab_now)
out=$(nk vm revert r1 s1 2>&1) || fail "vm revert r1 s1: $out"
timing "vm revert (2 disks) $(lab_since "$t") s"
echo "$out" | sed 's/^/# /'
r1a=$images/r1.s1-r1
r1b=$images/r1-vdb.s1-r1
grep -qx "  disk vda: new encrypted layer: $r1a" <<<"$out" || fail "output: vda's new layer: $out"
grep -qx "  disk vdb: new encrypted layer: $r1b" <<<"$out" || fail "output: vdb's new layer: $out"
grep -q "  disk vdb: left behind (no snapshot needs it: delete it when you no longer want it): $s1b" <<<"$out" ||
    fail "output: s1's vdb overlay not listed as left behind: $out"
grep -q "vTPM: not part of a disk-only snapshot; it keeps its current state" <<<"$out" || fail "output: vTPM: $out"
[ "$(chain vda | tr '\n' ' ')" = "$r1a $vda " ] || fail "vda's chain: $(chain vda)"
[ "$(chain vdb | tr '\n' ' ')" = "$r1b $vdb " ] || fail "vdb's chain: $(chain vdb)"
[ -e "$s1a" ] && [ -e "$s1b" ] || fail "the abandoned overlays were deleted without --delete-abandoned"
cur=$(lab_virsh a snapshot-current r1 --name 2>&1) || cur="(none: $cur)"
if grep -q "note: libvirt did not make 's1' its current snapshot" <<<"$out"; then
    note "libvirt refused to mark s1 current: $out"
else
    [ "$cur" = s1 ] || fail "libvirt's current snapshot is '$cur', not s1"
fi
all_luks "after the revert"
boot WRITTEN "$m3" "after revert to s1: vdb empty again (M3 written), vda M1"
pass "vm revert r1 s1: new LUKS layers over the state at s1, old overlays listed and kept; the guest reads M1 and finds vdb as it was at s1 (current snapshot: $cur)"

# ---- revert twice, deleting what no snapshot needs --------------------------------------
set_marker2 "$m4"
out=$(nk --json vm revert r1 s1 --delete-abandoned 2>&1) || fail "second vm revert: $out"
echo "# $out"
r2a=$images/r1.s1-r2
python3 -c 'import json, sys
d = json.loads(sys.argv[1]); a, b, r2 = sys.argv[2:5]
assert d["name"] == "r1" and d["snapshot"] == "s1", d
assert d["layers"] == ["vda " + r2, "vdb " + r2.replace("r1.s1", "r1-vdb.s1")], d
assert sorted(d["deleted"]) == sorted(["vda " + a, "vdb " + b]), d
assert d["abandoned"] == [] and d["kept"] == [] and d["current"] is True and d["vtpm_kept"] is True, d' \
    "$out" "$r1a" "$r1b" "$r2a" || fail "vm revert --json: $out"
[ ! -e "$r1a" ] && [ ! -e "$r1b" ] || fail "--delete-abandoned left the first revert's layers"
[ -e "$s1a" ] && [ -e "$s1b" ] && [ -e "$vda" ] && [ -e "$vdb" ] || fail "--delete-abandoned deleted a file of s1"
[ "$(chain vda | head -1)" = "$r2a" ] || fail "vda's chain after the second revert: $(chain vda)"
all_luks "after the second revert"
boot WRITTEN "$m4" "after the second revert: vdb empty again (M4 written)"
pass "revert twice (--json, --delete-abandoned: the first revert's layers deleted, s1's files kept): the state at s1 again"

# ---- a kill between the new overlays and the define: the old chain, intact -----------------
chain_before=$(chain vda; chain vdb)
err=$(lab_exec a env NKP_TEST_CRASH_AT=revert-overlay-renamed#2 nkpctl vm revert r1 s1 2>&1) &&
    fail "the crash point was not reached"
grep -q "test crash at step 'revert-overlay-renamed#2'" <<<"$err" || fail "crash: $err"
[ "$(chain vda; chain vdb)" = "$chain_before" ] || fail "the killed revert changed the definition"
# (the names the first revert's deleted layers had are free again)
[ -e "$images/r1-vdb.s1-r1" ] || fail "control: the killed revert had made vdb's overlay"
boot MARKER "$m4" "after a killed revert: the old chain"
pass "a revert killed after its overlays, before the define: the VM is on its old chain and boots with its data (M4)"

# ---- deep rekey with a snapshot only on an abandoned branch (issue 16) ----------------------
out=$(nk vm snapshot r1 s2 2>&1) || fail "vm snapshot r1 s2: $out"
s2a=$images/r1.s2
s2b=$images/r1-vdb.s2
out=$(nk vm revert r1 s1 2>&1) || fail "vm revert r1 s1 (leaving s2's branch): $out"
echo "$out" | sed 's/^/# /'
grep -q "  disk vdb: left behind (another snapshot needs it: kept): $images/r1-vdb.s1-r2" <<<"$out" ||
    fail "output: the layer s2 needs is not listed as kept: $out"
# (the unused overlays the killed revert left: no snapshot names them, delete them as the docs say)
rm -f "$images/r1.s1-r1" "$images/r1-vdb.s1-r1"
disk_keyfile vda "$LAB_DIR/old-vda.key"
disk_keyfile vdb "$LAB_DIR/old-vdb.key"
old_secrets=$(lab_virsh a dumpxml --inactive r1 | grep -o "secret type='passphrase' uuid='[^']*'" | sort -u)
t=$(lab_now)
out=$(nk vm rekey r1 --deep 2>&1) || fail "vm rekey --deep with a branch: $out"
timing "deep rekey (2 disks, current chains and s2's branch) $(lab_since "$t") s"
disk_keyfile vda "$LAB_DIR/new-vda.key"
disk_keyfile vdb "$LAB_DIR/new-vdb.key"
n=0
for f in "$images"/r1*; do
    case $f in *.xml) continue ;; esac
    k=vda; case $f in */r1-vdb.*) k=vdb ;; esac
    o=$(opens "$LAB_DIR/old-$k.key" "$f") && fail "the old DEK of $k opens $f: $o"
    grep -q -i "invalid password" <<<"$o" || fail "the old DEK of $k on $f: unexpected error: $o"
    o=$(opens "$LAB_DIR/new-$k.key" "$f") || fail "the new DEK of $k does not open $f: $o"
    n=$((n + 1))
done
[ -e "$s2a" ] && [ -e "$s2b" ] && [ "$n" -ge 10 ] || fail "control: s2's overlays and the branch files are there ($n files)"
for snap in s1 s2; do
    rec=$(lab_virsh a snapshot-dumpxml r1 "$snap")
    while read -r line; do
        [ -z "$line" ] || ! grep -q "$line" <<<"$rec" || fail "the record of $snap still names the retired $line"
    done <<<"$old_secrets"
done
out=$(nk vm revert r1 s2 2>&1) || fail "vm revert r1 s2 after the deep rekey: $out"
echo "$out" | sed 's/^/# /'
all_luks "after the revert to s2"
boot MARKER "$m4" "after the deep rekey, back to s2 (only on the abandoned branch)"
pass "deep rekey with s2 only on an abandoned branch: the old DEKs open none of the $n files, the records name the new secrets, the revert to s2 boots with M4"

for m in "$m1" "$m2" "$m3" "$m4"; do
    [ "$(in_clear "$m")" = 0 ] || fail "marker $m is in clear in a file of $images: $(grep -a -l "$m" "$images"/*)"
done
for f in "$images"/r1*; do
    case $f in *.xml) continue ;; esac
    luks "$f" || fail "$f is not LUKS"
done
pass "every image file is LUKS; no marker in clear in any file of the images dir"

lab_test_done
