#!/bin/bash
# nkp live migration between two lab hosts (one lab, cases in sequence, each
# leaving the VM running and its data intact for the next):
#   provider p1 created + backed up on A; an nkp-encrypted guest (vTPM +
#   LUKS qcow2 on shared storage) running on A, counting (NKP-TICK);
#   B forces TLS for migrations (qemu.conf migrate_tls_force = 1), A does not.
#   1. B without the provider      → virsh migrate refused by nkp's hook on
#      B (one line: VM, provider, host b, the fix), the VM keeps running on
#      A, nothing defined on B, a migration-refused alarm on B;
#   2. drift (another "p1" on B)   → refused, "provider drift";
#   3. p1 restored on B, keysafe tampered in the incoming XML (virsh migrate
#      --xml, one wrapped DEK bit-flipped) → refused; the hook fed tampered
#      XML directly → exit 1, one line, stdout empty;
#   4. A → B --live --persistent --undefinesource --tls: the guest counts on
#      through the move; no nkp secret left on A; the keysafe in B's
#      persistent definition;
#   5. stop on B, B "reboot" (daemons down, key cache flushed, up), start on
#      B → the guest reads its TPM NV marker and disk marker;
#   6. B → A --tls refused by A's TLS policy (A does not force TLS), B →
#      A without --tls refused by B's libvirt (it forces TLS); the VM keeps
#      running on B;
#   7. A allows plain ([migration] allow_plain = true) → B → A --tls works,
#      the guest counts on, no nkp secret left on B.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-migrate "two hosts: refused (no provider, drift, tampered keysafe, TLS policy), A→B→A live, B reboot" \
    --needs openssl --needs python3 --built libvirt-hooks/nkp-hook
BUILD=$NKP_BUILD_DIR

ADDR_A=10.77.0.1
ADDR_B=10.77.0.2
export LAB_TLS=1 LAB_HOST_TPM=1
NS=https://nkp.invalid/xmlns/keysafe/1

nk() { local h=$1; shift; lab_exec "$h" nkpctl "$@"; }
addr_of() { if [ "$1" = a ]; then echo "$ADDR_A"; else echo "$ADDR_B"; fi; }
state_of() { lab_domstate "$1" "$dom"; }
ticks() { lab_ticks "$1" "$dom"; }
last_tick() { ticks "$1" | tail -n1; }
first_tick() { ticks "$1" | head -n1; }
# wait_ticks HOST N: the last tick on HOST reaches N (bounded)
wait_ticks() {
    local i t
    for ((i = 0; i < 150; i++)); do
        t=$(last_tick "$1" || true)
        if [ -n "$t" ] && [ "$t" -ge "$2" ]; then return 0; fi
        sleep 0.2
    done
    return 1
}
nkp_secrets() { lab_virsh "$1" secret-list 2>/dev/null | grep -c . || true; }
wait_no_secrets() {
    local i
    for ((i = 0; i < 50; i++)); do [ "$(nkp_secrets "$1")" = 0 ] && return 0; sleep 0.2; done
    return 1
}

# refused SRC DST WHAT EXPECTED_SUBSTRING [virsh migrate options…]: the
# migration must fail, with EXPECTED in the error, the VM still running on
# SRC and counting, nothing of it on DST.
refused() {
    local src=$1 dst=$2 what=$3 want=$4 t err before
    shift 4
    before=$(last_tick "$src")
    t=$(lab_now)
    if err=$(lab_virsh "$src" migrate --live --unsafe --persistent --undefinesource "$@" "$dom" \
             "qemu+tls://$(addr_of "$dst")/system" 2>&1); then
        fail "$what: the migration $src -> $dst succeeded"
    fi
    timing "$what: refused in $(lab_since "$t") s"
    echo "# $what: $err"
    REFUSED_ERR=$err
    grep -qF -- "$want" <<<"$err" || fail "$what: error lacks '$want': $err"
    [ "$(state_of "$src")" = running ] || fail "$what: the VM is not running on $src any more"
    wait_ticks "$src" $((before + 2)) || fail "$what: the guest stopped counting on $src"
    lab_virsh "$dst" dominfo "$dom" >/dev/null 2>&1 && fail "$what: the VM is defined on $dst"
    [ "$(nkp_secrets "$dst")" = 0 ] || fail "$what: secrets left on $dst: $(lab_virsh "$dst" secret-list)"
    pass "$what: refused, the VM runs on $src (ticks $before -> $(last_tick "$src")), nothing on $dst"
}

