#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl provider backup / restore end to end: the backup is a PKCS#12 file
# that `openssl pkcs12 -info` reads (PBES2 AES-256-CBC + PBKDF2-SHA256, MAC
# SHA-256, the provider name as friendlyName); a restore into another root
# gives the same key id and fingerprint; every bad file is refused with a
# non-zero exit, ONE line on stderr, and the target root byte-for-byte
# unchanged.
set -u
source "$(dirname "$0")/lib/cli.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
command -v openssl >/dev/null || skip_all "the openssl program is not installed"
TOP=$(mktemp -d)
# Flush every root's key cache (kernel keyring) before removing it: the
# keyrings outlive the process and would pile up in root's @u.
cleanup() {
        local r
        for r in "$TOP"/root.*; do
                [ -d "$r/var/lib/nkp" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1
        done
        rm -rf "$TOP"
}
trap cleanup EXIT

# run ROOT ARGS…: runs nkpctl, leaves $out, $err, $rc.
run() {
        local root=$1; shift
        out=$("$NKPCTL" --root "$root" "$@" 2>"$TOP/stderr"); rc=$?
        err=$(cat "$TOP/stderr")
}

# refused WHAT NEEDLE ROOT ARGS…: the command exits non-zero with one stderr
# line containing NEEDLE and changes nothing under ROOT.
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
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# UTF-8 on purpose: openssl must read what nkp wrote with the same bytes
PW=$TOP/pw
printf 'correct horse b\xc3\xa4ttery staple \xe2\x82\xac\n' >"$PW"
WRONG=$TOP/wrong
printf 'correct horse battery staple \xe2\x82\xac\n' >"$WRONG"
EMPTY=$TOP/empty
: >"$EMPTY"

# ---- backup ---------------------------------------------------------------
R1=$(cli_newroot "$TOP")
run "$R1" provider create prod
check "create prod" [ "$rc" -eq 0 ]
run "$R1" --json provider show prod
KEY_ID=$(printf '%s' "$out" | json 'print(d["key_id"])')
FP=$(printf '%s' "$out" | json 'print(d["fingerprint"])')
check "prod starts not backed up" [ "$(printf '%s' "$out" | json 'print(d["backed_up"])')" = False ]

F=$TOP/prod.p12
refused "backup with an empty password file" "empty" "$R1" provider backup prod --out "$F" --password-file "$EMPTY"
check "…and wrote no file" [ ! -e "$F" ]
refused "backup of a provider that does not exist" "nope" "$R1" provider backup nope --out "$F" --password-file "$PW"
check "…and wrote no file" [ ! -e "$F" ]

t0=$(now)
run "$R1" provider backup prod --out "$F" --password-file "$PW"
t1=$(now)
check "backup prod (exit $rc: $err)" [ "$rc" -eq 0 ]
echo "# backup took $(secs "$t0" "$t1") s"
check "the backup is mode 0600" [ "$(stat -c %a "$F")" = 600 ]
run "$R1" --json provider show prod
check "prod is backed up" [ "$(printf '%s' "$out" | json 'print(d["backed_up"])')" = True ]
if grep -qa "correct horse" "$F"; then not_ok "the password is in the file"; else pass "the password is not in the file"; fi

before=$(sha256sum <"$F")
refused "backup over an existing file" "already exists" "$R1" provider backup prod --out "$F" --password-file "$PW"
check "…which is unchanged" [ "$(sha256sum <"$F")" = "$before" ]

# ---- openssl reads it ----------------------------------------------------------
info=$(openssl pkcs12 -info -in "$F" -passin "file:$PW" -nokeys 2>&1); orc=$?
check "openssl pkcs12 -info reads the backup (exit $orc)" [ "$orc" -eq 0 ]
has() { case "$info" in *"$1"*) pass "openssl shows: $1";; *) not_ok "openssl output lacks '$1': $info";; esac; }
has "friendlyName: prod"
has "$KEY_ID"
has "MAC: sha256, Iteration 600000"
has "PBES2, PBKDF2, AES-256-CBC, Iteration 600000, PRF hmacWithSHA256"
has "Secret bag"
openssl pkcs12 -info -in "$F" -passin "file:$WRONG" -nokeys >/dev/null 2>&1
check "openssl refuses the wrong password" [ $? -ne 0 ]

