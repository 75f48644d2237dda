#!/bin/bash
# Deep rekey and decrypt of a disk with a snapshot chain (issue 16,
# docs/rekey.md "Disks with snapshots"), lab host a, the real guest:
#   g1 encrypted, its markers written by the guest; data 'B' put in the base
#   at 40 MiB (qemu-io through the disk's key); `nkpctl vm snapshot g1 s1`
#   (offline: a LUKS overlay under the same secret); in the overlay era,
#   through the key: a second marker at 32 MiB and a zero cluster over the
#   base's 'B' at 40 MiB (write -z);
#   `vm rekey --deep`: both files converted where they are (same paths, the
#   overlay's backing name kept, snapshot s1 still listed), both
#   <encryption>s under the new secret, the old DEK opens neither layer,
#   the new one reads the chain: marker2, zeros at 40 MiB (not the base's
#   'B'), the guest's disk marker; no journal or temp file left; the VM
#   boots and reads its markers (disk and vTPM);
#   `vm decrypt`: both layers plain, the chain kept, the same reads.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-chain "vm rekey --deep and vm decrypt convert every layer of a snapshot chain" \
    --built libvirt-hooks/nkp-hook --built tests/test-domain --needs qemu-io --needs qemu-img
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
luks() { qemu-img info -U "$1" 2>/dev/null | grep_q 'encrypted: yes'; }
keys_of() { # DOM → "dek:KIND:ID HEX" lines (test-only key dump)
    lab_virsh a dumpxml --inactive "$1" | lab_exec a "$BUILD/tests/test-domain" --dump-keys / | grep '^dek:'
}
disk_keyfile() { # OUT: the hex DEK of g1's vda, no newline
    keys_of g1 | awk '$1 == "dek:disk:vda" {printf "%s", $2}' > "$1"
    [ -s "$1" ] || fail "no key for vda"
}
# chain_io KEYFILE|- CMD…: qemu-io on the overlay over the base, every layer
# under the key (- : plain); fails when a command does.
chain_io() {
    local k=$1 opts="driver=qcow2,file.filename=$s1" args=() c out
    shift
    if [ "$k" != - ]; then
        opts+=",encrypt.key-secret=k,backing.encrypt.key-secret=k"
        args=(--object "secret,id=k,file=$k,format=raw")
    fi
    for c in "$@"; do args+=(-c "$c"); done
    out=$(qemu-io "${args[@]}" --image-opts "$opts" 2>&1) || { echo "$out"; return 1; }
    ! grep -q -i "failed\|error" <<<"$out" || { echo "$out"; return 1; }
    echo "$out"
}
# opens KEYFILE FILE: qemu-io opens FILE alone (no backing) with that key
opens() {
    qemu-io --object "secret,id=k,file=$1,format=raw" -r -c 'read 0 512' \
        "json:{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\",\"filename\":\"$2\"},\"backing\":null,\"encrypt\":{\"key-secret\":\"k\"}}" 2>&1
}
chain_reads() { # KEYFILE|- CONTEXT
    local o
    o=$(chain_io "$1" "read -P 0x4d 32M 64k" "read -P 0 40M 64k" "read -P 0x42 42008576 64k" \
        "read -v 0 64") || fail "$2: the chain does not read as written: $o"
    grep -q "NKPDISK1" <<<"$o" || fail "$2: no guest disk marker at 0: $o"
}

t0=$(lab_now)
lab_test_init
lab_host_with_p1 a
pass "host a up, provider p1 ($(lab_since "$t0") s)"

