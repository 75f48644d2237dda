#!/bin/bash
# Crash injection: nkpctl vm encrypt / vm rekey --deep / vm decrypt killed
# (SIGKILL, NKP_TEST_CRASH_AT=STEP) at every named step of the conversion
# protocol (docs/crash-safety.md), on one real guest with a vTPM that has
# state and a LUKS/plain qcow2 disk (two files per conversion). After each
# kill the VM must start with both markers (TPM NV + disk) intact, under the
# old keys or the new, and the command run again must finish or roll back.
#
# Each crash is followed by exactly one boot. Two recovery paths alternate:
#   hook:   virsh start right after the crash (the prepare hook reconciles the
#           files to the definition libvirt starts), then the command is run
#           again if it was rolled back;
#   nkpctl: the command is run again right after the crash (it reconciles
#           first: "finished the interrupted …" or rolled back and redone),
#           then virsh start.
# Every boot reads the markers, so it also proves the previous run's result.
#
# Then NKP_CRASH_RANDOM (default 15) kill -9 at random times, each checked
# without a boot: the hook's prepare run by hand on the persistent
# definition, then the disk marker read (qemu-io) and the vTPM state opened
# (swtpm) with that definition's keys; one final boot at the end.
#
# Cost: one boot (~10-25 s under TCG) per crash. By default every step of
# encrypt is crashed, and six steps each of rekey --deep and decrypt (chosen
# so that every step name is crashed in at least two operations); the others
# run without a crash. NKP_CRASH_ALL=1 crashes every step of all three.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-crash "kill -9 at every step of encrypt/rekey --deep/decrypt: the VM starts with its markers, reruns finish or roll back" \
    --built libvirt-hooks/nkp-hook --built tests/test-domain \
    --needs qemu-io --needs swtpm --needs swtpm_ioctl --needs python3
BUILD=$NKP_BUILD_DIR

# The steps, in protocol order (docs/crash-safety.md). With a vTPM and one
# disk there are two files: swap-half/swapped fire once per file (#2 = the disk).
ALL_STEPS="journal vtpm-converted disk-copied disk-converted ready swap-half swapped swap-half#2 swapped#2 defined file-reconciled done"
FORWARD_STEPS=" defined file-reconciled file-reconciled#2 done "
ENCRYPT_STEPS=${NKP_CRASH_ENCRYPT_STEPS-$ALL_STEPS}
REKEY_STEPS=${NKP_CRASH_REKEY_STEPS-"vtpm-converted disk-converted swap-half swapped#2 defined done"}
DECRYPT_STEPS=${NKP_CRASH_DECRYPT_STEPS-"journal disk-copied ready swap-half#2 file-reconciled swapped"}
if [ "${NKP_CRASH_ALL:-0}" = 1 ]; then REKEY_STEPS=$ALL_STEPS; DECRYPT_STEPS=$ALL_STEPS; fi

