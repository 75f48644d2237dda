#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The qemu hook program on bad, foreign and locked input (no libvirtd
# needed: none of these cases may reach libvirt).  NKP_ROOT = a temp root.
set -u
source "$(dirname "$0")/lib/cli.sh"
HOOK=${NKP_HOOK:?NKP_HOOK not set}
NKPCTL=${NKPCTL:?NKPCTL not set}
BUILD=${NKP_BUILD_DIR:?}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
export NKP_ROOT=$root
# Plain vTPMs are not this test's subject (test-enrol covers [vtpm] policy).
mkdir -p "$root/etc/nkp" && printf '[vtpm]\npolicy=off\n' > "$root/etc/nkp/nkp.conf"
# Any libvirt call would fail fast here instead of touching a real daemon.
export NKP_LIBVIRT_URI="qemu+unix:///system?socket=$root/no-such-socket"
export NKP_HOOK_TIMEOUT=10

# run NAME OP SUBOP < input: sets rc, out, err
run() {
	local o e
	o=$(mktemp) e=$(mktemp)
	"$HOOK" "$1" "$2" "$3" - >"$o" 2>"$e"
	rc=$?
	out=$(cat "$o") err=$(cat "$e")
	rm -f "$o" "$e"
}

# Every file under the root but the alarm state (and the store lock).
snapshot() {
	(cd "$root" && find . -type f ! -name 'alarms*' ! -name '.lock' -printf '%p %m ' \
		-exec sha256sum {} \; | sort)
}

foreign="<domain type='qemu'><name>f</name><uuid>6f1c3a52-9d0e-4b8a-a1f2-0c3d4e5f6a7b</uuid>
<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>"

for op in "prepare begin" "start begin" "started begin" "migrate begin" "restore begin" \
	"reconnect begin" "stopped end" "release end" "attach begin" "bogus op"; do
	set -- $op
	run vm "$1" "$2" </dev/null
	check "empty stdin, $op: exit 0, silent" '[ $rc = 0 ] && [ -z "$out" ] && [ -z "$err" ]'
	head -c 4096 /dev/urandom >"$root/in"
	run vm "$1" "$2" <"$root/in"
	check "random bytes, $op: exit 0, silent" '[ $rc = 0 ] && [ -z "$out" ] && [ -z "$err" ]'
	run f "$1" "$2" <<<"$foreign"
	check "foreign domain, $op: exit 0, silent" '[ $rc = 0 ] && [ -z "$out" ] && [ -z "$err" ]'
done

# ---- hostile input x [vtpm] policy: would libvirt start the VM? (issue 13) ----
# Each row: NAME FILE then, per policy (require enrol off), the expected
# outcome of `prepare begin`: "go" (exit 0, silent) or "refuse:GLOB" (exit 1,
# exactly one line "nkp: …" matching GLOB).  Input nkp cannot read fails
# closed unless the policy is off; input libvirt 9.0 accepts and keeps (a
# DOCTYPE inside a comment or a CDATA block, a 5000-character name) is read,
# so its plain vTPM meets the policy like any other.
rows=$root/rows
mkdir -p "$rows"
uuid=6f1c3a52-9d0e-4b8a-a1f2-0c3d4e5f6a7b
tpm_plain="<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
tpm_enc="<tpm model='tpm-crb'><backend type='emulator' version='2.0'><encryption secret='$uuid'/></backend></tpm>"
dom() { printf "<domain type='kvm'><name>%s</name><uuid>$uuid</uuid>%s<devices>%s</devices></domain>\n" "$@"; }
dom vm "<!-- see <!DOCTYPE html> and <!ENTITY x 'y'> -->" "$tpm_plain" >"$rows/comment-doctype"
dom vm "<metadata><t:x xmlns:t='urn:tool'><![CDATA[<!DOCTYPE d [<!ENTITY a 'b'>]>]]></t:x></metadata>" "$tpm_plain" >"$rows/cdata-doctype"
dom vm "<metadata><t:x xmlns:t='urn:tool'><![CDATA[<!DOCTYPE x>]]></t:x></metadata>" "$tpm_enc" >"$rows/cdata-encrypted"
dom "$(head -c 5000 /dev/zero | tr '\0' n)" "" "$tpm_plain" >"$rows/long-name"
dom vm "" "<tpm><backend type='emulator'><encryption secret='$uuid'/></backend></tpm>$tpm_plain" >"$rows/two-tpms-one-plain"
{ echo "<!DOCTYPE domain>"; dom vm "" "$tpm_plain"; } >"$rows/real-doctype"
{ echo "<!DOCTYPE domain [<!ENTITY n 'vm'>]>"; dom '&n;' "" "$tpm_plain"; } >"$rows/real-entity"
dom vm "" "$tpm_plain" | head -c 120 >"$rows/truncated"
head -c 4096 /dev/urandom >"$rows/binary-garbage"
printf "<?xml version='1.0' encoding='SHIFT_JIS'?><domain>\x81\x00\x00\x00" >"$rows/bad-encoding"
: >"$rows/empty"
{ dom vm "" "$tpm_plain"; head -c $((9 * 1024 * 1024)) /dev/zero | tr '\0' ' '; } >"$rows/huge"
{ dom vm "" "$tpm_plain"; echo "<junk/>"; } >"$rows/plain-vtpm-then-junk"
dom vm "" "$tpm_plain" | sed "s|<domain |<domain xmlns='urn:other' |" >"$rows/other-namespace"
dom vm "" "$tpm_enc" >"$rows/encrypted-vtpm"
dom vm "" "" >"$rows/no-vtpm"

