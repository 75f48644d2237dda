#!/bin/bash
# Shallow rekey (issue 6) on one lab host, with a real guest:
#   providers p1 (default) and p2 backed up; g1 (vTPM + LUKS qcow2) encrypted
#   by p1, started, markers written; bad inputs refused with one line and
#   both definitions unchanged (plain VM, unknown domain, unknown provider,
#   inactive provider, the VM's provider missing); `vm rekey g1 --provider
#   p2` while it runs → the guest keeps ticking, live and persistent
#   keysafes name p2, same secrets; the two half-done states a kill -9 can
#   leave (live new + persistent old, and the reverse) count for both
#   providers in `provider usage` and a rerun finishes; ten rekeys killed
#   with SIGKILL at random instants, a rerun finishes; `provider delete
#   p1` without --force; "reboot" → g1 starts and reads its markers;
#   libvirtd restart with p1 gone → the reconnect hook uses the live keysafe;
#   `vm rekey --all` reports a locked VM and goes on, then moves every nkp VM
#   (g1 running, g3 shut off) to the new default.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-rekey "shallow rekey of a running VM: refusals, half-done states, kill -9, --all, provider retirement" \
    --built libvirt-hooks/nkp-hook
BUILD=$NKP_BUILD_DIR
ms_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%d", (b-a)*1000}'; }

NS=https://nkp.invalid/xmlns/keysafe/1
nk() { lab_exec a nkpctl "$@"; }
state_of() { lab_domstate a "$1"; }
# keysafe_provider DOM --inactive|--live: the provider name its keysafe holds
keysafe_provider() {
    local flag=()
    [ "$2" = --inactive ] && flag=(--inactive)
    lab_virsh a dumpxml "${flag[@]}" "$1" | sed -n -E "s/.*<([a-z]+:)?provider name=[\"']([^\"']*)[\"'].*/\\2/p"
}
# both_definitions DOM: persistent (and live, if running) XML, for before/after
both_definitions() {
    lab_virsh a dumpxml --inactive "$1"
    if [ "$(state_of "$1")" = running ]; then lab_virsh a dumpxml "$1"; fi
}
ticks() { tr -d '\r' < "$(lab_serial_path a "$1")" | grep -a -c 'NKP-TICK' || true; }
# still_ticking DOM: the guest prints two more ticks from now on
still_ticking() {
    local n; n=$(ticks "$1")
    lab_wait_serial a "$1" "NKP-TICK $((n + 2))\$" 120 >/dev/null
}
# refused WHAT NEEDLE ARGS…: nkpctl fails, one line on stderr containing
# NEEDLE, and no definition of any domain changed.
refused() {
    local what=$1 needle=$2 before after d err; shift 2
    before=$(for d in g1 g3 plainvm; do both_definitions "$d"; done | sha256sum)
    if err=$(nk "$@" 2>&1 >/dev/null); then fail "$what: succeeded"; fi
    [ "$(grep -c . <<<"$err")" = 1 ] || fail "$what: not one line on stderr: $err"
    grep -qF -- "$needle" <<<"$err" || fail "$what: stderr lacks '$needle': $err"
    after=$(for d in g1 g3 plainvm; do both_definitions "$d"; done | sha256sum)
    [ "$before" = "$after" ] || fail "$what: a domain definition changed"
    echo "# $what: $err"
}
reboot_host() { # daemons down, key cache flushed, up
    lab_host_stop a
    nk host flush-cache >/dev/null || fail "host flush-cache"
    lab_host_start a || fail "host a did not come back"
}

t0=$(lab_now)
lab_test_init
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
pass "host a up with nkp installed ($(lab_since "$t0") s)"