nk() { lab_exec a nkpctl "$@"; }
# The side the definition is on: "plain", or the keysafe's KEK salt.
side() {
    local x; x=$(lab_virsh a dumpxml --inactive "$dom")
    grep -oE "kek salt=.[A-Za-z0-9+/=]+" <<<"$x" | head -n1 | cut -c11- || true
}
leftovers() { lab_leftovers a "$disk" "$state"; }
op_cmd() { # OP → the nkpctl arguments
    case $1 in
    encrypt) echo "vm encrypt $dom";;
    decrypt) echo "vm decrypt $dom";;
    rekey-deep) echo "vm rekey $dom --deep";;
    esac
}
op_words() { case $1 in rekey-deep) echo "vm rekey --deep";; *) echo "vm $1";; esac; }
# The side expected after OP completes, given the side before.
check_new_side() { # OP BEFORE CONTEXT
    local now; now=$(side)
    case $1 in
    encrypt|rekey-deep) [ -n "$now" ] && [ "$now" != "$2" ] || fail "$3: expected new keys, side is '${now:-plain}' (before '${2:-plain}')";;
    decrypt) [ -z "$now" ] || fail "$3: expected plain, side is '$now'";;
    esac
}
runs=0
path_n=0
# crash_one OP STEP: the whole cycle for one crash.
crash_one() {
    local op=$1 step=$2 ctx="$1@$2" before out rc=0 forward=0 path
    # shellcheck disable=SC2046
    before=$(side)
    [[ $FORWARD_STEPS == *" $step "* ]] && forward=1
    path_n=$((path_n + 1))
    if ((path_n % 2)); then path=hook; else path=nkpctl; fi
    local t; t=$(lab_now)
    # shellcheck disable=SC2046
    out=$(lab_exec a env NKP_TEST_CRASH_AT="$step" nkpctl $(op_cmd "$op") 2>&1) || rc=$?
    [ "$rc" = 137 ] || fail "$ctx: expected death by SIGKILL (137), got $rc: $out"
    grep -q "test crash at step '$step'" <<<"$out" || fail "$ctx: no crash line: $out"
    local conv_s; conv_s=$(lab_since "$t")
    st=$(nk vm status "$dom" 2>&1) || fail "$ctx: vm status: $st"
    if [ "$step" = done ]; then
        grep -q "pending\|in progress" <<<"$st" && fail "$ctx: status shows a pending operation after the journal was removed: $st"
    else
        grep -q "interrupted '$(op_words "$op")' pending" <<<"$st" || fail "$ctx: vm status does not show the interrupted operation: $st"
    fi
    if [ $path = hook ]; then
        boot_and_read a "$dom" "$mark" "$ctx (hook recovery)"
        [ -z "$(leftovers)" ] || fail "$ctx: the hook left $(leftovers)"
        nk vm status "$dom" | grep_q pending && fail "$ctx: still pending after the start"
        if [ $forward = 1 ]; then
            check_new_side "$op" "$before" "$ctx (hook)"
        else
            [ "$(side)" = "$before" ] || fail "$ctx: the hook did not roll back (side '$(side)', before '$before')"
            # shellcheck disable=SC2046
            out=$(nk $(op_cmd "$op") 2>&1) || fail "$ctx: the rerun after the rollback failed: $out"
            check_new_side "$op" "$before" "$ctx (rerun)"
        fi
        echo "# $ctx: hook $([ $forward = 1 ] && echo finished || echo 'rolled back'), markers intact (boot $BOOT_S s)$([ $forward = 1 ] || echo '; rerun done')"
    else
        if [ "$step" != done ]; then
            # shellcheck disable=SC2046
            out=$(nk $(op_cmd "$op") 2>&1) || fail "$ctx: the rerun failed: $out"
            if [ $forward = 1 ]; then
                grep -q "finished the interrupted $(op_words "$op")" <<<"$out" || fail "$ctx: rerun said: $out"
            else
                grep -q "rolled back the interrupted" <<<"$out" || fail "$ctx: rerun did not say it rolled back: $out"
            fi
        fi
        check_new_side "$op" "$before" "$ctx (nkpctl rerun)"
        [ -z "$(leftovers)" ] || fail "$ctx: the rerun left $(leftovers)"
        boot_and_read a "$dom" "$mark" "$ctx (after nkpctl recovery)"
        local what="rerun rolled back and redid it"
        [ $forward = 0 ] || what="rerun finished it"
        [ "$step" != done ] || what="nothing left to do (no journal)"
        echo "# $ctx: $what, markers intact (boot $BOOT_S s)"
    fi
    runs=$((runs + 1))
    timing "$ctx via $path: $(lab_since "$t") s (until the kill $conv_s s)"
}
# run_op OP STEP-OR-EMPTY
run_op() {
    if [ -n "$2" ]; then crash_one "$1" "$2"; return; fi
    local out before; before=$(side)
    # shellcheck disable=SC2046
    out=$(nk $(op_cmd "$1") 2>&1) || fail "$1 (no crash): $out"
    check_new_side "$1" "$before" "$1 (no crash)"
}

