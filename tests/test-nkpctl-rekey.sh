#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl vm rekey (shallow) against libvirt's test driver (no daemon): the
# happy path for one VM and --all (text and --json), the target picked by
# --provider or the default, a rekey away from a provider deleted but still
# cached, and every refusal with one line on stderr and the store unchanged.
# The real thing (a running guest, live + persistent definitions, kill -9)
# is integration/t-nkp-rekey.sh.  The test driver reloads its file on every
# connection, so each nkpctl run starts from the same domains.
set -u
source "$(dirname "$0")/lib/cli.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
TOP=$(mktemp -d)
R="$TOP/root"
cleanup() {
        "$NKPCTL" --root "$R" host flush-cache >/dev/null 2>&1
        rm -rf "$TOP"
}
trap cleanup EXIT
json() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }
run() {
        out=$("$NKPCTL" --root "$R" --connect "$VC" "$@" 2>"$TOP/stderr"); rc=$?
        err=$(cat "$TOP/stderr")
}
refused() { # WHAT NEEDLE ARGS…: exit 1, one stderr line with NEEDLE, store unchanged
        local what=$1 needle=$2 before after; shift 2
        before=$(tree_sum "$R")
        run "$@"
        after=$(tree_sum "$R")
        if [ "$rc" -ne 1 ]; then not_ok "$what: exit $rc ($err)"; return; fi
        if [ "$(printf '%s' "$err" | grep -c '')" -ne 1 ]; then not_ok "$what: not one stderr line: $err"; return; fi
        case "$err" in nkpctl:*"$needle"*) ;; *) not_ok "$what: stderr lacks '$needle': $err"; return;; esac
        if [ "$before" != "$after" ]; then not_ok "$what: the store changed"; return; fi
        pass "$what"
}

mkdir -p "$R/etc/nkp"
printf '[tpm]\ntcti=none\n' >"$R/etc/nkp/nkp.conf"
printf 'test password\n' >"$TOP/pw"
for p in old new idle; do "$NKPCTL" --root "$R" provider create "$p" >/dev/null; done
for p in old new; do "$NKPCTL" --root "$R" provider backup "$p" --out "$TOP/$p.p12" --password-file "$TOP/pw" >/dev/null; done
show() { "$NKPCTL" --root "$R" --json provider show old | json "print(d[\"$1\"])"; }
kid=$(show key_id)
fp=$(show fingerprint)
# One nkp VM (a keysafe of provider "old" without objects: rewrapping zero
# DEKs still renews the salt and the provider) and one plain VM.
cat >"$TOP/libvirt.xml" <<EOF
<node>
  <domain type='test'>
    <name>web01</name>
    <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <metadata>
      <nkp:keysafe xmlns:nkp="https://nkp.invalid/xmlns/keysafe/1" version="1">
        <nkp:vm uuid="6695eb01-f6a4-8304-79aa-97f2502e193f"/>
        <nkp:provider name="old" key-id="$kid" fingerprint="$fp"/>
        <nkp:kek salt="AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="/>
      </nkp:keysafe>
    </metadata>
  </domain>
  <domain type='test'>
    <name>plain</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
  </domain>
</node>
EOF
VC="test://$TOP/libvirt.xml"

run vm rekey web01 --provider new
check "rekey one VM" [ "$rc" -eq 0 ]
check "rekey says from and to" grep -q "rekeyed to provider 'new' (was 'old')" <<<"$out"
run --json vm rekey web01 --provider=new
check "rekey --json" json 'assert d["result"] == "rekeyed" and d["from"] == "old" and d["provider"] == "new", d' <<<"$out"
run vm rekey --all --provider new
check "--all: one line for the nkp VM, none for the plain one" [ "$rc" -eq 0 ] && [ "$out" = "web01: rekeyed to 'new' (was 'old')" ]
run --json vm rekey --all --provider old
check "--all --json, to the VM's own provider" json 'assert [v["name"] for v in d] == ["web01"] and d[0]["result"] == "rekeyed", d' <<<"$out"