# ---- providers: p1 default, p2 and p4 backed up, p3 never backed up ----------------
umask 077
printf 'lab password for the rekey test\n' > "$LAB_DIR/pw"
for p in p1 p2 p3 p4; do nk provider create "$p" >/dev/null || fail "provider create $p"; done
for p in p1 p2 p4; do
    out=$(nk provider backup "$p" --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" 2>&1) \
        || fail "provider backup $p: $out"
done
nk provider set-default p1 >/dev/null || fail "provider set-default p1"
pass "providers p1 (default), p2, p4 backed up; p3 not"

# ---- g1: vTPM + LUKS disk by p1; g3: vTPM only by p4; plainvm --------------------
dom=g1
mark="NKPREKEY$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/g1.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name g1 --disk "$disk" --marker "$mark" > "$LAB_DIR/g1.xml"
lab_virsh a define "$LAB_DIR/g1.xml" >/dev/null || fail "define g1"
lab_vm_encrypt a g1
qemu-img create -q -f qcow2 "$LAB_DIR/shared/g3.qcow2" 16M
lab_guest_xml --name g3 --disk "$LAB_DIR/shared/g3.qcow2" --mem 64 > "$LAB_DIR/g3.xml"
lab_virsh a define "$LAB_DIR/g3.xml" >/dev/null || fail "define g3"
lab_vm_encrypt a g3 --provider p4 --disks=
qemu-img create -q -f qcow2 "$LAB_DIR/shared/plainvm.qcow2" 16M
lab_guest_xml --name plainvm --disk "$LAB_DIR/shared/plainvm.qcow2" --no-tpm --mem 64 > "$LAB_DIR/plainvm.xml"
lab_virsh a define "$LAB_DIR/plainvm.xml" >/dev/null || fail "define plainvm"
nk vm status g1 | grep_q "g1: encrypted by p1 (vtpm:vtpm, disk:vda)" || fail "vm status g1: $(nk vm status g1 2>&1)"
nk vm status g3 | grep_q "g3: encrypted by p4 (vtpm:vtpm)" || fail "vm status g3: $(nk vm status g3 2>&1)"
pass "g1 (vTPM + disk) encrypted by p1, g3 (vTPM) by p4, plainvm plain"

# ---- live and persistent keysafes with different DEKs: refused ------------------------
# g3's keysafe now (A), then decrypt + encrypt: new DEK, new secret UUID (B);
# g3 started (paused) on B, then A put into its persistent definition.
ks_a=$(lab_virsh a metadata g3 "$NS" --config)
out=$(nk vm decrypt g3 2>&1) || fail "vm decrypt g3: $out"
lab_vm_encrypt a g3 --provider p4 --disks=
ks_b=$(lab_virsh a metadata g3 "$NS" --config)
lab_virsh a start --paused g3 >/dev/null || fail "start --paused g3: $(lab_virsh a start --paused g3 2>&1 || true)"
lab_virsh a metadata g3 "$NS" --key nkp --set "$ks_a" --config >/dev/null || fail "put keysafe A into g3's persistent definition"
refused "live and persistent keysafes hold different keys" "hold different keys" vm rekey g3 --provider p2
lab_virsh a destroy g3 >/dev/null || fail "destroy g3"
lab_wait_domstate a g3 "shut off" 30 || fail "g3 not shut off"
lab_virsh a metadata g3 "$NS" --key nkp --set "$ks_b" --config >/dev/null || fail "put keysafe B back"
nk vm status g3 | grep_q "g3: encrypted by p4 (vtpm:vtpm)" || fail "vm status g3: $(nk vm status g3 2>&1)"
pass "a running VM whose live and persistent keysafes hold different DEKs: rekey refused, nothing changed"

# ---- a saved state (managedsave) restores with the keysafe it was saved with: refused --
lab_virsh a start --paused g3 >/dev/null || fail "start --paused g3 (for managedsave)"
lab_virsh a managedsave g3 >/dev/null || fail "managedsave g3: $(lab_virsh a managedsave g3 2>&1 || true)"
refused "a VM with a saved state" "has a saved state (virsh managedsave)" vm rekey g3 --provider p2
# (to p1: g1, shut off and on p1, only gets a new KEK)
rc=0; out=$(nk --json vm rekey --all --provider p1 2>/dev/null) || rc=$?
python3 -c 'import json,sys; d={v["name"]: v for v in json.load(sys.stdin)}; assert d["g3"]["result"]=="failed" and "saved state" in d["g3"]["reason"], d' <<<"$out" \
    || fail "--all with a saved state: $out"
[ "$rc" != 0 ] || fail "--all with a saved state exited 0"
lab_virsh a managedsave-remove g3 >/dev/null || fail "managedsave-remove g3"
pass "a VM with a saved state (managedsave): rekey refused with the fix, --all reports it failed"

boot_and_write a g1 "$mark"
lab_wait_serial a g1 'NKP-TICK 2$' 120 >/dev/null || fail "g1 does not tick"
timing "g1 first boot to ticking $(lab_since "$LAB_BOOT_T") s"
pass "g1 runs: markers written, ticking"

# ---- bad input: one line, nothing changed --------------------------------------------
refused "plain VM" "is not encrypted by nkp" vm rekey plainvm --provider p2
refused "unknown domain" "nosuch" vm rekey nosuch --provider p2
refused "unknown provider" "nope" vm rekey g1 --provider nope
refused "inactive provider" "never backed up" vm rekey g1 --provider p3
refused "provider delete while a VM uses it" "protects the defined VM 'g3'" provider delete p4
out=$(nk provider delete p4 --force 2>&1) || fail "provider delete p4 --force: $out"
grep -q "warning: provider 'p4' still protects the defined VM 'g3'" <<<"$out" || fail "delete --force did not name g3: $out"
nk host flush-cache >/dev/null || fail "host flush-cache"
refused "the VM's provider is missing" "provider 'p4'" vm rekey g3 --provider p2
err=$(nk vm rekey g3 --provider p2 2>&1) || true
grep -q "nkpctl provider restore" <<<"$err" || fail "missing-provider error lacks the fix: $err"
[ "$(state_of g1)" = running ] || fail "g1 stopped during the refused commands"
pass "refused with one line and both definitions unchanged: plain VM, unknown domain, unknown and inactive provider, missing provider; provider delete refused while g3 uses p4"

# ---- the rekey of the running g1 ---------------------------------------------------------
old_keysafe=$(lab_virsh a metadata g1 "$NS" --config)
secrets_before=$(lab_virsh a secret-list | awk '{print $1}' | sort)
n0=$(ticks g1)
t=$(lab_now)
out=$(nk vm rekey g1 --provider p2 2>&1) || fail "vm rekey g1 --provider p2: $out"
timing "vm rekey g1 (running, through nsenter) $(ms_since "$t") ms"
echo "# $out"
grep -q "rekeyed to provider 'p2' (was 'p1')" <<<"$out" && grep -q "live and persistent" <<<"$out" \
    || fail "rekey output: $out"
[ "$(state_of g1)" = running ] || fail "g1 is $(state_of g1) after the rekey"
lab_wait_serial a g1 "NKP-TICK $((n0 + 3))\$" 120 >/dev/null || fail "g1 stopped ticking after the rekey"
[ "$(keysafe_provider g1 --inactive)" = p2 ] || fail "persistent keysafe names '$(keysafe_provider g1 --inactive)'"
[ "$(keysafe_provider g1 --live)" = p2 ] || fail "live keysafe names '$(keysafe_provider g1 --live)'"
nk vm status g1 | grep_q "g1: encrypted by p2" || fail "vm status: $(nk vm status g1 2>&1)"
st=$(nk --json vm status g1)
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["provider"]=="p2" and d["running"], d' <<<"$st" \
    || fail "vm status --json: $st"
[ "$(lab_virsh a secret-list | awk '{print $1}' | sort)" = "$secrets_before" ] || fail "the VM's libvirt secrets changed"
new_keysafe=$(lab_virsh a metadata g1 "$NS" --config)
for d in --inactive --live; do
    x=$(if [ $d = --inactive ]; then lab_virsh a dumpxml --inactive g1; else lab_virsh a dumpxml g1; fi)
    grep -q "<nkp:keysafe xmlns:nkp=\"$NS\"" <<<"$x" && ! grep -q "xmlns=\"$NS\"" <<<"$x" \
        || fail "the $d keysafe is not stored as a define stores it: $(grep -m1 keysafe <<<"$x")"
done
salt() { sed -n -E "s/.*<([a-z]+:)?kek salt=[\"']([^\"']*)[\"'].*/\\2/p"; }
[ "$(salt <<<"$new_keysafe")" != "$(salt <<<"$old_keysafe")" ] || fail "the KEK salt did not change"
pass "rekey of the running g1 to p2: guest keeps ticking, live and persistent keysafes name p2, new salt, same secrets"

# ---- the two half-done states a kill -9 can leave, and the rerun ---------------------------
# (a) killed between the two writes: live new (p2), persistent old (p1)
lab_virsh a metadata g1 "$NS" --key nkp --set "$old_keysafe" --config >/dev/null || fail "put the old keysafe back (config)"
[ "$(keysafe_provider g1 --inactive)" = p1 ] && [ "$(keysafe_provider g1 --live)" = p2 ] || fail "could not make state (a)"
use1=$(nk --json provider usage p1); use2=$(nk --json provider usage p2)
python3 -c 'import json,sys; assert json.loads(sys.argv[1])["vms"]==["g1"] and json.loads(sys.argv[2])["vms"]==["g1"]' "$use1" "$use2" \
    || fail "state (a): usage p1 $use1, usage p2 $use2"
refused "state (a): provider delete p1" "protects the defined VM 'g1'" provider delete p1
out=$(nk vm rekey g1 --provider p2 2>&1) || fail "rerun in state (a): $out"
[ "$(keysafe_provider g1 --inactive)" = p2 ] && [ "$(keysafe_provider g1 --live)" = p2 ] || fail "rerun did not finish state (a)"
# (b) the reverse: live old (p1), persistent new (p2), as a start racing the rekey leaves it
lab_virsh a metadata g1 "$NS" --key nkp --set "$old_keysafe" --live >/dev/null || fail "put the old keysafe back (live)"
[ "$(keysafe_provider g1 --inactive)" = p2 ] && [ "$(keysafe_provider g1 --live)" = p1 ] || fail "could not make state (b)"
use1=$(nk --json provider usage p1)
python3 -c 'import json,sys; assert json.loads(sys.argv[1])["vms"]==["g1"]' "$use1" || fail "state (b): usage p1 $use1"
refused "state (b): provider delete p1" "protects the defined VM 'g1'" provider delete p1
out=$(nk vm rekey g1 --provider p2 2>&1) || fail "rerun in state (b): $out"
[ "$(keysafe_provider g1 --inactive)" = p2 ] && [ "$(keysafe_provider g1 --live)" = p2 ] || fail "rerun did not finish state (b)"
still_ticking g1 || fail "g1 stopped ticking"
pass "half-done states (live new/persistent old and the reverse): both providers in use, delete refused, a rerun finishes; guest ticking"

# ---- kill -9 at random instants of a rekey, then a rerun ----------------------------------
# (alternating between p1 and p2, so a half-done rekey shows as two names;
# the rerun opens both keysafes and checks they hold the same DEKs)
mixed=0
for i in $(seq 1 10); do
    lab_exec a nkpctl vm rekey g1 --provider "p$((i % 2 + 1))" >/dev/null 2>&1 &
    pid=$!
    sleep "0.0$((RANDOM % 4))$((RANDOM % 10))" # 0-39 ms: a rekey takes ~30 ms here
    # the nkpctl inside the host's namespaces: the youngest child of the lab_exec
    pkill -KILL -P "$pid" 2>/dev/null || true; kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pi=$(keysafe_provider g1 --inactive); pl=$(keysafe_provider g1 --live)
    case "$pi $pl" in "p1 p1"|"p2 p2") ;; "p1 p2"|"p2 p1") mixed=$((mixed + 1));;
        *) fail "after kill $i the keysafes name '$pi' (persistent) and '$pl' (live)";; esac
