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

option() { # NAME: a meson build option's value
	meson introspect --buildoptions "$BUILD" |
		python3 -c 'import json,sys; print(next(o["value"] for o in json.load(sys.stdin) if o["name"]==sys.argv[1]))' "$1"
}
prefix=$(option prefix)
libdir=$(option libdir)
case $libdir in /*) ;; *) libdir=$prefix/$libdir ;; esac
echo "# prefix: $prefix, libdir: $libdir"
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
# The man pages (docs/man, scdoc) and the bash completion (bash-completion's
# completionsdir, else DATADIR/bash-completion/completions).
for page in man8/nkpctl.8 man8/nkpd.8 man8/nkp-hook.8 man8/nkp-swtpm-certs.8 man5/nkp.conf.5; do
	check "man page $page in share/man" "grep -q '^\.TH' '$dest$prefix/share/man/$page'"
done
check "the bash completion of nkpctl in bash-completion/completions" \
	"grep -q 'complete -F _nkpctl nkpctl' '$dest$prefix/share/bash-completion/completions/nkpctl'"
# The unit: where systemd's pkg-config says units go, else PREFIX/lib/systemd/system.
unitdir=$(pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null) || unitdir=""
[ -n "$unitdir" ] || unitdir=$prefix/lib/systemd/system
echo "# systemd unit directory: $unitdir"
check "the nkpd systemd unit in $unitdir" "grep -q '^ExecStart=/usr/sbin/nkpd' '$dest$unitdir/nkpd.service'"
check "no other nkpd.service installed" "[ \"\$(find '$dest' -name nkpd.service | wc -l)\" = 1 ]"
if [ "$(option cockpit)" = True ]; then
	cockpit_page_installed() {
		local f
		for f in manifest.json index.html nkp.js nkp.css; do
			[ -f "$dest$prefix/share/cockpit/nkp/$f" ] || return 1
		done
	}
	check "the Cockpit page in share/cockpit/nkp (manifest, page, script, style)" cockpit_page_installed
fi
check "nkp.h and libnkp.pc for library users" \
	"[ -f '$dest$prefix/include/nkp/nkp.h' ] && find '$dest$prefix' -name libnkp.pc | grep -q ."
pc=$(find "$dest$prefix" -name libnkp.pc | head -n1)
libs=$(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --static --libs libnkp 2>&1)
echo "# pkg-config --static --libs libnkp: $libs"
has_all_libs() {
	local l
	for l in -lglib-2.0 -lcrypto -lxml2 -lkeyutils; do grep -qw -- "$l" <<<"$libs" || return 1; done
}
check "libnkp.pc names every library libnkp.so links" "has_all_libs"
# libvirt and tpm2-tss are dlopened when first needed (plugin/lib/dl.c): a
# hook call for a VM that is not nkp's must not map them.
lib=$(find "$dest$prefix" -name 'libnkp.so.0' | head -n1)
links_neither() { # FILE…
	[ -n "$1" ] && readelf -d "$@" >/dev/null && ! readelf -d "$@" | grep NEEDED | grep -Eq 'libvirt|libtss2'
}
programs=("$dest$prefix/sbin/nkpctl" "$dest$prefix/sbin/nkpd" "$dest$prefix/libexec/nkp/nkp-swtpm-certs")
[ -x "$hook" ] && programs+=("$hook")
bins=("$lib" "${programs[@]}")
check "libnkp.so and the programs do not link libvirt or tpm2-tss (loaded on first use)" 'links_neither "${bins[@]}"'
# The programs are thin: they link libnkp.so, not a copy of the library.
links_libnkp() { # FILE…
	local f
	for f; do readelf -d "$f" | grep NEEDED | grep -q 'libnkp\.so\.0' || { echo "# $f"; return 1; }; done
}
check "each installed program links libnkp.so.0" 'links_libnkp "${programs[@]}"'
# ... and include only the public header: each source of each installed
# program compiles with include/ (nkp/nkp.h), its own folder and GLib on the
# path, never plugin/lib (nkp-private.h) or the build tree.
SRC=${NKP_SOURCE_DIR:?NKP_SOURCE_DIR not set}
public_only() {
	local name file defs bad=0
	while IFS=$'\t' read -r name file defs; do
		# shellcheck disable=SC2086 # defs: the target's own -D flags, one word each
		cc -fsyntax-only -std=c11 $defs -I"$SRC/include" -I"$(dirname "$file")" \
			$(pkg-config --cflags glib-2.0 json-glib-1.0) "$file" 2>&1 | sed "s|^|# $name: |" | grep . && bad=1
	done < <(meson introspect --targets "$BUILD" | python3 -c '
import json, sys
for t in json.load(sys.stdin):
    if t["type"] == "executable" and t.get("installed"):
        for s in t["target_sources"]:
            defs = " ".join(p for p in s["parameters"] if p.startswith("-D"))
            for f in s["sources"]:
                print(t["name"], f, defs, sep="\t")')
	[ "$bad" = 0 ]
}
check "every installed program's source compiles over include/ alone (no private header)" public_only
conf="$dest/etc/nkp/nkp.conf"
check "the config at /etc/nkp/nkp.conf, 0644" "[ \"\$(stat -c %a '$conf')\" = 644 ]"
check "the config has every section, all defaults commented out" \
	"grep -q '^\[tpm\]' '$conf' && grep -q '^\[migration\]' '$conf' && grep -q '^\[vtpm\]' '$conf' && ! grep -Eq '^[a-z_]+ *=' '$conf'"

# The installed nkpctl runs and reads the installed config (--root = DESTDIR).
# It finds the installed libnkp.so.0 in the libdir (on a real host the
# loader's default path; under DESTDIR, through LD_LIBRARY_PATH).
export LD_LIBRARY_PATH="$dest$libdir"
check "the installed nkpctl runs against the installed libnkp.so.0" \
	"ldd '$dest$prefix/sbin/nkpctl' | grep -q 'libnkp.so.0 => $dest$libdir/libnkp.so.0'"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" provider list 2>&1)
rc=$?
check "installed nkpctl reads the installed config" "[ $rc = 0 ]"
[ "$rc" = 0 ] || echo "# $out"
# Edited in place: a second [tpm] section appended instead is refused.
cp "$conf" "$conf.orig"
printf '\n[tpm]\ntcti = none\n' >>"$conf"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" provider list 2>&1)
rc=$?
check "a second [tpm] section appended: one clear line naming it, non-zero exit" \
	"[ $rc != 0 ] && [ \$(wc -l <<<\"\$out\") = 1 ] && grep -q 'the section \[tpm\] appears a second time' <<<\"\$out\""
mv "$conf.orig" "$conf"
sed -i 's|^#tcti = .*|tcti = none|' "$conf"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" --json host status 2>&1)
check "an edit to the config takes effect (tcti none)" "grep -q '\"tcti\" *: *\"none\"' <<<\"\$out\""
sed -i 's|^#policy = .*|policy = maybe|' "$conf"
out=$("$dest$prefix/sbin/nkpctl" --root "$dest" provider list 2>&1)
rc=$?
check "a bad config value: one clear line, non-zero exit" \
	"[ $rc != 0 ] && [ \$(wc -l <<<\"\$out\") = 1 ] && grep -q 'policy=maybe' <<<\"\$out\""

# A reinstall (an upgrade) keeps the admin's config.
before=$(sha256sum <"$conf")
check "a reinstall succeeds" "install_into"
check "a reinstall keeps the edited config" "[ \"\$(sha256sum <'$conf')\" = '$before' ]"

assert_done
