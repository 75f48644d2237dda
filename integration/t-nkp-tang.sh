#!/bin/bash
# A stolen host opens nothing: a provider bound to the host TPM AND to Tang
# servers (real tangd behind socat, with its own keys, in a second lab
# namespace "t" reached over a veth), a lab VM encrypted by it and started
# (markers); "the host is stolen": reboot with the cache flushed and no
# route to Tang → start refused with nkp's line naming the provider, the
# servers and the fix, vm-locked alarm, disk and vTPM state unchanged; back
# on the network → host unlock, the VM starts, markers intact; locked again
# and nkpd alone unlocks it once Tang is back (retry with backoff); 2-of-3
# Tang with one server down unlocks; tangd-rotate-keys keeps the old
# binding working, provider rebind moves to the new keys without touching
# the VM (old keys deleted, the VM still starts).
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
export LAB_HOST_TPM=1
lab_test t-nkp-tang "TPM + Tang binding: stolen host locked, unlock when back, nkpd retry, 2-of-3, rotation + rebind" \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd --needs socat --needs clevis --needs curl
for p in /usr/libexec/tangd /usr/libexec/tangd-keygen /usr/libexec/tangd-rotate-keys; do
    [ -x "$p" ] || skip_all "$p is missing (apt-get install tang)"
done
BUILD=$NKP_BUILD_DIR

nk() { lab_exec a nkpctl "$@"; }
state_of() { lab_domstate a "$1"; }
sums() { sha256sum "$disk" "$state/tpm2-00.permall" | awk '{print $1}'; }
TANG_ADDR=10.77.9.2
url() { echo "http://$TANG_ADDR:800$1"; }

# tang_start I: tangd with the keys of $LAB_DIR/tang$I behind socat on
# $TANG_ADDR:800I inside host t (one process per connection, as under
# systemd's socket activation); waits until GET /adv answers from host a.
declare -A TANG_PID
tang_start() {
    local i=$1 db="$LAB_DIR/tang$1" n
    if [ ! -d "$db" ]; then mkdir -p "$db" && /usr/libexec/tangd-keygen "$db" >/dev/null; fi
    # (lab_exec is a shell function: $! of `lab_exec … &` would be a
    # subshell, so socat's own PID comes back through a file)
    lab_exec t bash -c 'socat "TCP-LISTEN:$1,bind=$2,reuseaddr,fork" "EXEC:/usr/libexec/tangd $3" 2>>"$4" &
                        echo $! > "$5"' sh "800$i" "$TANG_ADDR" "$db" "$LAB_DIR/tang$i.log" "$LAB_DIR/tang$i.pid"
    TANG_PID[$i]=$(cat "$LAB_DIR/tang$i.pid")
    for n in $(seq 50); do
        lab_exec a curl -sf -m 1 -o /dev/null "$(url "$i")/adv" && return 0
        sleep 0.1
    done
    fail "Tang server $i does not answer from host a"
}
tang_stop() {
    local n
    kill "${TANG_PID[$1]}" 2>/dev/null || true
    for n in $(seq 50); do
        lab_exec a curl -sf -m 1 -o /dev/null "$(url "$1")/adv" || return 0
        sleep 0.1
    done
    fail "Tang server $1 still answers after its socat was killed"
}

# reboot_host [--offline]: what a reboot does to the key cache (daemons
# down, cache flushed, up again); --offline: host a has no route to Tang.
reboot_host() {
    lab_host_stop a
    nk host flush-cache >/dev/null || fail "host flush-cache"
    if [ "${1:-}" = --offline ]; then lab_exec a ip link set lab-t down; fi
    lab_host_start a || fail "host a did not come back"
}

# locked_start WHAT: virsh start refused with nkp's line for provider p1,
# naming the servers and the fix; alarm; disk and vTPM state unchanged.
locked_start() {
    local before err
    before=$(sums)
    if err=$(lab_virsh a start "$dom" 2>&1); then fail "$1: the VM started"; fi
    echo "# virsh: $err"
    grep -q "nkp: VM '$dom' is locked: Provider 'p1' is bound to the network" <<<"$err" || fail "$1: no nkp line: $err"
    grep -q "$(url 1)" <<<"$err" && grep -q "nkpctl host unlock" <<<"$err" || fail "$1: the line lacks the servers or the fix: $err"
    [ "$(state_of "$dom")" = "shut off" ] || fail "$1: the VM is not shut off"
    nk alarms | grep_q "vm-locked" || fail "$1: no vm-locked alarm: $(nk alarms 2>&1)"
    [ "$(sums)" = "$before" ] || fail "$1: the refused start changed the disk or the vTPM state"
    [ -z "$(lab_virsh a secret-list)" ] || fail "$1: secrets defined for a locked VM"
}

t0=$(lab_now)
lab_test_init
lab_at_exit nkpd_stop
lab_at_exit 'for p in "${TANG_PID[@]}"; do kill $p 2>/dev/null; done'
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
lab_host_create t || fail "host t (the Tang network) not created"
lab_link a t 10.77.9.1/24 "$TANG_ADDR/24" || fail "no veth between a and t"
tang_start 1; tang_start 2; tang_start 3
pass "host a up with nkp and a host TPM; three Tang servers on host t, reachable from a ($(lab_since "$t0") s)"

