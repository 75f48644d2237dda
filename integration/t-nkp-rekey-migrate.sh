#!/bin/bash
# Shallow rekey and live migration (docs/rekey.md, "Migration after a
# rekey"), two lab hosts: g runs on A under p1 (B holds p1 only); `vm rekey g
# --provider p2` on A while it runs → its live keysafe names p2, so a live
# migration to B is refused by B's hook before any state moves (g keeps
# running on A); after `provider restore p2` on B it migrates and runs there,
# encrypted by p2.  Plain migrations are allowed on B ([migration]
# allow_plain = true): TLS is t-nkp-migrate's business.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-rekey-migrate "two hosts: a VM rekeyed while running migrates only to a host holding the new provider" \
    --built libvirt-hooks/nkp-hook
BUILD=$NKP_BUILD_DIR
dom=g

nk() { local h=$1; shift; lab_exec "$h" nkpctl "$@"; }
state_of() { lab_domstate "$1" "$dom"; }
migrate() { lab_virsh a migrate --live --unsafe --persistent --undefinesource "$dom" qemu+tcp://10.77.0.2/system 2>&1; }

t0=$(lab_now)
lab_test_init
lab_host_create a 10.77.0.1/24 && lab_host_create b 10.77.0.2/24 || fail "create the hosts"
lab_link a b 10.77.0.1 10.77.0.2 || fail "veth link"
lab_install_nkp a "$BUILD"
lab_install_nkp b "$BUILD"
printf '[tpm]\ntcti=none\n[migration]\nallow_plain = true\n' > "$(lab_path b /etc/nkp/nkp.conf)"
lab_host_start a && lab_host_start b || fail "libvirtd"
umask 077
printf 'lab password\n' > "$LAB_DIR/pw"
for p in p1 p2; do
    nk a provider create "$p" >/dev/null || fail "provider create $p"
    nk a provider backup "$p" --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "backup $p"
done
nk a provider set-default p1 >/dev/null || fail "set-default p1"
nk b provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "restore p1 on b"
pass "hosts a and b linked ($(lab_since "$t0") s); p1, p2 on a; p1 only on b"

qemu-img create -q -f qcow2 "$LAB_DIR/shared/$dom.qcow2" 16M
lab_guest_xml --name "$dom" --disk "$LAB_DIR/shared/$dom.qcow2" --mem 128 > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
out=$(nk a vm encrypt "$dom" --disks= 2>&1) || fail "vm encrypt: $out"
lab_virsh a start "$dom" >/dev/null || fail "start: $(lab_virsh a start "$dom" 2>&1 || true)"
lab_wait_serial a "$dom" 'NKP-TICK 2$' 240 >/dev/null || fail "g does not tick on a"
out=$(nk a vm rekey "$dom" --provider p2 2>&1) || fail "vm rekey: $out"
echo "# $out"
pass "g (vTPM) runs on a, rekeyed from p1 to p2 while running"

if err=$(migrate); then fail "migration to b, which lacks p2, succeeded"; fi
echo "# $err"
grep -q "nkp: VM '$dom' cannot be migrated to host 'b': its key provider 'p2'" <<<"$err" || fail "refusal lacks nkp's line: $err"
[ "$(state_of a)" = running ] || fail "g is $(state_of a) on a after the refused migration"
pass "migration to b refused by b's hook (the live keysafe names p2, b lacks it); g still runs on a"

nk b provider restore "$LAB_DIR/p2.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "restore p2 on b"
t=$(lab_now)
out=$(migrate) || fail "migration after restoring p2 on b: $out"
timing "live migration a -> b $(lab_since "$t") s"
lab_wait_serial b "$dom" 'NKP-TICK [0-9]+$' 60 >/dev/null || fail "g does not tick on b"
[ "$(state_of b)" = running ] || fail "g is $(state_of b) on b"
nk b vm status "$dom" | grep_q "$dom: encrypted by p2" || fail "vm status on b: $(nk b vm status "$dom" 2>&1)"
pass "after provider restore p2 on b: g migrates and runs on b, encrypted by p2"

lab_test_done