# moved SRC DST [virsh migrate options…]: a live migration that must work;
# the counter goes on on DST without a reboot, SRC keeps no nkp secret.
moved() {
    local src=$1 dst=$2 t before first after info i
    shift 2
    before=$(last_tick "$src")
    t=$(lab_now)
    lab_virsh "$src" migrate --live --unsafe --persistent --undefinesource "$@" "$dom" \
        "qemu+tls://$(addr_of "$dst")/system" || fail "migrate $src -> $dst $*"
    timing "live migration $src -> $dst ($*): $(lab_since "$t") s wall"
    info=$(lab_virsh "$dst" domjobinfo "$dom" --completed 2>/dev/null || true)
    [ -z "$info" ] || timing "$src -> $dst: $(grep -E 'Time elapsed:|Total downtime:' <<<"$info" | tr -s ' ' | tr '\n' ';')"
    [ "$(state_of "$dst")" = running ] || fail "not running on $dst after the move"
    lab_virsh "$src" dominfo "$dom" >/dev/null 2>&1 && fail "still defined on $src after --undefinesource"
    for ((i = 0; i < 100; i++)); do
        first=$(first_tick "$dst" || true); after=$(last_tick "$dst" || true)
        if [ -n "$first" ] && [ -n "$after" ] && [ "$after" -ge $((first + 3)) ]; then break; fi
        sleep 0.2
    done
    [ -n "$after" ] && [ "$after" -ge $((first + 3)) ] || fail "guest does not count on $dst (first=$first last=$after)"
    [ "$first" -gt "$before" ] || fail "the counter restarted on $dst: $first after $before on $src"
    tr -d '\r' < "$(lab_serial_path "$dst" "$dom")" | grep_q -E 'NKP-MARKERS-WRITTEN|NKP-TPM-MARKER' \
        && fail "the guest rebooted on $dst"
    wait_no_secrets "$src" || fail "nkp secrets left on $src after the move: $(lab_virsh "$src" secret-list)"
    [ "$(nkp_secrets "$dst")" -ge 2 ] || fail "the VM's secrets are not on $dst"
    lab_virsh "$dst" dumpxml --inactive "$dom" | grep_q "$NS" || fail "no keysafe in $dst's persistent definition"
    pass "live-migrated $src -> $dst ($*): counted on ($before on $src, $first..$after on $dst); no secret left on $src; keysafe in $dst's definition"
}

# ---- two hosts: A does not force TLS for migrations, B does ----------------------
lab_test_init
t=$(lab_now)
lab_host_create a "$ADDR_A/24" || fail "create host a"
LAB_QEMU_CONF_EXTRA='migrate_tls_force = 1' lab_host_create b "$ADDR_B/24" || fail "create host b"
lab_link a b "$ADDR_A" "$ADDR_B" || fail "veth link"
lab_install_nkp a "$BUILD"
lab_install_nkp b "$BUILD"
lab_host_start a || fail "start host a"
lab_host_start b || fail "start host b"
timing "two hosts (TLS, host TPMs, nkp) up in $(lab_since "$t") s"

umask 077
printf 'lab password for p1\n' > "$LAB_DIR/pw"
nk a provider create p1 >/dev/null || fail "provider create on a"
nk a provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null \
    || fail "provider backup on a"
nk a provider set-default p1 >/dev/null || fail "provider set-default on a"
pass "provider p1 created and backed up on a"

dom=vm1
mark="NKPMIG$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define on a"
lab_vm_encrypt a "$dom"
boot_and_write a "$dom" "$mark"
wait_ticks a 3 || fail "the guest does not count on a"
pass "encrypted guest (vTPM + LUKS disk) running on a, markers written, counting"

# ---- 1. B without the provider -------------------------------------------------------
refused a b "no provider on b" "nkp: VM '$dom' cannot be migrated to host 'b': its key provider 'p1'" --tls
grep -qF "nkpctl provider restore" <<<"$REFUSED_ERR" || fail "no provider: the error lacks the fix"
nk b alarms 2>/dev/null | grep_q "migration-refused" || fail "no migration-refused alarm on b: $(nk b alarms 2>&1)"
pass "no provider on b: the fix is in the error, a migration-refused alarm on b"

# ---- 2. drift: another provider named p1 on B -------------------------------------------
nk b provider create p1 >/dev/null || fail "provider create (the impostor) on b"
refused a b "drift" "provider drift: the provider 'p1' here is another key" --tls
nk b provider delete p1 >/dev/null || fail "provider delete (the impostor) on b"

# ---- 3. the real p1 on B; a tampered keysafe in the incoming XML --------------------------
nk b provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider restore on b"
lab_virsh a dumpxml --migratable "$dom" > "$LAB_DIR/live.xml" || fail "dumpxml --migratable"
python3 - "$LAB_DIR/live.xml" "$LAB_DIR/tampered.xml" <<'PY' || fail "cannot tamper the keysafe"
import base64, re, sys
x = open(sys.argv[1]).read()
m = re.search(r'wrapped="([A-Za-z0-9+/=]+)"', x) or re.search(r"wrapped='([A-Za-z0-9+/=]+)'", x)
raw = bytearray(base64.b64decode(m.group(1)))
raw[20] ^= 0x01                       # one bit of the wrapped DEK's ciphertext
x = x[:m.start(1)] + base64.b64encode(bytes(raw)).decode() + x[m.end(1):]
open(sys.argv[2], "w").write(x)
PY
refused a b "tampered keysafe (virsh migrate --xml)" "nkp: VM '$dom' cannot be migrated to host 'b' (the keysafe in the incoming domain XML was altered" \
    --tls --xml "$LAB_DIR/tampered.xml"
