#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl provider … and nkpctl alarms end to end: each case in its own
# --root; every refused command must exit non-zero with ONE line on stderr
# and leave the tree byte-for-byte unchanged.
set -u
source "$(dirname "$0")/lib/cli.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
TOP=$(mktemp -d)
swtpm_pid=
cleanup() {
        if [ -n "$swtpm_pid" ]; then kill "$swtpm_pid" 2>/dev/null; wait "$swtpm_pid" 2>/dev/null; fi
        # Forget the keys these roots put into the key cache.
        for r in "$TOP"/root.*; do [ -d "$r" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1; done
        rm -rf "$TOP"
}
trap cleanup EXIT

# run ROOT ARGS…: runs nkpctl, leaves $out, $err, $rc.
# (--connect test:///default: provider usage/delete ask libvirt which VMs use a
# provider; libvirt's built-in test driver answers without a daemon.)
run() {
        local root=$1; shift
        out=$(${RUN_PREFIX:-} "$NKPCTL" --root "$root" --connect test:///default "$@" 2>"$TOP/stderr"); rc=$?
        err=$(cat "$TOP/stderr")
}

# refused WHAT EXPECTED_RC NEEDLE ROOT ARGS…: the command fails with
# EXPECTED_RC, one stderr line containing NEEDLE, and changes nothing.
refused() {
        local what=$1 want=$2 needle=$3 root=$4; shift 4
        local before after lines
        before=$(tree_sum "$root")
        run "$root" "$@"
        after=$(tree_sum "$root")
        lines=$(printf '%s' "$err" | grep -c '')
        if [ "$rc" -ne "$want" ]; then not_ok "$what: exit $rc, expected $want ($err)"; return; fi
        if [ "$lines" -ne 1 ]; then not_ok "$what: $lines lines on stderr: $err"; return; fi
        case "$err" in nkpctl:*"$needle"*) ;; *) not_ok "$what: stderr lacks '$needle': $err"; return;; esac
        if [ "$before" != "$after" ]; then not_ok "$what: the tree changed"; return; fi
        pass "$what"
}

json() { python3 -c "import json,sys; d=json.load(sys.stdin); $1"; }

# ---- create, list, show --------------------------------------------------
R=$(cli_newroot "$TOP")
run "$R" provider create prod
check "create prod" [ "$rc" -eq 0 ]
check "create prints the backup hint" grep -q "nkpctl provider backup prod" <<<"$out"
run "$R" provider create dev --require-tpm
check "create --require-tpm without a TPM fails" [ "$rc" -eq 1 ]
check "  ... saying so" grep -q "requires a TPM 2.0" <<<"$err"
run "$R" provider create dev
run "$R" --json provider list
check "list --json is an array of 2" json 'assert len(d) == 2' <<<"$out"
check "list --json is sorted and has every field" json '
assert [p["name"] for p in d] == ["dev", "prod"]
for p in d:
    for k in ("name","key_id","fingerprint","default","backed_up","require_tpm","sealed","active","created"):
        assert k in p, k
    assert p["sealed"] == "none" and p["default"] is False and p["active"] is False
    assert len(p["fingerprint"]) == 64 and len(p["key_id"]) == 36
    assert p["created"].endswith("Z") and "T" in p["created"]' <<<"$out"
run "$R" provider show prod --json
check "show --json (option after the command)" json 'assert d["name"] == "prod" and d["backed_up"] is False' <<<"$out"
key_id=$(json 'print(d["key_id"])' <<<"$out")
run "$R" provider show prod
check "show (human) has the key id" grep -q "key id: *$key_id" <<<"$out"
run "$R" provider list
check "list (human) has a header and 2 rows" [ "$(grep -c '' <<<"$out")" -eq 3 ]
check "list (human) columns align" python3 -c '
import sys
lines = sys.stdin.read().splitlines()
col = lines[0].index("KEY ID")
assert all(len(l) > col and l[col-2:col] == "  " and l[col] != " " for l in lines), lines' <<<"$out"
check "store file is 0600" [ "$(stat -c %a "$R/var/lib/nkp/providers.ini")" = 600 ]
check "store dir is 0700" [ "$(stat -c %a "$R/var/lib/nkp")" = 700 ]
check "no temp files left" [ -z "$(find "$R" -name '*.tmp-*')" ]
run "$R" alarms --json
check "alarms: both providers inactive" json '
k = sorted((a["kind"], a["subject"]) for a in d)
assert k == [("provider-inactive","dev"), ("provider-inactive","prod")], k' <<<"$out"