# ---- a TPM + Tang provider, a VM encrypted by it -------------------------------------
umask 077
printf 'lab password for p1\n' > "$LAB_DIR/pw"
out=$(nk provider create p1 --bind "tang:$(url 1)" 2>&1) || fail "provider create --bind: $out"
grep -q "sealed to this host's TPM, bound to the network: tpm+tang 1/1" <<<"$out" || fail "create: $out"
nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default p1 >/dev/null || fail "provider set-default"
st=$(nk --json provider show p1)
python3 -c 'import json,sys; d=json.load(sys.stdin); b=d["bound"]; assert d["sealed"]=="tpm" and b["kind"]=="tang" and b["servers"][0]["answers"], d' <<<"$st" \
    || fail "provider show: $st"
ini=$(lab_path a /var/lib/nkp/providers.ini)
grep -q '^bind_jwe=' "$ini" && ! grep -q '^tpm_blob=' "$ini" || fail "the TPM blob is not inside the JWE: $(grep -v jwe "$ini")"
pass "provider p1: sealed to the TPM, its sealed blob only inside a Clevis JWE for Tang 1; show says both"

dom=g1
mark="NKPTANG$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
out=$(nk vm encrypt "$dom" 2>&1) || fail "vm encrypt: $out"
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
reboot_host
boot_and_write a "$dom" "$mark"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
pass "after a reboot with Tang reachable the VM starts unattended and writes its markers"

# ---- the host is stolen: no route to Tang --------------------------------------------------
reboot_host --offline
lab_exec a curl -sf -m 2 -o /dev/null "$(url 1)/adv" && fail "Tang still reachable from the 'stolen' host"
locked_start "stolen host"
out=$(nk host status)
grep -q "p1 .*0 up now: IT WOULD NOT OPEN" <<<"$out" || fail "host status: $out"
pass "stolen host (reboot, no route to Tang): start refused with the line, vm-locked alarm, disk and vTPM unchanged; host status says so"

lab_exec a ip link set lab-t up
out=$(nk host unlock 2>&1) || fail "host unlock: $out"
grep -q "$dom: unlocked" <<<"$out" || fail "host unlock: $out"
nk alarms 2>/dev/null | grep_q "vm-locked" && fail "vm-locked alarm still there after unlock"
boot_and_read a "$dom" "$mark"
pass "back on the network: host unlock, the VM starts, markers intact"

# ---- locked again; nkpd alone unlocks once Tang is back --------------------------------------
reboot_host --offline
locked_start "offline again"
nkpd_start
sleep 6 # nkpd's first retry while offline (it must fail and back off)
nk alarms | grep_q "vm-locked" || fail "the alarm went away while Tang is unreachable"
lab_exec a ip link set lab-t up
cleared=0
for i in $(seq 60); do
    if ! nk alarms 2>/dev/null | grep_q "vm-locked"; then cleared=1; break; fi
    sleep 1
done
[ $cleared = 1 ] || fail "nkpd did not unlock within 60 s of Tang coming back"
timing "nkpd cleared the vm-locked alarm ${i} s after Tang came back"
grep -q "every locked VM is unlocked" "$LAB_DIR/nkpd.log" || fail "nkpd log lacks the unlock"
boot_and_read a "$dom" "$mark"
nkpd_stop
pass "nkpd retries with backoff while vm-locked is open: unlocked without an admin once Tang answered"

# ---- 2 of 3, one server down -------------------------------------------------------------------
before=$(sums)
out=$(nk provider rebind p1 --bind "tang:$(url 1),$(url 2),$(url 3)" --threshold 2 2>&1) || fail "rebind 2-of-3: $out"
[ "$(sums)" = "$before" ] || fail "rebind touched the VM's disk or vTPM state"
tang_stop 3
reboot_host
boot_and_read a "$dom" "$mark"
pass "rebound to 2 of 3 Tang servers (the VM untouched); with server 3 down the VM starts after a reboot"
tang_stop 2
reboot_host
locked_start "2 of 3 down"
tang_start 2; tang_start 3
out=$(nk host unlock 2>&1) || fail "host unlock after 2 of 3 back: $out"
pass "with 2 of 3 servers down it is locked; back up, host unlock opens it"

# ---- key rotation, rebind -----------------------------------------------------------------------
for i in 1 2 3; do /usr/libexec/tangd-rotate-keys -d "$LAB_DIR/tang$i" >/dev/null 2>&1 || fail "tangd-rotate-keys $i"; done
reboot_host
boot_and_read a "$dom" "$mark"
pass "after tangd-rotate-keys the old binding still opens (old keys kept): the VM starts after a reboot"
old_jwe=$(sed -n 's/^bind_jwe=//p' "$ini")
before=$(sums)
out=$(nk provider rebind p1 --bind "tang:$(url 1),$(url 2),$(url 3)" --threshold 2 2>&1) || fail "rebind after rotation: $out"
[ "$(sums)" = "$before" ] || fail "rebind touched the VM's disk or vTPM state"
[ "$(sed -n 's/^bind_jwe=//p' "$ini")" != "$old_jwe" ] || fail "rebind kept the old JWE"
for i in 1 2 3; do rm -f "$LAB_DIR/tang$i"/.*.jwk; done
reboot_host
boot_and_read a "$dom" "$mark"
pass "provider rebind moved to the new keys without touching the VM: old keys deleted, the VM starts, markers intact"

lab_test_done