# ---- restore into another root ---------------------------------------------------
R2=$(cli_newroot "$TOP")
t0=$(now)
run "$R2" provider restore "$F" --password-file "$PW"
t1=$(now)
check "restore into another root (exit $rc: $err)" [ "$rc" -eq 0 ]
echo "# restore took $(secs "$t0" "$t1") s"
run "$R2" --json provider show prod
check "same key id" [ "$(printf '%s' "$out" | json 'print(d["key_id"])')" = "$KEY_ID" ]
check "same fingerprint" [ "$(printf '%s' "$out" | json 'print(d["fingerprint"])')" = "$FP" ]
check "restored as backed up" [ "$(printf '%s' "$out" | json 'print(d["backed_up"])')" = True ]

before=$(tree_sum "$R2")
run "$R2" --json provider restore "$F" --password-file "$PW"
check "restoring again succeeds (exit $rc: $err)" [ "$rc" -eq 0 ]
check "…and says it was already there" [ "$(printf '%s' "$out" | json 'print(d["already"])')" = True ]
check "…and changes nothing" [ "$before" = "$(tree_sum "$R2")" ]
run "$R2" provider restore "$F" --password-file "$PW"
case "$out" in *already*) pass "restore again says 'already' in plain text";; *) not_ok "restore again: $out";; esac

# ---- bad files: refused, the target root unchanged --------------------------------
R3=$(cli_newroot "$TOP")
run "$R3" provider create other
check "create another provider in the target root" [ "$rc" -eq 0 ]

refused "wrong password" "password is wrong" "$R3" provider restore "$F" --password-file "$WRONG"
refused "empty password file" "empty" "$R3" provider restore "$F" --password-file "$EMPTY"
refused "missing file" "missing.p12" "$R3" provider restore "$TOP/missing.p12" --password-file "$PW"

size=$(stat -c %s "$F")
for cut in 0 1 16 $((size / 2)) $((size - 1)); do
        head -c "$cut" "$F" >"$TOP/cut.p12"
        refused "truncated to $cut of $size bytes" "" "$R3" provider restore "$TOP/cut.p12" --password-file "$PW"
done

for pos in 8 40 $((size / 3)) $((size / 2)) $((size - 40)) $((size - 2)); do
        python3 - "$F" "$TOP/flip.p12" "$pos" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[int(sys.argv[3])] ^= 0x04
open(sys.argv[2], "wb").write(data)
PY
        refused "bit flipped at byte $pos" "" "$R3" provider restore "$TOP/flip.p12" --password-file "$PW"
done

# a certificate bundle: a .p12, but no nkp secret in it
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=nkp-test -days 1 \
        -keyout "$TOP/cert.key" -out "$TOP/cert.pem" >/dev/null 2>&1 &&
openssl pkcs12 -export -inkey "$TOP/cert.key" -in "$TOP/cert.pem" -name cert \
        -passout "file:$PW" -out "$TOP/certs.p12" >/dev/null 2>&1
check "openssl made a certificate bundle" [ -s "$TOP/certs.p12" ]
refused "certificate bundle" "not an nkp provider backup" "$R3" provider restore "$TOP/certs.p12" --password-file "$PW"

head -c 4096 /dev/urandom >"$TOP/random.p12"
refused "random bytes" "" "$R3" provider restore "$TOP/random.p12" --password-file "$PW"