# ---- refused operations change nothing --------------------------------------
refused "duplicate name" 1 "already exists" "$R" provider create prod
refused "invalid name (space)" 1 "not a valid provider name" "$R" provider create "bad name"
refused "invalid name (slash)" 1 "not a valid provider name" "$R" provider create "../x"
refused "invalid name (..)" 1 "not a valid provider name" "$R" provider create ..
refused "invalid name (.)" 1 "not a valid provider name" "$R" provider create .
refused "show of '..'" 1 "not a valid provider name" "$R" provider show ..
refused "--root ''" 2 "--root needs a directory" "$R" --root "" provider list
refused "invalid name (65 chars)" 1 "not a valid provider name" "$R" provider create "$(printf 'x%.0s' {1..65})"
refused "create --default" 1 "back it up" "$R" provider create newone --default
refused "set-default of an inactive provider" 1 "nkpctl provider backup prod --out FILE.p12" "$R" provider set-default prod
refused "set-default of a missing provider" 1 "no provider named 'nope'" "$R" provider set-default nope
refused "show of a missing provider" 1 "no provider named 'nope'" "$R" provider show nope
refused "delete of a missing provider" 1 "no provider named 'nope'" "$R" provider delete nope
refused "usage: no NAME" 2 "exactly one NAME" "$R" provider show
refused "usage: unknown option" 2 "Unknown option" "$R" provider list --bogus
refused "usage: unknown command" 2 "unknown provider command" "$R" provider frobnicate
refused "usage: unknown global option" 2 "unknown or incomplete option" "$R" --bogus provider list
refused "backup without --out" 2 "--out" "$R" provider backup prod
E=$(cli_newroot "$TOP")
refused "invalid name on an empty root" 1 "not a valid provider name" "$E" provider create "a b"
refused "create --default on an empty root" 1 "back it up" "$E" provider create first --default
check "  ... created no store" [ ! -e "$E/var/lib/nkp" ]

# ---- 33rd provider ------------------------------------------------------------
L=$(cli_newroot "$TOP")
for i in $(seq -w 1 32); do "$NKPCTL" --root "$L" provider create "p$i" >/dev/null || not_ok "create p$i"; done
run "$L" --json provider list
check "32 providers" json 'assert len(d) == 32' <<<"$out"
refused "33rd provider" 1 "32 providers" "$L" provider create p33

# ---- damaged store ---------------------------------------------------------------
C=$(cli_newroot "$TOP")
"$NKPCTL" --root "$C" provider create one >/dev/null
chmod 0644 "$C/var/lib/nkp/providers.ini"
refused "store file 0644: list" 1 "chmod 600" "$C" provider list
refused "store file 0644: create" 1 "chmod 600" "$C" provider create two
chmod 0600 "$C/var/lib/nkp/providers.ini"
chmod 0755 "$C/var/lib/nkp"
refused "store dir 0755: list" 1 "chmod 700" "$C" provider list
chmod 0700 "$C/var/lib/nkp"
cp "$C/var/lib/nkp/providers.ini" "$TOP/good.ini"
printf 'garbage\n' >>"$C/var/lib/nkp/providers.ini"
refused "garbage appended" 1 "is damaged" "$C" provider list
refused "garbage appended: create" 1 "is damaged" "$C" provider create two
refused "garbage appended: alarms" 1 "is damaged" "$C" alarms
head -c 200 "$TOP/good.ini" >"$C/var/lib/nkp/providers.ini"
refused "truncated store" 1 "is damaged" "$C" provider show one
sed 's/^flags=.*/flags=default;/' "$TOP/good.ini" >"$C/var/lib/nkp/providers.ini"
refused "store with an inactive default" 1 "never backed up" "$C" provider list
cp "$TOP/good.ini" "$C/var/lib/nkp/providers.ini"
run "$C" provider show one
check "good copy put back: loads again" [ "$rc" -eq 0 ]