done
echo "# kills that left live and persistent on different providers: $mixed of 10"
nk vm status g1 | grep_q "g1: encrypted by p[12]" || fail "vm status after the kills: $(nk vm status g1 2>&1)"
out=$(nk vm rekey g1 --provider p2 2>&1) || fail "rerun after the kills: $out"
[ "$(keysafe_provider g1 --inactive)" = p2 ] && [ "$(keysafe_provider g1 --live)" = p2 ] || fail "rerun after the kills did not finish"
still_ticking g1 || fail "g1 stopped ticking after the kills"
pass "10 rekeys killed (SIGKILL) at random instants: both keysafes stay valid, a rerun finishes, guest ticking"

# ---- retire p1 ---------------------------------------------------------------------------------
use=$(nk --json provider usage p1)
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["vms"]==[], d' <<<"$use" || fail "provider usage p1: $use"
nk provider usage p1 | grep_q "No defined VM uses provider 'p1'" || fail "provider usage p1 (text)"
out=$(nk provider delete p1 2>&1) || fail "provider delete p1 (no --force): $out"
still_ticking g1 || fail "g1 stopped ticking after provider delete"
# libvirtd restart with p1 gone from the store and the key cache: the
# reconnect hook defines g1's secrets again from its live keysafe (p2).
nk host flush-cache >/dev/null || fail "host flush-cache"
lab_restart_libvirtd a
sleep 1
[ "$(state_of g1)" = running ] || fail "g1 is $(state_of g1) after the libvirtd restart"
[ "$(lab_virsh a secret-list | grep -c .)" -ge 2 ] || fail "reconnect did not define g1's secrets again (live keysafe)"
still_ticking g1 || fail "g1 stopped ticking after the libvirtd restart"
lab_virsh a destroy g1 >/dev/null || fail "destroy g1"
lab_wait_domstate a g1 "shut off" 30 || fail "g1 not shut off"
reboot_host
nk provider list | grep_q '^p1' && fail "p1 still listed after delete"
boot_and_read a g1 "$mark"
pass "provider usage p1 empty, delete p1 without --force; libvirtd restart: g1 keeps running (secrets from its live keysafe); after a reboot g1 starts and reads its markers"