# ---- g1: encrypted, markers, a snapshot, writes in the overlay era ------------------
mark="NKPCHAIN$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
base="$LAB_DIR/shared/g1.qcow2"
s1="$LAB_DIR/shared/g1.s1"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$base" 64M || fail "qemu-img create"
lab_guest_xml --name g1 --uuid "$uuid" --disk "$base" --marker "$mark" > "$LAB_DIR/g1.xml"
lab_virsh a define "$LAB_DIR/g1.xml" >/dev/null || fail "define"
lab_vm_encrypt a g1
boot_and_write a g1 "$mark"
lab_virsh a destroy g1 >/dev/null
lab_wait_domstate a g1 "shut off" 30 || fail "not shut off"
disk_keyfile "$LAB_DIR/old.key"
o=$(qemu-io --object "secret,id=k,file=$LAB_DIR/old.key,format=raw" \
    --image-opts "driver=qcow2,file.filename=$base,encrypt.key-secret=k" \
    -c 'write -P 0x42 40M 128k' 2>&1) || fail "writing B into the base: $o"
out=$(nk vm snapshot g1 s1 2>&1) || fail "vm snapshot (offline): $out"
luks "$s1" || fail "the overlay is not LUKS"
chain_io "$LAB_DIR/old.key" "write -P 0x4d 32M 64k" "write -z 40M 64k" >/dev/null || fail "overlay-era writes"
chain_reads "$LAB_DIR/old.key" "before the rekey"
backing_before=$(qemu-img info -U "$s1" | grep '^backing file:')
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
pass "g1: markers written by the guest, vm snapshot s1 (LUKS overlay), marker2 and a zeroed range over the base's data in the overlay"

# ---- deep rekey ------------------------------------------------------------------------
t=$(lab_now)
out=$(nk vm rekey g1 --deep 2>&1) || fail "vm rekey --deep: $out"
timing "deep rekey of a 2-layer chain + vTPM $(lab_since "$t") s"
echo "# $out"
[ -z "$(lab_leftovers a "$base" "$state")$(lab_leftovers a "$s1" "$state")" ] || fail "leftovers after the rekey"
luks "$base" && luks "$s1" || fail "a layer is not LUKS after the rekey"
[ "$(qemu-img info -U "$s1" | grep '^backing file:')" = "$backing_before" ] || fail "the overlay's backing changed"
lab_virsh a snapshot-list g1 --name | grep_q -x s1 || fail "libvirt lost snapshot s1"
disk_keyfile "$LAB_DIR/new.key"
cmp -s "$LAB_DIR/old.key" "$LAB_DIR/new.key" && fail "the disk DEK did not change"
xml=$(lab_virsh a dumpxml --inactive g1 | sed -n '/<disk/,/<\/disk>/p')
suuids=$(grep -o "<secret type='passphrase' uuid='[^']*'" <<<"$xml" | sort -u)
[ "$(grep -c . <<<"$suuids")" = 1 ] || fail "the layers are not under one secret: $xml"
[ "$(grep -c "<secret type='passphrase'" <<<"$xml")" = 2 ] || fail "not both layers have an <encryption>: $xml"
for f in "$base" "$s1"; do
    o=$(opens "$LAB_DIR/old.key" "$f") && fail "the old DEK opens $f: $o"
    grep -q -i "invalid password" <<<"$o" || fail "the old DEK on $f: unexpected error: $o"
    o=$(opens "$LAB_DIR/new.key" "$f") || fail "the new DEK does not open $f: $o"
done
chain_reads "$LAB_DIR/new.key" "after the rekey"
pass "deep rekey: both layers converted in place (backing kept, s1 listed, one new secret), the old DEK opens neither, marker2 and the zeroed range read back"
boot_and_read a g1 "$mark"
pass "after the deep rekey the VM boots through the chain and reads its markers"

# ---- decrypt ---------------------------------------------------------------------------
out=$(nk vm decrypt g1 2>&1) || fail "vm decrypt: $out"
luks "$base" || luks "$s1" && fail "a layer is still LUKS after decrypt"
[ "$(qemu-img info -U "$s1" | grep '^backing file:')" = "$backing_before" ] || fail "decrypt changed the overlay's backing"
lab_virsh a dumpxml --inactive g1 | grep -q "<encryption" && fail "an <encryption> left after decrypt"
chain_reads - "after decrypt"
pass "vm decrypt: both layers plain, chain kept, the same data"
rm -f "$LAB_DIR"/*.key

lab_test_done