# ---- crash safety: a stale temp file does not break anything ------------------------
printf '[nkp]\nversion=1\n[provider half' >"$C/var/lib/nkp/providers.ini.tmp-Xy12Zz"
chmod 600 "$C/var/lib/nkp/providers.ini.tmp-Xy12Zz"
run "$C" provider list
check "stale temp file: list works" [ "$rc" -eq 0 ]
run "$C" provider create two
check "stale temp file: create works" [ "$rc" -eq 0 ]
check "stale temp file: removed by the next writer" [ -z "$(find "$C" -name '*.tmp-*')" ]

# ---- concurrency: 8 creates at once ------------------------------------------------------
P=$(cli_newroot "$TOP")
pids=()
for i in 1 2 3 4 5 6 7 8; do
        "$NKPCTL" --root "$P" provider create "par$i" >/dev/null 2>"$TOP/par$i.err" &
        pids+=($!)
done
par_ok=true
for p in "${pids[@]}"; do wait "$p" || par_ok=false; done
check "8 parallel creates all succeed" $par_ok
run "$P" --json provider list
check "8 parallel creates: all 8 present" json 'assert sorted(p["name"] for p in d) == ["par%d" % i for i in range(1, 9)]' <<<"$out"
check "8 parallel creates: 8 distinct key ids" json 'assert len({p["key_id"] for p in d}) == 8' <<<"$out"
check "8 parallel creates: no temp files" [ -z "$(find "$P" -name '*.tmp-*')" ]

# ---- backup → set-default, delete -----------------------------------------------------------
B=$(cli_newroot "$TOP")
"$NKPCTL" --root "$B" provider create a >/dev/null
"$NKPCTL" --root "$B" provider create b >/dev/null
printf 'correct horse battery staple\n' >"$TOP/pw"
run "$B" provider backup a --out "$TOP/a.p12" --password-file "$TOP/pw"
if [ "$rc" -eq 0 ]; then
        pass "backup a"
        run "$B" --json provider show a
        check "backed up: active, not default" json 'assert d["backed_up"] and d["active"] and not d["default"]' <<<"$out"
        refused "backup to an existing file" 1 "already exists" "$B" provider backup a --out "$TOP/a.p12" --password-file "$TOP/pw"
        run "$B" provider set-default a
        check "set-default a" [ "$rc" -eq 0 ]
        run "$B" --json provider list
        check "exactly one default: a" json 'assert [p["name"] for p in d if p["default"]] == ["a"]' <<<"$out"
        run "$B" alarms --json
        check "alarms: only b inactive" json 'assert [(a["kind"], a["subject"]) for a in d] == [("provider-inactive", "b")]' <<<"$out"
        refused "set-default of inactive b keeps a" 1 "back it up first" "$B" provider set-default b
        R2=$(cli_newroot "$TOP")
        run "$R2" provider restore "$TOP/a.p12" --password-file "$TOP/pw"
        check "restore into a second root" [ "$rc" -eq 0 ]
        run "$R2" provider restore "$TOP/a.p12" --password-file "$TOP/pw"
        check "restore again: already present" grep -q "already present, nothing changed" <<<"$out"
        # The EK CA (ca-cert) is the same CA on both roots: same subject and key.
        run "$B" provider ca-cert a
        ca1=$out
        run "$R2" provider ca-cert a
        # shellcheck disable=SC2034 # ca2 is read by the check's condition below
        ca2=$out
        spki() { openssl x509 -noout -pubkey -subject <<<"$1" 2>/dev/null; }
        check "ca-cert is a PEM CA certificate" grep -q "CA:TRUE" < <(openssl x509 -noout -text <<<"$ca1")
        check "ca-cert: same subject and public key after restore" \
                '[ -n "$(spki "$ca1")" ] && [ "$(spki "$ca1")" = "$(spki "$ca2")" ]'
        refused "ca-cert of an unknown provider" 1 "no provider named 'zz'" "$B" provider ca-cert zz
else
        not_ok "backup a: $err"