# weak PKCS#12 files made by openssl pkcs12 itself: refused saying what they are
# and how to re-export them, never "damaged"
for opts in "-keypbe NONE -certpbe NONE|keys are not encrypted" \
            "-legacy|legacy pbeWithSHA1And40BitRC2-CBC" \
            "-keypbe PBE-SHA1-3DES -certpbe PBE-SHA1-3DES|legacy pbeWithSHA1And3-KeyTripleDES-CBC"; do
        openssl pkcs12 -export -inkey "$TOP/cert.key" -in "$TOP/cert.pem" ${opts%%|*} \
                -passout "file:$PW" -out "$TOP/weak.p12" >/dev/null 2>&1
        refused "openssl pkcs12 ${opts%%|*}" "${opts#*|}" "$R3" provider restore "$TOP/weak.p12" --password-file "$PW"
        case "$err" in *"-keypbe AES-256-CBC -certpbe AES-256-CBC"*) pass "... says how to re-export";; *) not_ok "... no re-export hint: $err";; esac
        case "$err" in *damaged*) not_ok "... says damaged: $err";; *) pass "... does not say damaged";; esac
        rm -f "$TOP/weak.p12"
done

# the password file: a named FIFO (no writer) or a directory or a device is
# refused at once, never a hang; a pipe on stdin still works (the demo's way)
mkfifo "$TOP/fifo"
refused "password file is a named FIFO" "is a named FIFO" "$R3" provider restore "$F" --password-file "$TOP/fifo"
refused "password file is a directory" "is a directory" "$R3" provider restore "$F" --password-file "$TOP"
refused "password file is /dev/zero" "a device or socket" "$R3" provider restore "$F" --password-file /dev/zero
refused "backup with a FIFO as the password file" "is a named FIFO" "$R1" provider backup prod --out "$TOP/never.p12" --password-file "$TOP/fifo"
check "... and no backup file was written" [ ! -e "$TOP/never.p12" ]
R5=$(cli_newroot "$TOP")
out=$(cat "$PW" | "$NKPCTL" --root "$R5" provider restore "$F" --password-file /dev/stdin 2>&1); rc=$?
check "a pipe on /dev/stdin as the password file works (exit $rc: $out)" [ "$rc" -eq 0 ]
# --password-stdin: stdin as the spawner made it, here a socket (as node and
# some Cockpit bridges make), which /dev/stdin cannot open
R7=$(cli_newroot "$TOP")
sock_restore() { # ROOT ARGS…: nkpctl with a socketpair on stdin holding the password
        python3 - "$NKPCTL" "$PW" "$@" <<'PY'
import socket, subprocess, sys
nkpctl, pw, root, *args = sys.argv[1:]
a, b = socket.socketpair()
a.sendall(open(pw, "rb").read()); a.shutdown(socket.SHUT_WR)
sys.exit(subprocess.run([nkpctl, "--root", root] + args, stdin=b).returncode)
PY
}
out=$(sock_restore "$R7" provider restore "$F" --password-file /dev/stdin 2>&1); rc=$?
check "a socket on stdin: --password-file /dev/stdin cannot open it (exit $rc)" [ "$rc" -eq 1 ]
out=$(sock_restore "$R7" provider restore "$F" --password-stdin 2>&1); rc=$?
check "a socket on stdin: --password-stdin reads it (exit $rc: $out)" [ "$rc" -eq 0 ]
refused "both --password-file and --password-stdin" "not both" "$R3" provider restore "$F" --password-file "$PW" --password-stdin

# a symlink to the backup is followed for reading (no ELOOP)
R6=$(cli_newroot "$TOP")
ln -s "$F" "$TOP/link.p12"
run "$R6" provider restore "$TOP/link.p12" --password-file "$PW"
check "restore through a symlinked path (exit $rc: $err)" [ "$rc" -eq 0 ]
run "$R6" --json provider show prod
check "... the same key id" [ "$(printf '%s' "$out" | json 'print(d["key_id"])')" = "$KEY_ID" ]

