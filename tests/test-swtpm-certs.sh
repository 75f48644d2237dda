#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkp-swtpm-certs (swtpm_setup's create_certs_tool) against the real
# swtpm_setup of this machine, in a temp root (NKP_ROOT):
#  - with the hook's ticket: the RSA-2048 and ECC P-384 EK certificates that
#    swtpm_setup stores verify against `nkpctl provider ca-cert`, also the
#    CA printed by a second root that restored the provider;
#  - without a ticket: the tool execs swtpm's local CA with the same args;
#  - an expired ticket, a provider that is not here: refused, one line;
#  - as a user other than root: the request goes to nkpd's socket (SO_PEERCRED),
#    a user that is not the swtpm user is refused.
set -u
source "$(dirname "$0")/lib/cli.sh"
NKPCTL=${NKPCTL:?NKPCTL not set}
BUILD=${NKP_BUILD_DIR:?}
TOOL=$BUILD/swtpm-hooks/nkp-swtpm-certs
NKPD=$BUILD/plugin/nkpd/nkpd
command -v swtpm_setup >/dev/null || skip_all "no swtpm_setup"
[ -x "$TOOL" ] || skip_all "tool not built"

top=$(mktemp -d)
nkpd_pid=
cleanup() {
        [ -z "$nkpd_pid" ] || { kill "$nkpd_pid" 2>/dev/null; wait "$nkpd_pid" 2>/dev/null; }
        for r in "$top/r1" "$top/r2"; do
                [ -d "$r" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1
        done
        rm -rf "$top"
}
trap cleanup EXIT
chmod 0755 "$top"

newroot() {
        mkdir -p "$1/etc/nkp"
        printf '[tpm]\ntcti=none\n' > "$1/etc/nkp/nkp.conf"
        chmod 0600 "$1/etc/nkp/nkp.conf"
}
ticket() { # ROOT UUID KEY_ID EXPIRES NAME: what the prepare hook writes
        mkdir -p -m 0700 "$1/run/nkp/ekca"
        printf '[ticket]\nkey_id=%s\nname=%s\nexpires=%s\n' "$3" "${5:-vm1}" "$4" > "$1/run/nkp/ekca/$2"
        chmod 0600 "$1/run/nkp/ekca/$2"
}
conf() { # FILE TOOL
        printf 'create_certs_tool = %s\ncreate_certs_tool_config = /etc/swtpm-localca.conf\ncreate_certs_tool_options = /etc/swtpm-localca.options\nactive_pcr_banks = sha256\n' "$2" > "$1"
}

R1=$top/r1 R2=$top/r2
newroot "$R1"
newroot "$R2"
"$NKPCTL" --root "$R1" provider create p1 >/dev/null
kid=$("$NKPCTL" --root "$R1" --json provider show p1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["key_id"])')
uuid=$(cat /proc/sys/kernel/random/uuid)
ticket "$R1" "$uuid" "$kid" $(($(date +%s) + 300))
conf "$top/setup.conf" "$TOOL"

# ---- root, ticket: swtpm_setup stores our certificates -------------------------
mkdir -p "$top/st1" "$top/out1"
NKP_ROOT=$R1 swtpm_setup --tpm2 --tpmstate "$top/st1" --vmid "vm1:$uuid" --logfile "$top/log1" \
        --createek --create-ek-cert --create-platform-cert --lock-nvram --config "$top/setup.conf" \
        --write-ek-cert-files "$top/out1" >/dev/null 2>&1
check "swtpm_setup with nkp-swtpm-certs succeeds" '[ $? -eq 0 ]'
check "the tool issued 3 certificates (log)" '[ "$(grep -c "with the EK CA of provider .p1." "$top/log1")" = 3 ]'
check "the three kinds consumed the ticket" '[ ! -e "$R1/run/nkp/ekca/$uuid" ]'
"$NKPCTL" --root "$R1" provider ca-cert p1 > "$top/ca1.pem"
for f in ek-rsa2048.crt ek-secp384r1.crt; do
        check "$f verifies against provider ca-cert" \
                'openssl verify -CAfile "$top/ca1.pem" "$top/out1/$f" >/dev/null 2>&1'
done
txt=$(openssl x509 -in "$top/out1/ek-rsa2048.crt" -noout -text 2>/dev/null)
check "RSA EK: TCG SAN, EKU, 2048 bits" 'grep -q "2.23.133.2.2=swtpm" <<<"$txt" && grep -q "2.23.133.8.1" <<<"$txt" && grep -q "(2048 bit)" <<<"$txt"'
txt=$(openssl x509 -in "$top/out1/ek-secp384r1.crt" -noout -text 2>/dev/null)
check "ECC EK: P-384, key agreement" 'grep -q "NIST CURVE: P-384" <<<"$txt" && grep -q "Key Agreement" <<<"$txt"'

# ---- the CA of a host that restored the provider ---------------------------------
printf 'pw for the test\n' > "$top/pw"
if "$NKPCTL" --root "$R1" provider backup p1 --out "$top/p1.p12" --password-file "$top/pw" >/dev/null 2>&1 &&
   "$NKPCTL" --root "$R2" provider restore "$top/p1.p12" --password-file "$top/pw" >/dev/null 2>&1; then
        "$NKPCTL" --root "$R2" provider ca-cert p1 > "$top/ca2.pem"
        check "the EK cert verifies against the CA printed by the restored copy" \
                'openssl verify -CAfile "$top/ca2.pem" "$top/out1/ek-rsa2048.crt" >/dev/null 2>&1'
else
        echo "# SKIP restore part: provider backup/restore failed"
fi

# ---- no ticket: swtpm's local CA, same arguments -----------------------------------
printf '#!/bin/sh\nprintf "%%s\\n" "$0" "$@" > "%s/fallback.args"\n' "$top" > "$top/fake-localca"
chmod 0755 "$top/fake-localca"
other=$(cat /proc/sys/kernel/random/uuid)
NKP_ROOT=$R1 NKP_SWTPM_LOCALCA=$top/fake-localca "$TOOL" --type ek --ek abcd --dir "$top" \
        --vmid "vm2:$other" --tpm2 --tpm-model swtpm >/dev/null 2>&1
check "no ticket: exec swtpm's local CA" '[ $? -eq 0 ] && [ -s "$top/fallback.args" ]'
check "fallback gets the same arguments" 'grep -qx -- "vm2:$other" "$top/fallback.args" && grep -qx -- "--tpm-model" "$top/fallback.args"'

# ---- refused: expired ticket, provider not here -------------------------------------
ekhex=$(openssl genrsa 2048 2>/dev/null | openssl rsa -noout -modulus 2>/dev/null | sed 's/^Modulus=//')
args=(--type ek --ek "$ekhex" --dir "$top" --tpm2 --tpm-spec-family 2.0 --tpm-spec-level 0
      --tpm-spec-revision 164 --tpm-manufacturer id:00001014 --tpm-model swtpm --tpm-version id:20191023)
exp=$(cat /proc/sys/kernel/random/uuid)
ticket "$R1" "$exp" "$kid" $(($(date +%s) - 5)) vm3
err=$(NKP_ROOT=$R1 NKP_SWTPM_LOCALCA=$top/fake-localca "$TOOL" "${args[@]}" --vmid "vm3:$exp" 2>&1 >/dev/null)
check "expired ticket: refused with one line" '[ $? -ne 0 ] && grep -q "expired" <<<"$err" && [ "$(grep -c . <<<"$err")" = 1 ]'
gone=$(cat /proc/sys/kernel/random/uuid)
ticket "$R1" "$gone" "00000000-0000-4000-8000-00000000dead" $(($(date +%s) + 300)) vm4
err=$(NKP_ROOT=$R1 "$TOOL" "${args[@]}" --vmid "vm4:$gone" 2>&1 >/dev/null)
check "provider not here: refused, says restore" '[ $? -ne 0 ] && grep -q "provider restore" <<<"$err"'

# ---- not root: through nkpd's socket ------------------------------------------------
if [ -x "$NKPD" ] && command -v setpriv >/dev/null && [ "$(id -u)" = 0 ]; then
        chmod 0755 "$R1" "$R1/run" 2>/dev/null
        chmod 0700 "$R1/run/nkp"  # as a hook run before nkpd leaves it
        ticket "$R1" "$uuid" "$kid" $(($(date +%s) + 300))
        printf '[tpm]\ntcti=none\n[vtpm]\nswtpm_user=nobody\n' > "$R1/etc/nkp/nkp.conf"
        NKP_ROOT=$R1 "$NKPD" --no-libvirt > "$top/nkpd.log" 2>&1 &
        nkpd_pid=$!
        for _ in $(seq 50); do [ -S "$R1/run/nkp/ekca.sock" ] && break; sleep 0.1; done
        check "nkpd serves the signer socket" '[ -S "$R1/run/nkp/ekca.sock" ]'
        check "nkpd made /run/nkp 0750 root:nogroup, the socket 0660" \
                '[ "$(stat -c %a:%U:%G "$R1/run/nkp")" = 750:root:nogroup ] && [ "$(stat -c %a "$R1/run/nkp/ekca.sock")" = 660 ]'
        mkdir -p "$top/dn" && chown nobody "$top/dn"
        out=$(NKP_ROOT=$R1 setpriv --reuid=nobody --regid=nogroup --clear-groups "$TOOL" "${args[@]}" \
                --vmid "vm1:$uuid" --dir "$top/dn" 2>&1)
        check "as 'nobody' (the swtpm user): certificate through nkpd" \
                '[ $? -eq 0 ] && openssl verify -CAfile "$top/ca1.pem" <(openssl x509 -inform der -in "$top/dn/ek.cert") >/dev/null 2>&1'
        check "nobody cannot read the ticket or the store" \
                '! setpriv --reuid=nobody --regid=nogroup --clear-groups cat "$R1/run/nkp/ekca/$uuid" "$R1/var/lib/nkp/providers.ini" >/dev/null 2>&1'
        out=$(NKP_ROOT=$R1 setpriv --reuid=nobody --regid=nogroup --clear-groups "$TOOL" "${args[@]}" \
                --vmid "vm1:$uuid" --dir "$top/dn" 2>&1)
        check "the same kind again: refused, one line" '[ $? -ne 0 ] && grep -q "already issued" <<<"$out" && [ "$(grep -c . <<<"$out")" = 1 ]'
        out=$(NKP_ROOT=$R1 setpriv --reuid=daemon --regid=nogroup --clear-groups "$TOOL" "${args[@]}" \
                --vmid "vm1:$uuid" --dir "$top/dn" 2>&1)
        check "another user of the swtpm group is refused by nkpd (SO_PEERCRED)" '[ $? -ne 0 ] && grep -q "swtpm user" <<<"$out"'
        out=$(NKP_ROOT=$R1 setpriv --reuid=daemon --regid=daemon --clear-groups "$TOOL" "${args[@]}" \
                --vmid "vm1:$uuid" --dir "$top/dn" 2>&1)
        check "a user outside the swtpm group cannot reach the socket" '[ $? -ne 0 ] && grep -q "Permission denied" <<<"$out"'
        kill "$nkpd_pid"; wait "$nkpd_pid" 2>/dev/null; nkpd_pid=
        check "nkpd removed its socket on exit" '[ ! -e "$R1/run/nkp/ekca.sock" ]'
else
        echo "# SKIP socket part: nkpd not built, no setpriv, or not root"
fi

assert_done