fi
run "$B" provider usage a --json
check "usage --json" json 'assert d["name"] == "a" and d["vms"] == []' <<<"$out"
run "$B" provider delete b
check "delete b" [ "$rc" -eq 0 ]
run "$B" --json provider list
check "b is gone" json 'assert "b" not in [p["name"] for p in d]' <<<"$out"
refused "delete b again" 1 "no provider named 'b'" "$B" provider delete b
refused "delete while libvirt is unreachable" 1 "was not deleted" "$B" --connect "qemu+unix:///system?socket=$TOP/none.sock" provider delete a
run "$B" --connect "qemu+unix:///system?socket=$TOP/none.sock" provider delete a --force
check "delete --force while libvirt is unreachable" [ "$rc" -eq 0 ]
run "$B" alarms --json
check "alarms: deleted providers still cached" json '
assert {(a["kind"], a["subject"]) for a in d} == {("provider-deleted","a"), ("provider-deleted","b")}, d' <<<"$out"
run "$B" host flush-cache
run "$B" alarms
check "alarms (human) after flush-cache: none" [ "$out" = "No alarms." ]
refused "alarms: stray argument" 2 "unknown alarms command 'foo'" "$B" alarms foo
refused "alarms list: stray argument" 2 "takes no arguments" "$B" alarms list foo

# ---- delete refused while a defined VM depends on the provider ----------------------------------
V=$(cli_newroot "$TOP")
"$NKPCTL" --root "$V" provider create used >/dev/null
"$NKPCTL" --root "$V" provider create unused >/dev/null
run "$V" --json provider show used
kid=$(json 'print(d["key_id"])' <<<"$out")
fp=$(json 'print(d["fingerprint"])' <<<"$out")
# libvirt's test driver, loaded from a file: one VM whose keysafe names "used".
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
        <nkp:provider name="used" key-id="$kid" fingerprint="$fp"/>
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
run "$V" --connect "$VC" --json provider usage used
check "usage lists the VM that depends on it" json 'assert d["vms"] == ["web01"]' <<<"$out"
run "$V" --connect "$VC" provider usage unused
check "usage of an unused provider" grep -q "No defined VM uses provider 'unused'" <<<"$out"
refused "delete of a provider a defined VM uses" 1 "protects the defined VM 'web01'" "$V" --connect "$VC" provider delete used
run "$V" --connect "$VC" provider delete unused
check "delete of the unused one" [ "$rc" -eq 0 ]
run "$V" --connect "$VC" provider delete used --force
check "delete --force of the used one" [ "$rc" -eq 0 ]
check "delete --force warns and names the VM" grep -q "warning: provider 'used' still protects the defined VM 'web01'" <<<"$err"

# ---- with a TPM (a throwaway swtpm) -------------------------------------------------------------
if command -v swtpm >/dev/null; then
        T=$(cli_newroot "$TOP")
        started=false
        for try in 1 2 3 4 5; do
                port=$((20000 + RANDOM % 40000))
                swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
                        --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" --tpmstate "dir=$TOP" \
                        --flags not-need-init,startup-clear 2>/dev/null &
                swtpm_pid=$!
                for i in $(seq 100); do
                        kill -0 "$swtpm_pid" 2>/dev/null || break
                        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then started=true; break; fi
                        sleep 0.05
                done
                $started && break
                kill "$swtpm_pid" 2>/dev/null; wait "$swtpm_pid" 2>/dev/null; swtpm_pid=
        done
        if $started; then
                printf '[tpm]\ntcti=swtpm:host=127.0.0.1,port=%s\n' "$port" >"$T/etc/nkp/nkp.conf"
                run "$T" --json provider create sealed --require-tpm
                check "create --require-tpm with a TPM" json 'assert d["sealed"] == "tpm" and d["require_tpm"] is True' <<<"$out"
                check "  ... the store holds no kdk" eval '! grep -q "^kdk=" "$T/var/lib/nkp/providers.ini"'
                run "$T" host flush-cache
                run "$T" provider backup sealed --out "$TOP/sealed.p12" --password-file "$TOP/pw"
                check "backup of a sealed provider (unsealed by the TPM)" [ "$rc" -eq 0 ]
                R4=$(cli_newroot "$TOP")
                refused "restore of a require-tpm provider on a host without a TPM" 1 "requires a TPM" "$R4" provider restore "$TOP/sealed.p12" --password-file "$TOP/pw"
                kill "$swtpm_pid" 2>/dev/null; wait "$swtpm_pid" 2>/dev/null; swtpm_pid=
                refused "create while the configured TPM is gone" 1 "plain" "$T" provider create plain
        else
                not_ok "swtpm did not start"
        fi
else
        echo "# SKIP TPM cases: swtpm is not installed"
fi

assert_done