refused "no default provider" "No default provider" vm rekey web01
"$NKPCTL" --root "$R" provider set-default new >/dev/null
run vm rekey web01
check "the default provider is the target" grep -q "rekeyed to provider 'new'" <<<"$out"
refused "plain VM" "is not encrypted by nkp" vm rekey plain
refused "unknown domain" "nosuch" vm rekey nosuch
refused "unknown provider" "no provider 'nope'" vm rekey web01 --provider nope
refused "provider never backed up" "never backed up" vm rekey web01 --provider idle
run vm rekey web01 --all
check "DOMAIN and --all together: usage error" [ "$rc" -ne 0 ]
run vm rekey --all --deep
check "--all --deep: usage error" [ "$rc" -ne 0 ]

# The VM's lock (journal.c) held by another command (vm encrypt, decrypt,
# rekey --deep hold it while they run): refused, nothing changed.
lock="$R/var/lib/nkp/journal/6695eb01-f6a4-8304-79aa-97f2502e193f.lock"
if [ -e "$lock" ] && command -v flock >/dev/null; then
        exec 9<"$lock"
        flock -n 9
        refused "the VM is locked by another nkpctl command" "being changed by another nkpctl command" vm rekey web01
        exec 9<&-
else
        not_ok "no lock file at $lock after a rekey (or no flock(1))"
fi

# An encrypt/decrypt/deep rekey of the VM that a crash interrupted (a
# journal): the rekey reconciles it first (here: rolled back, the definition
# being the old side), then rekeys; alone and with --all.
journal="$R/var/lib/nkp/journal/6695eb01-f6a4-8304-79aa-97f2502e193f.ini"
P="$TOP/vda.qcow2"
interrupted_encrypt() {
        echo OLD >"$P"; echo NEW >"$P.nkp-new"
        printf '[journal]\nversion=1\nop=encrypt\nname=web01\nuuid=6695eb01-f6a4-8304-79aa-97f2502e193f\nphase=converting\nold=%s\nnew=none\nfiles=%s\nscratch=\ndirs=%s\n' \
                "$(printf '0%.0s' $(seq 64))" "$P" "$(stat -c %d:%i "$TOP")" >"$journal"
        chmod 600 "$journal"
}
rolled_back() { [ ! -e "$P.nkp-new" ] && [ "$(cat "$P")" = OLD ] && [ ! -e "$journal" ]; }
interrupted_encrypt
run vm rekey web01 --provider new
check "an interrupted conversion: reconciled, then rekeyed" \
        bash -c '[ "$1" -eq 0 ] && grep -q "rekeyed to provider '"'new'"'" <<<"$2"' _ "$rc" "$out"
check "... its new copy and journal removed" rolled_back
interrupted_encrypt
run vm rekey --all --provider new
check "--all: an interrupted conversion reconciled, then rekeyed" \
        bash -c '[ "$1" -eq 0 ] && [ "$2" = "web01: rekeyed to '"'new' (was 'old')"'" ]' _ "$rc" "$out"
check "... its new copy and journal removed" rolled_back

# The VM's provider deleted: still cached → the rekey works; cache flushed → refused.
"$NKPCTL" --root "$R" --connect "$VC" provider delete old --force >/dev/null 2>&1
run vm rekey web01 --provider new
check "rekey away from a provider deleted but still cached" [ "$rc" -eq 0 ]
"$NKPCTL" --root "$R" host flush-cache >/dev/null
refused "the VM's provider is missing" "provider 'old'" vm rekey web01 --provider new
check "…and the error names the fix" grep -q "nkpctl provider restore" <<<"$err"
run vm rekey --all
check "--all with a locked VM exits 1" [ "$rc" -eq 1 ]
check "--all reports it locked" grep -q "^web01: locked: .*provider 'old'" <<<"$out"
check "--all says how many were not rekeyed" grep -q "1 of 1 nkp VMs were not rekeyed" <<<"$err"
run --json vm rekey --all
check "--all --json with a locked VM" json 'assert d[0]["result"] == "locked" and "old" in d[0]["reason"], d' <<<"$out"

assert_done
