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
here=$(cd "$(dirname "$0")" && pwd)
source "$here/lab.sh"

T=t-nkp-rekey-deep
BUILD=${NKP_BUILD_DIR:?NKP_BUILD_DIR not set}
pass() { echo "PASS: $T: $*"; }
fail() {
    echo "FAIL: $T: $*"
    [ -z "${LAB_DIR:-}" ] || [ ! -d "$LAB_DIR/hosts/a" ] || lab_dump a "${dom:-}"
    exit 1
}
timing() { echo "TIMING: $T: $*"; }

if ! why=$(lab_check_env); then
    echo "SKIP: $T: $why"
    exit 77
fi
[ -x "$BUILD/libvirt-hooks/nkp-hook" ] || { echo "SKIP: $T: the hook is not built"; exit 77; }
[ -x "$BUILD/tests/test-domain" ] || { echo "SKIP: $T: tests/test-domain (key dump) is not built"; exit 77; }
for c in qemu-io swtpm swtpm_ioctl; do
    command -v "$c" >/dev/null || { echo "SKIP: $T: $c is not installed"; exit 77; }
done

nk() { lab_exec a nkpctl "$@"; }
state_of() { lab_virsh a domstate "$1" 2>/dev/null | head -n1; }
wait_state() { # dom state seconds
    local i
    for ((i = 0; i < $3 * 5; i++)); do [ "$(state_of "$1")" = "$2" ] && return 0; sleep 0.2; done
    return 1
}
# boot_and_read DOM: start, both markers read back, destroy.
boot_and_read() {
    local d=$1 t line tline
    rm -f "$(lab_serial_path a "$d")"
    t=$(lab_now)
    lab_virsh a start "$d" >/dev/null || fail "start $d: $(lab_virsh a start "$d" 2>&1 || true)"
    line=$(lab_wait_serial a "$d" 'NKP-DISK-MARKER=|NKP-ERROR|NKP-MARKERS-WRITTEN' 240) || fail "$d: no marker line"
    tline=$(lab_wait_serial a "$d" 'NKP-TPM-MARKER=' 10) || fail "$d: no TPM marker line"
    [ "$line" = "NKP-DISK-MARKER=$mark" ] || fail "$d disk marker: $line (want $mark)"
    [ "$tline" = "NKP-TPM-MARKER=$mark" ] || fail "$d TPM marker: $tline (want $mark)"
    timing "$d: start to markers read $(lab_since "$t") s"
    lab_virsh a destroy "$d" >/dev/null || fail "destroy $d"
    wait_state "$d" "shut off" 30 || fail "$d not shut off"
}
# What must not change when a command is refused: the definition, the files.
sums() {
    { lab_virsh a dumpxml --inactive "$1"; cat "$2"; [ -z "${3:-}" ] || cat "$3"; } | sha256sum | awk '{print $1}'
}
leftovers() { # files a conversion may leave, and the journal
    ls -d "$disk".nkp-* "$state"/*.nkp-* "$(lab_path a /var/lib/nkp/journal)"/*.ini "$state"/../.nkp-work 2>/dev/null || true
}
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
# vtpm_opens STATEFILE KEYFILE: swtpm loads the state with that key (what
# vm encrypt's own check does: start, save the permanent state).
vtpm_opens() {
    local d; d=$(mktemp -d "$LAB_DIR/vtpm.XXXXXX")
    cp "$1" "$d/tpm2-00.permall"
    local ok=1
    if swtpm socket --tpm2 --tpmstate "dir=$d" --key "pwdfile=$2,mode=aes-256-cbc" \
        --ctrl "type=unixio,path=$d/ctrl" --server "type=unixio,path=$d/srv" \
        --flags not-need-init --pid "file=$d/pid" --log "file=$d/log" -d 2>/dev/null; then
        local i
        for ((i = 0; i < 100; i++)); do [ -S "$d/ctrl" ] && break; sleep 0.05; done
        if swtpm_ioctl --unix "$d/ctrl" --save permanent "$d/blob" >/dev/null 2>&1 && [ -s "$d/blob" ]; then ok=0; fi
        swtpm_ioctl --unix "$d/ctrl" -s >/dev/null 2>&1 || true
        [ ! -s "$d/pid" ] || kill "$(cat "$d/pid")" 2>/dev/null || true
    fi
    rm -rf "$d"
    return $ok
}

t0=$(lab_now)
lab_init || fail "guest build failed"
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
rm -f "$(lab_serial_path a "$dom")"
lab_virsh a start "$dom" >/dev/null || fail "first start: $(lab_virsh a start "$dom" 2>&1 || true)"
line=$(lab_wait_serial a "$dom" 'NKP-MARKERS-WRITTEN|NKP-ERROR' 240) || fail "no marker line on first boot"
[ "$line" = "NKP-MARKERS-WRITTEN tpm=$mark disk=$mark" ] || fail "first boot said: $line"
lab_virsh a destroy "$dom" >/dev/null
wait_state "$dom" "shut off" 30 || fail "not shut off"
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
wait_state "$dom" "shut off" 30 || fail "not shut off after managedsave"
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

qemu-img info "$disk" | grep -q 'encrypted: yes' || fail "the new disk is not encrypted"
if o=$(disk_marker "$disk" "$LAB_DIR/old-vda.key"); then fail "the old DEK opens the new disk: $o"; fi
grep -q -i "invalid password\|cannot unlock" <<<"$o" || fail "the old DEK on the new disk: unexpected error: $o"
o=$(disk_marker "$LAB_DIR/old-copy.qcow2" "$LAB_DIR/old-vda.key") || fail "the old DEK does not open the old copy: $o"
grep -q "NKPDISK1" <<<"$o" || fail "no marker in the old copy: $o"
o=$(disk_marker "$disk" "$LAB_DIR/new-vda.key") || fail "the new DEK does not open the new disk: $o"
grep -q "NKPDISK1" <<<"$o" || fail "no marker in the new disk: $o"
pass "disk: the old DEK no longer opens the new file (\"$(grep -o -i 'invalid password[^.]*' <<<"$(disk_marker "$disk" "$LAB_DIR/old-vda.key")" | head -n1)\"), but opens the old copy; the new DEK opens the new file"
vtpm_opens "$state/tpm2-00.permall" "$LAB_DIR/new-vtpm.key" || fail "the new vTPM DEK does not open the new vTPM state"
vtpm_opens "$state/tpm2-00.permall" "$LAB_DIR/old-vtpm.key" && fail "the old vTPM DEK opens the new vTPM state"
pass "vTPM: the new DEK opens the new state, the old DEK does not"
rm -f "$LAB_DIR"/*.key "$LAB_DIR"/*.keys "$LAB_DIR/old-copy.qcow2"

boot_and_read "$dom"
pass "after the deep rekey the VM starts and reads both markers back"

# ---- to another provider --------------------------------------------------------------
t=$(lab_now)
out=$(nk vm rekey "$dom" --deep --provider p2 2>&1) || fail "vm rekey --deep --provider p2: $out"
timing "deep rekey to p2 $(lab_since "$t") s"
nk vm status "$dom" | grep -q "encrypted by p2" || fail "vm status after rekey to p2: $(nk vm status "$dom" 2>&1)"
use=$(nk --json provider usage p1) || fail "provider usage p1"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["vms"]==[], d' <<<"$use" || fail "p1 still used: $use"
boot_and_read "$dom"
pass "deep rekey --provider p2: the VM moved to p2 and reads its markers"

timing "total $(lab_since "$t0") s"
echo "PASS: $T"
exit 0
