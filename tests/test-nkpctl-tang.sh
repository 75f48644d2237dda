#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Network binding against real Tang servers (tangd behind socat on
# loopback) and the real clevis: a bound provider opens only while enough
# servers answer; when they do not, one line naming the provider, the
# servers and the fix, and nothing written; 2-of-3 with one server down
# opens; tangd-rotate-keys keeps old bindings working, rebind moves to the
# new keys with the same KDK; an administrator opens the JWE by hand with
# clevis decrypt.  (No TPM here: tcti=none, so the JWE holds the KDK; the
# lab test integration/t-nkp-tang.sh runs the TPM + Tang layering.)
set -u
source "$(dirname "$0")/lib/cli.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
TANGD=/usr/libexec/tangd
for p in "$TANGD" /usr/libexec/tangd-keygen /usr/libexec/tangd-rotate-keys; do
        [ -x "$p" ] || skip_all "$p is missing (apt-get install tang)"
done
for c in clevis socat curl jose python3; do
        command -v "$c" >/dev/null || skip_all "$c is missing"
done

TOP=$(mktemp -d)
declare -A TANG_PID TANG_PORT
cleanup() {
        local n r
        for n in "${!TANG_PID[@]}"; do kill "${TANG_PID[$n]}" 2>/dev/null; done
        for r in "$TOP"/root.*; do
                [ -d "$r/var/lib/nkp" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1
        done
        rm -rf "$TOP"
}
trap cleanup EXIT

free_port() {
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# tang_start NAME: a Tang server with its own keys in $TOP/tang-NAME, on a
# loopback port kept across restarts; waits until GET /adv answers.
tang_start() {
        local n=$1 db=$TOP/tang-$1 i
        if [ ! -d "$db" ]; then
                mkdir -p "$db" && /usr/libexec/tangd-keygen "$db" >/dev/null || return 1
                TANG_PORT[$n]=$(free_port)
        fi
        socat "TCP-LISTEN:${TANG_PORT[$n]},bind=127.0.0.1,reuseaddr,fork" "EXEC:$TANGD $db" 2>/dev/null &
        TANG_PID[$n]=$!
        for i in $(seq 50); do
                curl -sf -m 1 -o /dev/null "http://127.0.0.1:${TANG_PORT[$n]}/adv" && return 0
                sleep 0.1
        done
        return 1
}
tang_stop() { kill "${TANG_PID[$1]}" 2>/dev/null; wait "${TANG_PID[$1]}" 2>/dev/null; unset "TANG_PID[$1]"; }
url() { echo "http://127.0.0.1:${TANG_PORT[$1]}"; }

run() {
        local root=$1; shift
        out=$("$NKPCTL" --root "$root" "$@" 2>"$TOP/stderr"); rc=$?
        err=$(cat "$TOP/stderr")
}
refused() {
        local what=$1 needle=$2 root=$3; shift 3
        local before after lines
        before=$(tree_sum "$root")
        run "$root" "$@"
        after=$(tree_sum "$root")
        lines=$(printf '%s' "$err" | grep -c '')
        if [ "$rc" -eq 0 ]; then not_ok "$what: exit 0"; return; fi
        if [ "$lines" -ne 1 ]; then not_ok "$what: $lines lines on stderr: $err"; return; fi
        case "$err" in *"$needle"*) ;; *) not_ok "$what: stderr lacks '$needle': $err"; return;; esac
        if [ "$before" != "$after" ]; then not_ok "$what: the tree changed"; return; fi
        pass "$what"
        echo "#   $err"
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }
store() { echo "$1/var/lib/nkp/providers.ini"; }
jwe_of() { sed -n "/^\[provider ${2:-web}\]/,/^\[/s/^bind_jwe=//p" "$(store "$1")"; }
# opens ROOT NAME: the provider's key is opened from rest (cache flushed
# first) and used: its EK CA certificate derives from the KDK.
opens() { "$NKPCTL" --root "$1" host flush-cache >/dev/null && run "$1" provider ca-cert "$2"; }

tang_start a && tang_start b && tang_start c
check "three Tang servers answer on loopback" [ "${#TANG_PID[@]}" -eq 3 ]

# ---- bad bindings: refused, nothing written ------------------------------------------
R=$(cli_newroot "$TOP")
refused "a binding that is not tang:" "not understood" "$R" provider create web --bind nfs:x
refused "a URL nkp does not accept" "not a Tang server URL" "$R" provider create web --bind 'tang:http://a"b'
refused "a threshold above the servers" "more than the 1 Tang server" "$R" provider create web --bind "tang:$(url a)" --threshold 2
dead=http://127.0.0.1:$(free_port)
refused "a server that does not answer at create" "Cannot bind to the Tang servers" "$R" provider create web --bind "tang:$dead"
run "$R" provider list
case "$out" in *"No providers"*) pass "... no provider was created";; *) not_ok "providers after refusals: $out";; esac