policy_refuse='refuse:*"VM '"'vm'"' cannot start: its vTPM is not encrypted and this host'"'"'s policy requires it"*'
enrol_refuse='refuse:*"VM '"'vm'"' cannot start: its new vTPM would write its state in clear"*'
unread() { echo "refuse:*\"VM 'vm' cannot start: nkp cannot read its domain XML (\"*\"policy=$1 in\"*"; }
long_require='refuse:*"cannot start: its vTPM is not encrypted and this host'"'"'s policy requires it"*'
long_enrol='refuse:*"cannot start: its new vTPM would write its state in clear"*'
table="comment-doctype       |$policy_refuse|$enrol_refuse|go
cdata-doctype                |$policy_refuse|$enrol_refuse|go
cdata-encrypted              |go|go|go
long-name                    |$long_require|$long_enrol|go
two-tpms-one-plain           |$policy_refuse|$enrol_refuse|go
real-doctype                 |$(unread require)|$(unread enrol)|go
real-entity                  |$(unread require)|$(unread enrol)|go
truncated                    |$(unread require)|$(unread enrol)|go
binary-garbage               |$(unread require)|$(unread enrol)|go
bad-encoding                 |$(unread require)|$(unread enrol)|go
empty                        |$(unread require)|$(unread enrol)|go
huge                         |$(unread require)|$(unread enrol)|go
plain-vtpm-then-junk         |$(unread require)|$(unread enrol)|go
other-namespace              |$(unread require)|$(unread enrol)|go
encrypted-vtpm               |go|go|go
no-vtpm                      |go|go|go"

