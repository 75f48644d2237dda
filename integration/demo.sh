#!/bin/bash
# The Quickstart demo: a provider walk-through in a throwaway root
# (create, back up, inspect the .p12, restore on a "second host", alarms).
# Usage: integration/demo.sh BUILD_DIR        (the VM lab demo is in integration/t-nkp-lifecycle.sh)
set -euo pipefail
build=${1:-build}
nkpctl=$(realpath "$build/plugin/nkpctl/nkpctl")
top=$(mktemp -d)
cleanup() { "$nkpctl" --root "$top/a" host flush-cache >/dev/null 2>&1 || true
            "$nkpctl" --root "$top/b" host flush-cache >/dev/null 2>&1 || true; rm -rf "$top"; }
trap cleanup EXIT
for h in a b; do mkdir -p "$top/$h/etc/nkp"; printf '[tpm]\ntcti=none\n' >"$top/$h/etc/nkp/nkp.conf"; done
umask 077; head -c 18 /dev/urandom | base64 >"$top/pw"
say() { printf '\n$ %s\n' "$*"; "$@"; }
say "$nkpctl" --root "$top/a" provider create prod
say "$nkpctl" --root "$top/a" alarms
say "$nkpctl" --root "$top/a" provider backup prod --out "$top/prod.p12" --password-file "$top/pw"
say "$nkpctl" --root "$top/a" provider set-default prod
say "$nkpctl" --root "$top/a" provider list
say openssl pkcs12 -info -in "$top/prod.p12" -passin "file:$top/pw" -nokeys -nomacver -noout
say "$nkpctl" --root "$top/b" provider restore "$top/prod.p12" --password-file "$top/pw"
say "$nkpctl" --root "$top/b" --json provider show prod
a=$("$nkpctl" --root "$top/a" --json provider show prod | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["key_id"], d["fingerprint"])')
b=$("$nkpctl" --root "$top/b" --json provider show prod | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["key_id"], d["fingerprint"])')
[ "$a" = "$b" ] && echo "demo: host b holds the same provider (key id and fingerprint match)"