grep -qF "does not unwrap" <<<"$REFUSED_ERR" || fail "tampered: the error does not say that a key does not unwrap"
hrc=0
lab_exec b /etc/libvirt/hooks/qemu.d/nkp "$dom" migrate begin - < "$LAB_DIR/tampered.xml" \
    > "$LAB_DIR/hook.out" 2> "$LAB_DIR/hook.err" || hrc=$?
[ $hrc = 1 ] || fail "the hook fed a tampered keysafe exited $hrc"
[ ! -s "$LAB_DIR/hook.out" ] || fail "the hook wrote to stdout: $(cat "$LAB_DIR/hook.out")"
[ "$(wc -l < "$LAB_DIR/hook.err")" = 1 ] || fail "the hook said more than one line: $(cat "$LAB_DIR/hook.err")"
echo "# hook: $(cat "$LAB_DIR/hook.err")"
# the same keysafe under another VM UUID, and a damaged keysafe element
sed "s|<uuid>$uuid</uuid>|<uuid>$(cat /proc/sys/kernel/random/uuid)</uuid>|" "$LAB_DIR/live.xml" > "$LAB_DIR/other-uuid.xml"
sed 's|fingerprint="|fingerprint="x|; s|fingerprint='"'"'|fingerprint='"'"'x|' "$LAB_DIR/live.xml" > "$LAB_DIR/bad-fp.xml"
for f in other-uuid bad-fp; do
    hrc=0
    lab_exec b /etc/libvirt/hooks/qemu.d/nkp "$dom" migrate begin - < "$LAB_DIR/$f.xml" \
        > "$LAB_DIR/hook.out" 2> "$LAB_DIR/hook.err" || hrc=$?
    [ $hrc = 1 ] && [ ! -s "$LAB_DIR/hook.out" ] && [ "$(wc -l < "$LAB_DIR/hook.err")" = 1 ] \
        || fail "hook, $f: exit $hrc, $(cat "$LAB_DIR/hook.err")"
    echo "# hook, $f: $(cat "$LAB_DIR/hook.err")"
done
[ "$(nkp_secrets b)" = 0 ] || fail "the hook defined secrets for a tampered keysafe"
pass "tampered keysafe: migration refused, the hook (fed directly) exits 1 with one line, no secret on b"

# ---- 4. A → B over TLS -----------------------------------------------------------------------
moved a b --tls
[ -e "$(lab_path b "/var/lib/libvirt/swtpm/$uuid/tpm2/tpm2-00.permall")" ] || fail "no vTPM state on b"
nk b alarms 2>/dev/null | grep_q "migration-refused" && fail "the migration-refused alarm on b stayed after a successful move"

# ---- 5. stop on B, B "reboots", the VM starts there -----------------------------------------
lab_virsh b destroy "$dom" >/dev/null || fail "destroy on b"
wait_no_secrets b || fail "secrets left on b after the VM stopped"
lab_host_stop b
nk b host flush-cache >/dev/null || fail "host flush-cache on b"
lab_host_start b || fail "b did not come back"
boot_and_read b "$dom" "$mark" --running "$dom on b after its reboot"
wait_ticks b 3 || fail "the guest does not count on b"
pass "stopped on b, b rebooted (key cache flushed): the VM starts there and reads its TPM NV and disk markers"

# ---- 6. TLS policy -------------------------------------------------------------------------------
refused b a "A does not force TLS" "nkp: VM '$dom' cannot be migrated to host 'a': nkp VMs only move between hosts that force TLS" --tls
grep -qF "migrate_tls_force = 1" <<<"$REFUSED_ERR" && grep -qF "allow_plain = true" <<<"$REFUSED_ERR" \
    || fail "TLS policy: the error lacks the two fixes"
refused b a "plain (no --tls) from B that forces TLS" "only with VIR_MIGRATE_TLS"

# ---- 7. A allows plain migrations: B → A -----------------------------------------------------
printf '[tpm]\ntcti=%s\n[migration]\nallow_plain = true\n' "$LAB_HOST_TPM_TCTI" > "$(lab_path a /etc/nkp/nkp.conf)"
moved b a --tls

lab_virsh a destroy "$dom" >/dev/null || fail "destroy on a"
t=$(lab_now)
procs=$(lab_procs_snapshot a b)
lab_cleanup_all
timing "cleanup of both hosts $(lab_since "$t") s"
left=$(lab_procs_alive "$procs")
[ -z "$left" ] || fail "processes of the hosts left: $left"
pass "both hosts down, nothing left"
lab_test_done