# ---- --all: a locked VM is reported and the rest goes on -------------------------------------------
nk provider set-default p2 >/dev/null || fail "provider set-default p2"
lab_virsh a start g1 >/dev/null || fail "start g1 before --all"
lab_wait_serial a g1 'NKP-TICK 2$' 240 >/dev/null || fail "g1 does not tick before --all"
rc=0; out=$(nk vm rekey --all 2>"$LAB_DIR/err") || rc=$?
err=$(cat "$LAB_DIR/err")
echo "# --all with g3 locked:"; sed 's/^/#   /' <<<"$out"; echo "#   stderr: $err"
[ "$rc" != 0 ] || fail "--all with a locked VM exited 0"
grep -q "^g1: rekeyed to 'p2' (same provider, new KEK)" <<<"$out" || fail "--all: no g1 line: $out"
grep -q "^g3: locked: .*provider 'p4'" <<<"$out" || fail "--all: no g3 locked line: $out"
grep -q "plainvm" <<<"$out" && fail "--all reported the plain VM: $out"
grep -q "1 of 2 nkp VMs were not rekeyed" <<<"$err" || fail "--all stderr: $err"
pass "--all with g3's provider missing: g1 rekeyed, g3 reported locked, plain VM silent, exit $rc"

out=$(nk provider restore "$LAB_DIR/p4.p12" --password-file "$LAB_DIR/pw" 2>&1) || fail "restore p4: $out"
t=$(lab_now)
js=$(nk --json vm rekey --all) || fail "--all --json after restoring p4: $js"
timing "vm rekey --all (2 VMs, one running, through nsenter) $(ms_since "$t") ms"
python3 -c '
import json, sys
d = {v["name"]: v for v in json.load(sys.stdin)}
assert set(d) == {"g1", "g3"}, d
assert d["g1"]["result"] == "rekeyed" and d["g1"]["provider"] == "p2" and d["g1"]["running"], d
assert d["g3"]["result"] == "rekeyed" and d["g3"]["from"] == "p4" and not d["g3"]["running"], d
' <<<"$js" || fail "--all --json: $js"
for d in g1 g3; do
    [ "$(keysafe_provider "$d" --inactive)" = p2 ] || fail "$d persistent keysafe: $(keysafe_provider "$d" --inactive)"
done
[ "$(keysafe_provider g1 --live)" = p2 ] || fail "g1 live keysafe after --all"
nk vm status g3 | grep_q "g3: encrypted by p2 (vtpm:vtpm)" || fail "vm status g3: $(nk vm status g3 2>&1)"
still_ticking g1 || fail "g1 stopped ticking after --all"
use=$(nk --json provider usage p4)
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["vms"]==[], d' <<<"$use" || fail "provider usage p4: $use"
out=$(nk provider delete p4 2>&1) || fail "provider delete p4: $out"
lab_virsh a destroy g1 >/dev/null || fail "destroy g1"
lab_wait_domstate a g1 "shut off" 30 || fail "g1 not shut off"
reboot_host
boot_and_read a g1 "$mark"
pass "--all moved g1 (running) and g3 (shut off) to the default p2; p4 retired; after a reboot g1 reads its markers"

lab_test_done