# name collision: R4 holds another provider called prod
R4=$(cli_newroot "$TOP")
run "$R4" provider create prod
check "create a different prod" [ "$rc" -eq 0 ]
refused "same name, other key id" "A different provider named 'prod'" "$R4" provider restore "$F" --password-file "$PW"

# ---- provider verify: checks without importing, writes nothing -------------------
# verify_ok WHAT HERE ROOT FILES… (passwords from $VPW, one per file): exit 0,
# the fields of prod, "here" = HERE, and ROOT byte-for-byte unchanged.
verify_ok() {
        local what=$1 here=$2 root=$3; shift 3
        local before pwargs=() f
        for f in "${VPW[@]}"; do pwargs+=(--password-file "$f"); done
        before=$(tree_sum "$root")
        run "$root" --json provider verify "$@" "${pwargs[@]}"
        if [ "$rc" -ne 0 ]; then not_ok "$what: exit $rc: $err"; return; fi
        local got
        got=$(printf '%s' "$out" | json 'print(d["name"], d["key_id"], d["fingerprint"], d["here"])')
        check "$what: name, key id, fingerprint, here=$here" [ "$got" = "prod $KEY_ID $FP $here" ]
        check "$what: the root is unchanged" [ "$before" = "$(tree_sum "$root")" ]
}
VPW=("$PW")
verify_ok "verify on the host that holds it" same "$R1" "$F"
verify_ok "verify on a host without it" none "$R3" "$F"
verify_ok "verify where another prod is" different "$R4" "$F"
run "$R1" provider verify "$F" --password-file "$PW"
case "$out" in *"holds the same provider"*"" ) pass "verify in plain text says 'holds the same provider'";; *) not_ok "verify text: $out";; esac
case "$out" in *"$FP"*) pass "... and prints the fingerprint";; *) not_ok "verify text lacks the fingerprint: $out";; esac
refused "verify: wrong password" "password is wrong" "$R1" provider verify "$F" --password-file "$WRONG"
head -c $((size / 2)) "$F" >"$TOP/cut.p12"
refused "verify: truncated file" "truncated" "$R1" provider verify "$TOP/cut.p12" --password-file "$PW"
refused "verify: a foreign PKCS#12 (certificate bundle)" "not an nkp provider backup" "$R1" provider verify "$TOP/certs.p12" --password-file "$PW"
refused "verify: two password files for one backup" "2 --password-file options for 1 file" "$R1" provider verify "$F" --password-file "$PW" --password-file "$PW"

# ---- m-of-n shares ------------------------------------------------------------------
SD=$TOP/shares
mkdir "$SD"
SPW=()
for i in 1 2 3; do
        printf 'share password %d \xe2\x82\xac\n' "$i" >"$TOP/spw$i"
        SPW+=("$TOP/spw$i")
done
refused "shares: threshold above the count" "--threshold" "$R1" provider backup prod --shares 3 --threshold 4 --out-dir "$SD" --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"
refused "shares: too few password files" "2 --password-file options for 3 files" "$R1" provider backup prod --shares 3 --threshold 2 --out-dir "$SD" --password-file "${SPW[0]}" --password-file "${SPW[1]}"
refused "shares: no such directory" "not a directory" "$R1" provider backup prod --shares 3 --threshold 2 --out-dir "$TOP/nodir" --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"
check "... no share file was written" [ -z "$(ls -A "$SD")" ]
run "$R1" provider backup prod --shares 3 --threshold 2 --out-dir "$SD" \
        --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"
check "backup prod as 2-of-3 shares (exit $rc: $err)" [ "$rc" -eq 0 ]
S=("$SD/prod-share-1-of-3.p12" "$SD/prod-share-2-of-3.p12" "$SD/prod-share-3-of-3.p12")
check "... three share files, mode 0600" [ "$(stat -c %a "${S[@]}" | sort -u)" = 600 ]
info=$(openssl pkcs12 -info -in "${S[1]}" -passin "file:${SPW[1]}" -nokeys 2>&1)
check "openssl pkcs12 -info reads a share with its own password" [ $? -eq 0 ]
case "$info" in *"2/3"*) pass "... it names share 2/3";; *) not_ok "share 2 lacks '2/3': $info";; esac
refused "shares: written again over existing files" "already exists" "$R1" provider backup prod --shares 3 --threshold 2 --out-dir "$SD" --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"