set_policy() {
	printf '[tpm]\ntcti=none\n[vtpm]\npolicy=%s\nstate_dir=%s\n' "$1" "$root/swtpm" >"$root/etc/nkp/nkp.conf"
}
mkdir -p "$root/swtpm"
n_rows=0
while IFS='|' read -r name req enr off; do
	name=${name// /}
	col=0
	for policy in require enrol off; do
		col=$((col + 1))
		case $col in 1) want=$req ;; 2) want=$enr ;; 3) want=$off ;; esac
		set_policy "$policy"
		run vm prepare begin <"$rows/$name"
		n_rows=$((n_rows + 1))
		if [ "$want" = go ]; then
			check "$name, policy=$policy: libvirt goes (exit 0, silent)" \
				'[ $rc = 0 ] && [ -z "$out" ] && [ -z "$err" ]'
		else
			glob=${want#refuse:}
			check "$name, policy=$policy: libvirt refuses (exit 1, one line)" \
				'[ $rc = 1 ] && [ -z "$out" ] && [ "$(printf "%s\n" "$err" | wc -l)" = 1 ] && [[ $err == "nkp: "* ]]'
			eval "[[ \$err == $glob ]]"
			check "$name, policy=$policy: the line says why ($glob)" '[ $? = 0 ]' || echo "# got: ${err:0:300}"
		fi
	done
done <<<"$table"
check "the bad-input table has at least 36 cases" '[ $n_rows -ge 36 ]'

# Migrate (refuses like a start) and the steps that must never fail.
set_policy require
run vm migrate begin <"$rows/truncated"
check "truncated, policy=require, migrate: refused, one line naming this host" \
	'[ $rc = 1 ] && [ -z "$out" ] && [[ $err == "nkp: VM '"'vm'"' cannot be migrated to host '"'$(hostname)'"': nkp cannot read"* ]]'
for op in "reconnect begin" "release end"; do
	set -- $op
	for name in truncated real-doctype empty; do
		run vm "$1" "$2" <"$rows/$name"
		check "$name, policy=require, $op: exit 0, silent (must never fail)" \
			'[ $rc = 0 ] && [ -z "$err" ]'
	done
done
# A config that cannot be loaded: the policy is unknown, so refused.
printf '[vtpm]\npolicy=maybe\n' >"$root/etc/nkp/nkp.conf"
run vm prepare begin <"$rows/truncated"
check "truncated, unreadable config: refused, one line naming both" \
	'[ $rc = 1 ] && [[ $err == "nkp: VM '"'vm'"' cannot start: nkp cannot read its domain XML ("*"nor its own config"*"policy=maybe"* ]]'
for name in no-vtpm encrypted-vtpm; do
	run vm prepare begin <"$rows/$name"
	check "$name, unreadable config: refused (policy unknown), one line" \
		'[ $rc = 1 ] && [ "$(printf "%s\n" "$err" | wc -l)" = 1 ] && [[ $err == "nkp: VM '"'vm'"' cannot start: nkp cannot load its config"*"policy=maybe"* ]]'
done
run vm release end <"$rows/encrypted-vtpm"
check "unreadable config, release: exit 0" '[ $rc = 0 ]'
printf '[vtpm]\npolicy=off\n' >"$root/etc/nkp/nkp.conf"
rm -rf "$rows"
"$HOOK" x prepare </dev/null >/dev/null 2>&1
check "too few arguments: exit 0" '[ $? = 0 ]'

# Broken nkp data: one clear line, exit 1, for the steps that can refuse.
broken="<domain><name>b</name><uuid>6f1c3a52-9d0e-4b8a-a1f2-0c3d4e5f6a7b</uuid>
<metadata><k:keysafe xmlns:k='https://nkp.invalid/xmlns/keysafe/1'"
before=$(snapshot)
for op in "prepare begin" "migrate begin" "restore begin"; do
	set -- $op
	run b "$1" "$2" <<<"$broken"
	check "broken nkp XML, $op: exit 1" '[ $rc = 1 ]'
	check "broken nkp XML, $op: one line naming the VM" \
		'[ "$(printf "%s\n" "$err" | wc -l)" = 1 ] && [[ $err == "nkp: VM '"'b'"'"* ]]'
	check "broken nkp XML, $op: nothing on stdout" '[ -z "$out" ]'
done
for op in "reconnect begin" "release end"; do
	set -- $op
	run b "$1" "$2" <<<"$broken"
	check "broken nkp XML, $op: exit 0 (must never fail)" '[ $rc = 0 ]'
done
check "broken nkp XML: nothing written under the root" '[ "$(snapshot)" = "$before" ]'

# A locked VM: its provider is on no host.
if locked=$("$BUILD/tests/test-domain" --emit-nkp-domain) && [ -n "$locked" ]; then
	"$NKPCTL" --root "$root" provider list >/dev/null 2>&1 || true
	before=$(snapshot)
	run guest1 prepare begin <<<"$locked"
	check "locked VM: exit 1" '[ $rc = 1 ]'
	check "locked VM: one line" '[ "$(printf "%s\n" "$err" | wc -l)" = 1 ]'
	check "locked VM: names the VM, the provider and the fix" \
		'[[ $err == *"VM '"'guest1'"' is locked"*"provider '"'prov1'"'"*"nkpctl provider restore"*"nkpctl host unlock"* ]]'
	check "locked VM: nothing on stdout" '[ -z "$out" ]'
	echo "# $err"
	if "$NKPCTL" --root "$root" alarms >/dev/null 2>&1; then
		alarms=$("$NKPCTL" --root "$root" alarms 2>&1)
		check "locked VM: a vm-locked alarm is listed" '[[ $alarms == *vm-locked*guest1* ]]'
		check "locked VM: nothing but the alarm changed" '[ "$(snapshot)" = "$before" ]'
	else
		skip "nkpctl alarms not implemented yet"
	fi
	run guest1 migrate begin <<<"$locked"
	check "locked VM, migrate: refused early, exit 1, stdout empty" '[ $rc = 1 ] && [ -z "$out" ]'
	run guest1 reconnect begin <<<"$locked"
	check "locked VM, reconnect: exit 0 (the running VM is never killed)" '[ $rc = 0 ]'
	run guest1 release end <<<"$locked"
	check "locked VM, release: exit 0" '[ $rc = 0 ]'
	start=$(date +%s%N)
	run guest1 prepare begin <<<"$locked"
	ms=$((($(date +%s%N) - start) / 1000000))
	echo "# hook wall time, locked prepare: ${ms} ms"
	check "locked VM: refusal is fast (< 2 s)" '[ $ms -lt 2000 ]'
	# A copy of guest1's definition under another UUID (virt-clone
	# --preserve-data / --skip-copy, by hand): refused naming the fix.
	own=$(sed -n 's|.*<uuid>\(.*\)</uuid>.*|\1|p' <<<"$locked"); own_lc=${own,,}
	copy=$(sed -e "s|<name>guest1</name>|<name>copy1</name>|" \
		-e "s|<uuid>$own</uuid>|<uuid>0b3e9c1d-2f4a-4e5b-8c6d-7e8f9a0b1c2d</uuid>|" <<<"$locked")
	for op in "prepare begin" "migrate begin" "restore begin"; do
		set -- $op
		run copy1 "$1" "$2" <<<"$copy"
		check "copied keysafe, $op: refused, one line naming its UUID and nkpctl vm clone" \
			'[ $rc = 1 ] && [ "$(printf "%s\n" "$err" | wc -l)" = 1 ] &&
			 [[ $err == *"VM '"'copy1'"' cannot "*"made for the VM UUID '"'$own_lc'"'"*"nkpctl vm clone SOURCE '"'copy1'"'"* ]]'
	done
	echo "# $err"
else
	skip "keysafe.c not implemented yet: locked-VM cases"
fi

assert_done