t0=$(lab_now)
lab_test_init
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
umask 077
printf 'lab password\n' > "$LAB_DIR/pw"
nk provider create p1 >/dev/null || fail "provider create"
nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default p1 >/dev/null || fail "provider set-default"

# ---- a guest whose vTPM has state and whose disk has the marker ---------------------
dom=g1
mark="NKPCRASH$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$disk" 32M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" --mem 192 > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
out=$(nk vm encrypt "$dom" 2>&1) || fail "vm encrypt: $out"
boot_and_write a "$dom" "$mark"
lab_virsh a destroy "$dom" >/dev/null
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
out=$(nk vm decrypt "$dom" 2>&1) || fail "vm decrypt: $out"
[ -s "$state/tpm2-00.permall" ] || fail "no vTPM state"
pass "g1: markers written; now plain with clear vTPM state, so every operation converts two files ($(lab_since "$t0") s)"

# ---- the loop: encrypt, rekey --deep, decrypt; one crash each where listed ------------
read -r -a enc <<<"$ENCRYPT_STEPS"
read -r -a rek <<<"$REKEY_STEPS"
read -r -a dec <<<"$DECRYPT_STEPS"
n=${#enc[@]}; ((${#rek[@]} > n)) && n=${#rek[@]}; ((${#dec[@]} > n)) && n=${#dec[@]}
for ((i = 0; i < n; i++)); do
    run_op encrypt "${enc[i]:-}"
    run_op rekey-deep "${rek[i]:-}"
    run_op decrypt "${dec[i]:-}"
done
pass "$runs crashes (encrypt: ${#enc[@]}, rekey --deep: ${#rek[@]}, decrypt: ${#dec[@]} steps), each followed by a start that read both markers; every rerun finished or rolled back; $BOOTS boots"

# ---- kill -9 at random times (no boot each: the hook by hand, data read offline) ----
# The command is killed after a random delay (within its usual run time);
# then the hook's prepare runs by hand on the persistent definition (as
# `virsh start` would run it) and must reconcile; then the disk marker must
# read back with the key of that definition (qemu-io) and the vTPM state
# must open with its key (swtpm), both outside the guest.
hook_by_hand() { lab_exec a /etc/libvirt/hooks/qemu.d/nkp "$dom" "$1" "$2" - < "$LAB_DIR/cur.xml"; }
# qemu-io's `read -v` hex dump on stdin: do its bytes start with argv[1]?
marker_py='
import re, sys
raw = b"".join(bytes.fromhex("".join(m.group(1).split()))
               for m in (re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})", l) for l in sys.stdin) if m)
sys.exit(0 if raw.startswith(sys.argv[1].encode()) else 1)
'
disk_has_marker() { # [KEYFILE]
    local o
    if [ -n "${1:-}" ]; then
        o=$(qemu-io --object "secret,id=s0,file=$1,format=raw" \
            --image-opts "driver=qcow2,file.filename=$disk,encrypt.key-secret=s0" -r -c 'read -v 0 64' 2>&1) || return 1
    else
        o=$(qemu-io -f qcow2 -r -c 'read -v 0 64' "$disk" 2>&1) || return 1
    fi
    python3 -c "$marker_py" "NKPDISK1 $mark" <<<"$o"
}
check_offline() { # CONTEXT
    lab_virsh a dumpxml --inactive "$dom" > "$LAB_DIR/cur.xml"
    local err
    err=$(hook_by_hand prepare begin 2>&1) || fail "$1: the hook's prepare failed: $err"
    hook_by_hand release end >/dev/null 2>&1 || true
    [ -z "$(leftovers)" ] || fail "$1: the hook left $(leftovers)"
    nk vm status "$dom" | grep_q pending && fail "$1: still pending after the hook"
    if [ -n "$(side)" ]; then
        lab_exec a "$BUILD/tests/test-domain" --dump-keys / < "$LAB_DIR/cur.xml" > "$LAB_DIR/cur.keys" || fail "$1: key dump"
        awk '$1 == "dek:disk:vda" {printf "%s", $2}' "$LAB_DIR/cur.keys" > "$LAB_DIR/disk.key"
        awk '$1 == "dek:vtpm:vtpm" {printf "%s", $2}' "$LAB_DIR/cur.keys" > "$LAB_DIR/vtpm.key"
        disk_has_marker "$LAB_DIR/disk.key" || fail "$1: the disk marker does not read with the definition's key"
        lab_vtpm_opens "$state/tpm2-00.permall" "$LAB_DIR/vtpm.key" || fail "$1: the vTPM state does not open with the definition's key"
        rm -f "$LAB_DIR/cur.keys" "$LAB_DIR/disk.key" "$LAB_DIR/vtpm.key"
    else
        disk_has_marker || fail "$1: the plain disk has no marker"
        lab_vtpm_opens "$state/tpm2-00.permall" || fail "$1: the clear vTPM state does not open"
    fi
}
RANDOM_KILLS=${NKP_CRASH_RANDOM:-15}
declare -A outcome=()
# The kill lands within the op's last measured run time (first guesses below).
declare -A dur_ms=([encrypt]=3500 [rekey-deep]=3500 [decrypt]=600)
last=decrypt
t=$(lab_now)
for ((k = 1; k <= RANDOM_KILLS; k++)); do
    before=$(side)
    if [ -z "$before" ]; then op=encrypt; elif [ $last = rekey-deep ]; then op=decrypt; else op=rekey-deep; fi
    max=${dur_ms[$op]}
    ms=$(( (RANDOM * 32768 + RANDOM) % max ))
    t_op=$(lab_now)
    rm -f "$LAB_DIR/nkpctl.pid"
    # shellcheck disable=SC2046
    lab_exec a sh -c 'echo $$ > "$0"; exec nkpctl "$@"' "$LAB_DIR/nkpctl.pid" $(op_cmd "$op") > "$LAB_DIR/kill.out" 2>&1 &
    bg=$!
    sleep "$(awk -v m="$ms" 'BEGIN{printf "%.3f", m / 1000}')"
    pid=$(cat "$LAB_DIR/nkpctl.pid" 2>/dev/null || true)
    [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
    wait "$bg" && rc=0 || rc=$?
    [ "$rc" != 0 ] || dur_ms[$op]=$(awk -v a="$t_op" -v b="$(date +%s.%N)" 'BEGIN{printf "%d", (b-a)*1000}')
    ctx="random kill #$k: $op after $ms ms"
    check_offline "$ctx"
    after=$(side)
    if [ "$after" = "$before" ]; then res="rolled back"; else res="finished"; fi
    [ "$rc" = 137 ] || res="$res (completed before the kill, exit $rc)"
    [ "$rc" = 137 ] || [ "$rc" = 0 ] || fail "$ctx: exit $rc: $(cat "$LAB_DIR/kill.out")"
    [ "$after" = "$before" ] || last=$op
    outcome[$res]=$(( ${outcome[$res]:-0} + 1 ))
    echo "# $ctx: $res; disk marker and vTPM state open with the definition's keys"
done
summary=$(for r in "${!outcome[@]}"; do printf '%s: %s; ' "$r" "${outcome[$r]}"; done)
timing "$RANDOM_KILLS random kills with offline checks $(lab_since "$t") s"
pass "$RANDOM_KILLS kill -9 at random times, each reconciled by the hook (run by hand) to data that opens with the definition's keys ($summary)"

boot_and_read a "$dom" "$mark" "final"
[ -z "$(leftovers)" ] || fail "left $(leftovers)"
pass "final start after all of it: both markers read back"

lab_test_done