# ---- one server ------------------------------------------------------------------------
run "$R" provider create web --bind "tang:$(url a)"
check "create web bound to Tang a (exit $rc: $err)" [ "$rc" -eq 0 ]
run "$R" --json provider show web
got=$(printf '%s' "$out" | json 'b=d["bound"]; print(b["kind"], b["threshold"], b["servers"][0]["url"], b["servers"][0]["answers"])')
check "show --json: tang, 1 of $(url a), answers" [ "$got" = "tang 1 $(url a) True" ]
FP=$(printf '%s' "$out" | json 'print(d["fingerprint"])')
if grep -q '^kdk=' "$(store "$R")"; then not_ok "the store holds a kdk= for the bound provider"; else pass "the store holds no kdk= for the bound provider"; fi
check "... but a bind_jwe" [ -n "$(jwe_of "$R")" ]
n=$(jwe_of "$R" | clevis decrypt 2>/dev/null | wc -c)
check "clevis decrypt by hand opens it to the 32-byte key (got $n bytes)" [ "$n" -eq 32 ]
opens "$R" web
check "opens while Tang a answers (exit $rc: $err)" [ "$rc" -eq 0 ]

tang_stop a
"$NKPCTL" --root "$R" host flush-cache >/dev/null
refused "Tang a down, cache empty: the key stays locked" "Provider 'web' is bound to the network" "$R" provider ca-cert web
case "$err" in *"$(url a)"*"nkpctl host unlock"*) pass "... the line names the server and the fix";; *) not_ok "line: $err";; esac
run "$R" host status
case "$out" in *"web"*"0 up now: IT WOULD NOT OPEN"*) pass "host status: web would not open";; *) not_ok "host status: $out";; esac
run "$R" provider list
case "$out" in *"tang 1/1 (0 up)"*) pass "provider list: tang 1/1 (0 up)";; *) not_ok "provider list: $out";; esac
tang_start a
opens "$R" web
check "Tang a back: it opens again (exit $rc: $err)" [ "$rc" -eq 0 ]
case "$out" in *"BEGIN CERTIFICATE"*) pass "... and the key is used";; *) not_ok "ca-cert: $out";; esac

# ---- 2 of 3 -------------------------------------------------------------------------
run "$R" provider create db --bind "tang:$(url a),$(url b),$(url c)" --threshold 2
check "create db bound to 2 of a, b, c (exit $rc: $err)" [ "$rc" -eq 0 ]
tang_stop b
opens "$R" db
check "b down: 2 of 3 still open it (exit $rc: $err)" [ "$rc" -eq 0 ]
tang_stop c
"$NKPCTL" --root "$R" host flush-cache >/dev/null
refused "b and c down: 1 of 3 does not" "too few of its Tang servers answered" "$R" provider ca-cert db
tang_start b && tang_start c

# ---- tangd-rotate-keys, rebind -------------------------------------------------------
old_jwe=$(jwe_of "$R" web)
/usr/libexec/tangd-rotate-keys -d "$TOP/tang-a" >/dev/null 2>&1
check "tangd-rotate-keys hid the old keys of a" [ -n "$(ls -A "$TOP/tang-a" | grep '^\.')" ]
opens "$R" web
check "after rotation the old binding still opens (old keys kept) (exit $rc: $err)" [ "$rc" -eq 0 ]
before_vm=$(sha256sum <"$(store "$R")")
run "$R" provider rebind web --bind "tang:$(url a)"
check "rebind web to a's new keys (exit $rc: $err)" [ "$rc" -eq 0 ]
new_jwe=$(jwe_of "$R" web)
check "... a new JWE" [ -n "$new_jwe" -a "$new_jwe" != "$old_jwe" ]
run "$R" --json provider show web
check "... the same fingerprint (the key did not change)" [ "$(printf '%s' "$out" | json 'print(d["fingerprint"])')" = "$FP" ]
rm -f "$TOP/tang-a"/.*.jwk
opens "$R" web
check "old keys deleted: the rebound provider opens (exit $rc: $err)" [ "$rc" -eq 0 ]
printf '%s' "$old_jwe" | clevis decrypt >/dev/null 2>&1
check "... and the old JWE no longer does (it used the old keys)" [ $? -ne 0 ]

# rebind to no binding and back: the key stays
run "$R" provider rebind web --bind none
check "rebind web --bind none (exit $rc: $err)" [ "$rc" -eq 0 ]
check "... the store holds its kdk= again" grep -q '^kdk=' "$(store "$R")"
run "$R" --json provider show web
check "... shown unbound, same fingerprint" [ "$(printf '%s' "$out" | json 'print(d["bound"], d["fingerprint"])')" = "None $FP" ]
tang_stop a
refused "rebind to a server that does not answer: nothing written" "Cannot bind to the Tang servers" "$R" provider rebind web --bind "tang:$(url a)"

assert_done
