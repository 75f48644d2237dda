#!/bin/bash
# nkpctl vm rekey DOMAIN --deep on one lab host, with a real guest:
#   a VM encrypted by p1 (vTPM + LUKS qcow2) writes its markers; refused
#   cases change nothing (running VM, saved state, plain VM, unknown
#   provider, provider never backed up, not enough space); deep rekey → new KEK salt, new DEKs,
#   new secret UUIDs, no temp file or journal left; the old disk DEK no longer
#   opens the new disk but still opens a copy of the old one; the old vTPM
#   DEK no longer opens the new vTPM state; the VM starts and reads both
#   markers back; a second deep rekey moves it to provider p2, markers again.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-rekey-deep "vm rekey --deep: refusals change nothing, old DEKs no longer open the new files, markers intact" \
    --built libvirt-hooks/nkp-hook --built tests/test-domain \
    --needs qemu-io --needs swtpm --needs swtpm_ioctl
BUILD=$NKP_BUILD_DIR

nk() { lab_exec a nkpctl "$@"; }
# What must not change when a command is refused: the definition, the files.
sums() {
    { lab_virsh a dumpxml --inactive "$1"; cat "$2"; [ -z "${3:-}" ] || cat "$3"; } | sha256sum | awk '{print $1}'
}
leftovers() { lab_leftovers a "$disk" "$state"; }
# refused WHAT EXPECTED-TEXT CMD…: non-zero exit, one line with the text,
# nothing changed.
refused() {
    local what=$1 want=$2; shift 2
    local before out rc=0
    before=$(sums "$dom" "$disk" "$state/tpm2-00.permall")
    out=$("$@" 2>&1) || rc=$?
    [ $rc != 0 ] || fail "$what: succeeded: $out"
    [ "$(grep -c . <<<"$out")" = 1 ] || fail "$what: not one line: $out"
    grep -q -- "$want" <<<"$out" || fail "$what: '$want' not in: $out"
    [ "$(sums "$dom" "$disk" "$state/tpm2-00.permall")" = "$before" ] || fail "$what: the definition or a file changed"
    [ -z "$(leftovers)" ] || fail "$what: left $(leftovers)"
    echo "# $what: $out"
}
keys_of() { # DOM → "dek:KIND:ID HEX" lines (test-only key dump)
    lab_virsh a dumpxml --inactive "$1" | lab_exec a "$BUILD/tests/test-domain" --dump-keys / | grep '^dek:'
}
keyfile() { # KEYS-FILE OBJECT OUT: the hex value of OBJECT (e.g. disk:vda) into OUT, no newline
    awk -v o="dek:$2" '$1 == o {printf "%s", $2}' "$1" > "$3"
    [ -s "$3" ] || fail "no key for $2 in $1"
}
# disk_marker IMAGE KEYFILE: the first 64 bytes of the LUKS qcow2 read with that key
disk_marker() {
    qemu-io --object "secret,id=s0,file=$2,format=raw" \
        --image-opts "driver=qcow2,file.filename=$1,encrypt.key-secret=s0" -r -c 'read -v 0 64' 2>&1
}
t0=$(lab_now)
lab_test_init
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
umask 077
printf 'lab password\n' > "$LAB_DIR/pw"
for p in p1 p2; do
    nk provider create $p >/dev/null || fail "provider create $p"
    nk provider backup $p --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup $p"
done
nk provider set-default p1 >/dev/null || fail "provider set-default"
nk provider create p3 >/dev/null || fail "provider create p3" # never backed up: inactive
pass "host a up, providers p1 p2 (backed up), p3 (inactive) ($(lab_since "$t0") s)"

# ---- an encrypted guest with its markers ---------------------------------------
dom=g1
mark="NKPDEEP$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
out=$(nk vm encrypt "$dom" 2>&1) || fail "vm encrypt: $out"
boot_and_write a "$dom" "$mark"
lab_virsh a destroy "$dom" >/dev/null
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
[ -s "$state/tpm2-00.permall" ] || fail "no vTPM state"
pass "g1 encrypted by p1 (vTPM + disk), markers written"

# ---- refused, nothing changed ------------------------------------------------------
qemu-img create -q -f qcow2 "$LAB_DIR/shared/plain.qcow2" 16M
lab_guest_xml --name plain --disk "$LAB_DIR/shared/plain.qcow2" --no-tpm > "$LAB_DIR/plain.xml"
lab_virsh a define "$LAB_DIR/plain.xml" >/dev/null || fail "define plain"
refused "plain VM" "is not encrypted by nkp" lab_exec a nkpctl vm rekey plain --deep
refused "unknown provider" "no provider 'nope'" lab_exec a nkpctl vm rekey "$dom" --deep --provider nope
refused "provider never backed up" "never backed up" lab_exec a nkpctl vm rekey "$dom" --deep --provider p3
refused "not enough space" "Not enough space" lab_exec a env NKP_TEST_FREE_SPACE=1048576 nkpctl vm rekey "$dom" --deep
lab_virsh a start --paused "$dom" >/dev/null || fail "start --paused"
refused "running VM" "is running" lab_exec a nkpctl vm rekey "$dom" --deep
out=$(lab_virsh a managedsave "$dom" 2>&1) || fail "managedsave: $out"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off after managedsave"
refused "saved state" "has a saved state" lab_exec a nkpctl vm rekey "$dom" --deep
lab_virsh a managedsave-remove "$dom" >/dev/null || fail "managedsave-remove"
pass "refused with one line, definition and files unchanged: plain VM, unknown provider, inactive provider, not enough space, running VM, saved state"