# every 2-subset (in both orders for one) restores the same provider in a fresh root
for pair in "0 1" "0 2" "1 2" "2 0"; do
        read -r a b <<<"$pair"
        Rs=$(cli_newroot "$TOP")
        run "$Rs" provider restore "${S[a]}" "${S[b]}" --password-file "${SPW[a]}" --password-file "${SPW[b]}"
        check "restore from shares $((a + 1)) and $((b + 1)) (exit $rc: $err)" [ "$rc" -eq 0 ]
        run "$Rs" --json provider show prod
        got=$(printf '%s' "$out" | json 'print(d["key_id"], d["fingerprint"])')
        check "... the same key id and fingerprint" [ "$got" = "$KEY_ID $FP" ]
done
Rs=$(cli_newroot "$TOP")
run "$Rs" provider restore "${S[@]}" --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"
check "restore from all three shares (exit $rc: $err)" [ "$rc" -eq 0 ]
VPW=("${SPW[2]}" "${SPW[0]}")
verify_ok "verify shares 3 and 1 on a host without prod" none "$R3" "${S[2]}" "${S[0]}"
run "$R3" provider verify "${S[2]}" "${S[0]}" --password-file "${SPW[2]}" --password-file "${SPW[0]}"
case "$out" in *"2 given of 3, threshold 2"*) pass "verify says: 2 given of 3, threshold 2";; *) not_ok "verify shares text: $out";; esac

refused "restore from one share of a 2-of-3 split" "needs 2 of its 3" "$R3" provider restore "${S[0]}" --password-file "${SPW[0]}"
refused "verify one share of a 2-of-3 split" "needs 2 of its 3" "$R3" provider verify "${S[1]}" --password-file "${SPW[1]}"
refused "restore from the same share twice" "given twice" "$R3" provider restore "${S[0]}" "${S[0]}" --password-file "${SPW[0]}" --password-file "${SPW[0]}"
refused "a share with the wrong password" "password is wrong" "$R3" provider restore "${S[0]}" "${S[1]}" --password-file "${SPW[0]}" --password-file "${SPW[0]}"
refused "a whole backup with a share" "whole backup" "$R3" provider restore "$F" "${S[0]}" --password-file "$PW" --password-file "${SPW[0]}"

# a second split of the same provider: its shares do not mix with the first's
SD2=$TOP/shares2
mkdir "$SD2"
run "$R1" provider backup prod --shares 3 --threshold 2 --out-dir "$SD2" \
        --password-file "${SPW[0]}" --password-file "${SPW[1]}" --password-file "${SPW[2]}"
check "a second 2-of-3 split (exit $rc: $err)" [ "$rc" -eq 0 ]
refused "shares of two different splits" "two different splits" "$R3" provider restore "${S[0]}" "$SD2/prod-share-2-of-3.p12" --password-file "${SPW[0]}" --password-file "${SPW[1]}"

# a bit-flipped share: refused (the MAC), never a wrong key
ssize=$(stat -c %s "${S[1]}")
for pos in 40 $((ssize / 2)) $((ssize - 40)); do
        python3 - "${S[1]}" "$TOP/flip.p12" "$pos" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[int(sys.argv[3])] ^= 0x04
open(sys.argv[2], "wb").write(data)
PY
        refused "share 2 bit-flipped at byte $pos" "" "$R3" provider restore "${S[0]}" "$TOP/flip.p12" --password-file "${SPW[0]}" --password-file "${SPW[1]}"
done

assert_done
