#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# libvirt and tpm2-tss are loaded on first use (plugin/lib/dl.c).  With
# libvirt.so.0 and libtss2-esys.so.0 hidden (a private mount namespace binds
# /dev/null over them): the hook still answers a foreign domain and an
# ignored step (it never loads them there), and a command that needs one
# fails with one line naming the library and the package.  Needs root and
# unshare (exit 77 otherwise).
set -u
HOOK=${NKP_HOOK:?NKP_HOOK not set}
NKPCTL=${NKPCTL:?NKPCTL not set}
if [ -z "${NKP_IN_NS:-}" ]; then
	if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null; then
		echo "# needs root and unshare: skipped"; exit 77
	fi
	exec unshare -m --propagation private env NKP_IN_NS=1 "$0" "$@"
fi

n=0
fails=0
ok() { n=$((n + 1)); echo "ok $n - $1"; }
not_ok() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $1"; }
check() { if eval "$2"; then ok "$1"; else not_ok "$1"; fi; }

hide() { # SONAME: bind /dev/null over the file the loader would open
	local f
	f=$(ldconfig -p | awk -v s="$1" '$1 == s { print $NF; exit }')
	[ -n "$f" ] && mount --bind /dev/null "$(readlink -f "$f")"
}
check "libvirt.so.0 hidden in this mount namespace" "hide libvirt.so.0"
check "libtss2-esys.so.0 hidden in this mount namespace" "hide libtss2-esys.so.0"

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/nkp"
# A TPM that nobody plays: tpm2-tss is loaded before anything talks to it.
printf '[tpm]\ntcti=swtpm:host=127.0.0.1,port=1\n[vtpm]\npolicy=off\n' > "$root/etc/nkp/nkp.conf"
export NKP_ROOT=$root NKP_HOOK_TIMEOUT=10

foreign="<domain type='qemu'><name>f</name><uuid>6f1c3a52-9d0e-4b8a-a1f2-0c3d4e5f6a7b</uuid>
<memory>1024</memory><os><type>hvm</type></os></domain>"
err=$("$HOOK" f prepare begin - <<<"$foreign" 2>&1 >/dev/null); rc=$?
check "hook, foreign domain, prepare: exit 0, silent, without libvirt" "[ $rc = 0 ] && [ -z \"\$err\" ]"
err=$("$HOOK" f started begin - <<<"$foreign" 2>&1 >/dev/null); rc=$?
check "hook, ignored step: exit 0, silent, without libvirt" "[ $rc = 0 ] && [ -z \"\$err\" ]"

err=$("$NKPCTL" --root "$root" --connect test:///default vm list 2>&1 >/dev/null); rc=$?
echo "# vm list: $err"
check "a command needing libvirt: exit 1, one line naming libvirt.so.0 and libvirt0" \
	"[ $rc = 1 ] && [ \$(wc -l <<<\"\$err\") = 1 ] && grep -q 'libvirt\.so\.0' <<<\"\$err\" && grep -q 'apt install libvirt0' <<<\"\$err\""
err=$("$NKPCTL" --root "$root" provider create p1 2>&1 >/dev/null); rc=$?
echo "# provider create: $err"
check "a command needing the TPM: exit 1, one line naming libtss2-esys.so.0" \
	"[ $rc = 1 ] && [ \$(wc -l <<<\"\$err\") = 1 ] && grep -q 'libtss2-esys\.so\.0' <<<\"\$err\""
check "and nothing written" "[ ! -e '$root/var/lib/nkp/providers.ini' ]"

echo "1..$n"
[ "$fails" = 0 ]
