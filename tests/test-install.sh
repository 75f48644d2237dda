#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# `meson install` into a throwaway DESTDIR: every program lands where libvirt,
# swtpm_setup, systemd and the admin look for it, the installed programs run,
# the installed config loads, and a reinstall keeps an edited config.
set -u
source "$(dirname "$0")/lib/cli.sh"
BUILD=${NKP_BUILD_DIR:?NKP_BUILD_DIR not set}
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT

install_into() {
	meson install -C "$BUILD" --no-rebuild --quiet --destdir "$dest" >"$dest.log" 2>&1
	local rc=$?
	[ "$rc" = 0 ] || sed 's/^/# /' "$dest.log"
	rm -f "$dest.log"
	return "$rc"
}

prefix=$(meson introspect --buildoptions "$BUILD" |
	python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"]=="prefix"))')
echo "# prefix: $prefix"
check "meson install succeeds" "install_into"

hook="$dest/etc/libvirt/hooks/qemu.d/50-nkp"
if [ "$prefix" = /usr ]; then
	check "the qemu hook is $hook, executable" "[ -x '$hook' ]"
else
	echo "# prefix $prefix: the hook goes under $prefix/etc, which libvirt does not read"
fi
check "nkpctl in sbin, executable" "[ -x '$dest$prefix/sbin/nkpctl' ]"
check "nkpd in sbin, executable" "[ -x '$dest$prefix/sbin/nkpd' ]"
check "nkp-swtpm-certs in libexec/nkp (create_certs_tool)" \
	"[ -x '$dest$prefix/libexec/nkp/nkp-swtpm-certs' ]"
check "the nkpd systemd unit" "grep -q '^ExecStart=/usr/sbin/nkpd' '$dest$prefix/lib/systemd/system/nkpd.service'"
check "nkp.h and libnkp.pc for library users" \
	"[ -f '$dest$prefix/include/nkp/nkp.h' ] && find '$dest$prefix' -name libnkp.pc | grep -q ."
conf="$dest/etc/nkp/nkp.conf"
check "the config at /etc/nkp/nkp.conf, 0644" "[ \"\$(stat -c %a '$conf')\" = 644 ]"
check "the config has every section, all defaults commented out" \
	"grep -q '^\[tpm\]' '$conf' && grep -q '^\[migration\]' '$conf' && grep -q '^\[vtpm\]' '$conf' && ! grep -Eq '^[a-z_]+ *=' '$conf'"

# The installed nkpctl runs and reads the installed config (--root = DESTDIR).
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" provider list 2>&1)
rc=$?
check "installed nkpctl reads the installed config" "[ $rc = 0 ]"
[ "$rc" = 0 ] || echo "# $out"
printf '\n[tpm]\ntcti = none\n' >>"$conf"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" --json host status 2>&1)
check "an edit to the config takes effect (tcti none)" "grep -q '\"tcti\" *: *\"none\"' <<<\"\$out\""
printf '[vtpm]\npolicy = maybe\n' >>"$conf"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" provider list 2>&1)
rc=$?
check "a bad config value: one clear line, non-zero exit" \
	"[ $rc != 0 ] && [ \$(wc -l <<<\"\$out\") = 1 ] && grep -q 'policy=maybe' <<<\"\$out\""

# A reinstall (an upgrade) keeps the admin's config.
before=$(sha256sum <"$conf")
check "a reinstall succeeds" "install_into"
check "a reinstall keeps the edited config" "[ \"\$(sha256sum <'$conf')\" = '$before' ]"

assert_done