# ---- deep rekey ----------------------------------------------------------------------
keys_of "$dom" > "$LAB_DIR/old.keys" || fail "cannot dump the old keys"
keyfile "$LAB_DIR/old.keys" disk:vda "$LAB_DIR/old-vda.key"
keyfile "$LAB_DIR/old.keys" vtpm:vtpm "$LAB_DIR/old-vtpm.key"
cp "$disk" "$LAB_DIR/old-copy.qcow2"
old_xml=$(lab_virsh a dumpxml --inactive "$dom")
old_salt=$(grep -oE "kek salt=.[A-Za-z0-9+/=]+" <<<"$old_xml" | head -n1 || true)
[ -n "$old_salt" ] || fail "no KEK salt in the definition"
old_secrets=$(grep -o "secret[^>]*uuid='[^']*'" <<<"$old_xml" | grep -o "[0-9a-f-]\{36\}" | sort)
t=$(lab_now)
out=$(nk vm rekey "$dom" --deep 2>&1) || fail "vm rekey --deep: $out"
timing "deep rekey (vTPM + 64 MiB qcow2) $(lab_since "$t") s"
echo "# $out"
grep -q "new keys from provider 'p1'" <<<"$out" || fail "deep rekey said: $out"
[ -z "$(leftovers)" ] || fail "deep rekey left $(leftovers)"
new_xml=$(lab_virsh a dumpxml --inactive "$dom")
[ "$new_xml" != "$old_xml" ] || fail "the definition did not change"
new_salt=$(grep -oE "kek salt=.[A-Za-z0-9+/=]+" <<<"$new_xml" | head -n1 || true)
[ -n "$new_salt" ] && [ "$new_salt" != "$old_salt" ] || fail "the KEK salt did not change ($old_salt / $new_salt)"
new_secrets=$(grep -o "secret[^>]*uuid='[^']*'" <<<"$new_xml" | grep -o "[0-9a-f-]\{36\}" | sort)
[ -n "$new_secrets" ] && [ -z "$(comm -12 <(echo "$old_secrets") <(echo "$new_secrets"))" ] || fail "secret UUIDs were kept: $new_secrets"
keys_of "$dom" > "$LAB_DIR/new.keys" || fail "cannot dump the new keys"
keyfile "$LAB_DIR/new.keys" disk:vda "$LAB_DIR/new-vda.key"
keyfile "$LAB_DIR/new.keys" vtpm:vtpm "$LAB_DIR/new-vtpm.key"
cmp -s "$LAB_DIR/old-vda.key" "$LAB_DIR/new-vda.key" && fail "the disk DEK did not change"
cmp -s "$LAB_DIR/old-vtpm.key" "$LAB_DIR/new-vtpm.key" && fail "the vTPM DEK did not change"
st=$(nk --json vm status "$dom") || fail "vm status"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="p1" and d["pending"] is None, d' <<<"$st" \
    || fail "vm status: $st"
pass "deep rekey: new DEKs and secret UUIDs, definition switched, no temp file or journal left"

qemu-img info "$disk" | grep_q 'encrypted: yes' || fail "the new disk is not encrypted"
if o=$(disk_marker "$disk" "$LAB_DIR/old-vda.key"); then fail "the old DEK opens the new disk: $o"; fi
grep -q -i "invalid password\|cannot unlock" <<<"$o" || fail "the old DEK on the new disk: unexpected error: $o"
o=$(disk_marker "$LAB_DIR/old-copy.qcow2" "$LAB_DIR/old-vda.key") || fail "the old DEK does not open the old copy: $o"
grep -q "NKPDISK1" <<<"$o" || fail "no marker in the old copy: $o"
o=$(disk_marker "$disk" "$LAB_DIR/new-vda.key") || fail "the new DEK does not open the new disk: $o"
grep -q "NKPDISK1" <<<"$o" || fail "no marker in the new disk: $o"
pass "disk: the old DEK no longer opens the new file (\"$(grep -o -i 'invalid password[^.]*' <<<"$(disk_marker "$disk" "$LAB_DIR/old-vda.key")" | head -n1)\"), but opens the old copy; the new DEK opens the new file"
lab_vtpm_opens "$state/tpm2-00.permall" "$LAB_DIR/new-vtpm.key" || fail "the new vTPM DEK does not open the new vTPM state"
lab_vtpm_opens "$state/tpm2-00.permall" "$LAB_DIR/old-vtpm.key" && fail "the old vTPM DEK opens the new vTPM state"
pass "vTPM: the new DEK opens the new state, the old DEK does not"
rm -f "$LAB_DIR"/*.key "$LAB_DIR"/*.keys "$LAB_DIR/old-copy.qcow2"

boot_and_read a "$dom" "$mark"
pass "after the deep rekey the VM starts and reads both markers back"

# ---- to another provider --------------------------------------------------------------
t=$(lab_now)
out=$(nk vm rekey "$dom" --deep --provider p2 2>&1) || fail "vm rekey --deep --provider p2: $out"
timing "deep rekey to p2 $(lab_since "$t") s"
nk vm status "$dom" | grep_q "encrypted by p2" || fail "vm status after rekey to p2: $(nk vm status "$dom" 2>&1)"
use=$(nk --json provider usage p1) || fail "provider usage p1"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["vms"]==[], d' <<<"$use" || fail "p1 still used: $use"
boot_and_read a "$dom" "$mark"
pass "deep rekey --provider p2: the VM moved to p2 and reads its markers"

lab_test_done
