#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Debian package, end to end (suite package; root):
#   1. built with dpkg-buildpackage from a clean `git archive` of HEAD
#      (uncommitted changes are not in it), DEB_BUILD_OPTIONS=nocheck (the
#      unit tests run in their own phase);
#   2. lintian: no error or warning but the overridden ones;
#   3. the file list of nkp_*.deb;
#   4. `apt-get install ./nkp_*.deb ./libnkp0_*.deb`: every installed path and
#      mode, the hook (a symlink libvirt follows) answers, nkpd's unit
#      verifies and is enabled, /var/lib/nkp 0700, the config a conffile,
#      each man page renders with `man -l`, the installed completion offers
#      the providers of a throwaway root, and postinst reloads a running
#      libvirtd with SIGHUP (a stand-in daemon whose pid is in
#      /run/libvirtd.pid: systemd is not PID 1 here; a real libvirtd in this
#      namespace is reloaded instead, and that check skipped);
#   5. purge: programs, hook, unit link and config gone, /var/lib/nkp kept
#      with the message saying why, libvirtd reloaded again.
# Cleans up on failure too (trap).  Refuses to run (77) where an nkp package
# or file is already installed that this test did not install.
set -u
source "$(dirname "$0")/lib/cli.sh"
SRC=${NKP_SOURCE_DIR:?NKP_SOURCE_DIR not set}

[ "$(id -u)" = 0 ] || skip_all "needs root (apt-get install of the package)"
for c in git dpkg-buildpackage lintian apt-get man scdoc systemd-analyze; do
        command -v "$c" >/dev/null || skip_all "$c is not installed (.ci/install-deps.sh)"
done
for p in nkp libnkp0 libnkp-dev; do
        st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) || continue
        [ "$st" = not-installed ] || skip_all "the package $p is already on this machine ($st): not this test's to remove"
done
for f in /etc/nkp/nkp.conf /etc/libvirt/hooks/qemu.d/50-nkp /usr/sbin/nkpctl /usr/sbin/nkpd /lib/systemd/system/nkpd.service; do
        [ -e "$f" ] || [ -L "$f" ] && skip_all "$f exists (a meson install?): not this test's to overwrite"
done
# A real libvirtd in this namespace is reloaded by the package like on any
# host (a reload keeps VMs running); the stand-in below is then not used.
real_libvirtd=0
[ -s /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null && real_libvirtd=1
git -C "$SRC" rev-parse HEAD >/dev/null 2>&1 || skip_all "$SRC is not a git checkout"

tmp=$(mktemp -d)
installed=0
fake_pid=""
# /etc/nkp and /var/lib/nkp are mount points of the lab hosts other tests
# run at the same time (integration/lab.sh binds each host's own copy over
# them in its mount namespace), and removing a directory detaches the mounts
# on it in every namespace.  So the test never lets either go: a file of its
# own keeps /etc/nkp non-empty (dpkg's purge then leaves the directory), and
# /var/lib/nkp is kept by the package anyway.  Both stay, empty, afterwards.
mkdir -p /etc/nkp
keep=/etc/nkp/.test-deb-keep.$$
: >"$keep"
cleanup() {
        if [ "$installed" = 1 ]; then
                DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq nkp libnkp0 libnkp-dev >/dev/null 2>&1
        fi
        [ -n "$fake_pid" ] && kill "$fake_pid" 2>/dev/null
        [ -n "$fake_pid" ] && rm -f /run/libvirtd.pid
        rm -f "$keep"
        rm -rf "$tmp"
}
trap cleanup EXIT

# ---- 1. build from a clean tree ----------------------------------------------------
mkdir "$tmp/src"
git -C "$SRC" archive HEAD | tar -x -C "$tmp/src"
note "building the package from $(git -C "$SRC" rev-parse --short HEAD) (git archive)"
start=$SECONDS
(cd "$tmp/src" && DEB_BUILD_OPTIONS="nocheck parallel=$(nproc)" dpkg-buildpackage -us -uc -b) >"$tmp/build.log" 2>&1
rc=$?
timing "dpkg-buildpackage: $((SECONDS - start)) s"
[ "$rc" = 0 ] || { tail -n 30 "$tmp/build.log" | sed 's/^/# /'; fail "dpkg-buildpackage -us -uc -b succeeds"; }
pass "dpkg-buildpackage -us -uc -b succeeds"
deb=$(ls "$tmp"/nkp_*_*.deb) lib=$(ls "$tmp"/libnkp0_*_*.deb) dev=$(ls "$tmp"/libnkp-dev_*_*.deb) ||
        fail "nkp_*.deb, libnkp0_*.deb and libnkp-dev_*.deb are built"
pass "nkp_*.deb, libnkp0_*.deb and libnkp-dev_*.deb are built"

# ---- 2. lintian ------------------------------------------------------------------------
lintian --fail-on error,warning --display-info "$tmp"/*.changes >"$tmp/lintian.log" 2>&1
rc=$?
lint=$(grep -v '^running with root privileges' "$tmp/lintian.log")
err=$lint
check "lintian: no error or warning (overrides in debian/*.lintian-overrides)" '[ "$rc" = 0 ]'
[ -n "$lint" ] && sed 's/^/# /' <<<"$lint"

# ---- 3. the file list -----------------------------------------------------------------
files=$(dpkg-deb -c "$deb" | awk '{ print $1, $6, $7, $8 }' | sed 's/ *$//')
in_deb() { grep -qxF -- "$1" <<<"$files"; }
for f in "-rwxr-xr-x ./usr/sbin/nkpctl" "-rwxr-xr-x ./usr/sbin/nkpd" \
         "-rwxr-xr-x ./usr/libexec/nkp/nkp-hook" "-rwxr-xr-x ./usr/libexec/nkp/nkp-swtpm-certs" \
         "lrwxrwxrwx ./etc/libvirt/hooks/qemu.d/50-nkp -> /usr/libexec/nkp/nkp-hook" \
         "-rw-r--r-- ./etc/nkp/nkp.conf" "-rw-r--r-- ./lib/systemd/system/nkpd.service" \
         "-rw-r--r-- ./usr/share/bash-completion/completions/nkpctl" \
         "-rw-r--r-- ./usr/share/man/man8/nkpctl.8.gz" "-rw-r--r-- ./usr/share/man/man8/nkpd.8.gz" \
         "-rw-r--r-- ./usr/share/man/man8/nkp-hook.8.gz" "-rw-r--r-- ./usr/share/man/man8/nkp-swtpm-certs.8.gz" \
         "-rw-r--r-- ./usr/share/man/man5/nkp.conf.5.gz"; do
        check "nkp_*.deb: $f" 'in_deb "$f"'
done
# Every unit meson installs is in the package (another helper adds more).
for u in $(cd "$tmp/src" && find debian/tmp/lib/systemd/system -name '*.service' -printf '%f\n' 2>/dev/null); do
        check "nkp_*.deb ships the unit $u" 'in_deb "-rw-r--r-- ./lib/systemd/system/$u"'
done
lib_files=$(dpkg-deb -c "$lib") dev_files=$(dpkg-deb -c "$dev")
check "libnkp0: the library" 'grep -q "libnkp.so.0.1.0$" <<<"$lib_files"'
cockpit_deb=$(ls "$tmp"/nkp-cockpit_*_all.deb 2>/dev/null)
check "nkp-cockpit_*.deb ships the Cockpit page" \
        '[ -n "$cockpit_deb" ] && dpkg-deb -c "$cockpit_deb" | grep -q "usr/share/cockpit/nkp/manifest.json$" &&
         dpkg-deb -f "$cockpit_deb" Depends | grep -q cockpit-bridge'
check "libnkp-dev: nkp.h and libnkp.pc" 'grep -q "include/nkp/nkp.h$" <<<"$dev_files" && grep -q "libnkp.pc$" <<<"$dev_files"'
check "libnkp0 depends on libvirt0 and tpm2-tss (dlopened, so no shlibs dependency)" \
        'dpkg-deb -f "$lib" Depends | grep -q libvirt0 && dpkg-deb -f "$lib" Depends | grep -q libtss2-esys'

# ---- 4. install ------------------------------------------------------------------------
# A stand-in for a running libvirtd without systemd: postinst/postrm must
# SIGHUP the pid in /run/libvirtd.pid whose comm is libvirtd.
if [ "$real_libvirtd" = 0 ]; then
        mkdir "$tmp/fake"
        # Python, not bash: bash cannot trap a signal ignored when it
        # started (a run under nohup), Python's signal() can.
        printf '#!/usr/bin/python3\nimport signal, time\nsignal.signal(signal.SIGHUP, lambda *a: open("%s/hups", "a").write("HUP\\n"))\nwhile True:\n    time.sleep(0.1)\n' "$tmp/fake" >"$tmp/fake/libvirtd"
        chmod +x "$tmp/fake/libvirtd"
        "$tmp/fake/libvirtd" & fake_pid=$!
        echo "$fake_pid" >/run/libvirtd.pid
fi
hups() { cat "$tmp/fake/hups" 2>/dev/null | wc -l; }

start=$SECONDS
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb" "$lib" >"$tmp/install.log" 2>&1
rc=$?
installed=1
timing "apt-get install: $((SECONDS - start)) s"
[ "$rc" = 0 ] || { tail -n 30 "$tmp/install.log" | sed 's/^/# /'; fail "apt-get install ./nkp_*.deb ./libnkp0_*.deb succeeds"; }
pass "apt-get install ./nkp_*.deb ./libnkp0_*.deb succeeds"

mode_of() { stat -c '%a %U:%G' "$1" 2>/dev/null; }
for f in /usr/sbin/nkpctl /usr/sbin/nkpd /usr/libexec/nkp/nkp-hook /usr/libexec/nkp/nkp-swtpm-certs; do
        check "$f: 755 root:root" '[ "$(mode_of "$f")" = "755 root:root" ]'
done
check "/var/lib/nkp: 700 root:root (postinst)" '[ "$(mode_of /var/lib/nkp)" = "700 root:root" ]'
check "/etc/nkp/nkp.conf: 644, a conffile" \
        '[ "$(mode_of /etc/nkp/nkp.conf)" = "644 root:root" ] && dpkg-query -W -f="\${Conffiles}" nkp | grep -q " /etc/nkp/nkp.conf "'
check "the hook in qemu.d is a symlink to an executable (libvirt stats through it)" \
        '[ -L /etc/libvirt/hooks/qemu.d/50-nkp ] && [ -x /etc/libvirt/hooks/qemu.d/50-nkp ]'
check "the installed hook answers a foreign domain's release: exit 0" \
        'echo "<domain type=\"kvm\"><name>x</name></domain>" | /etc/libvirt/hooks/qemu.d/50-nkp x release end -'
check "the installed nkpctl runs (--version)" '/usr/sbin/nkpctl --version | grep -q "^nkpctl "'
err=$(systemd-analyze verify /lib/systemd/system/nkpd.service 2>&1)
check "systemd-analyze verify nkpd.service (systemd is not PID 1 here)" '[ -z "$err" ]'
check "nkpd is enabled (multi-user.target.wants)" '[ -L /etc/systemd/system/multi-user.target.wants/nkpd.service ]'
score=$(systemd-analyze security --offline=true /lib/systemd/system/nkpd.service 2>/dev/null | sed -n 's/.*Overall exposure level for nkpd.service: \([0-9.]*\).*/\1/p')
note "systemd-analyze security nkpd.service: $score"
check "nkpd.service exposure below 4 (hardened)" 'awk -v s="$score" "BEGIN { exit !(s != \"\" && s < 4) }"'
if [ "$real_libvirtd" = 0 ]; then
        check "postinst reloaded the running libvirtd (SIGHUP, not a restart)" '[ "$(hups)" = 1 ] && kill -0 "$fake_pid"'
else
        skip "a real libvirtd runs here: reloaded by postinst, not observed"
fi
for page in man8/nkpctl.8 man8/nkpd.8 man8/nkp-hook.8 man8/nkp-swtpm-certs.8 man5/nkp.conf.5; do
        out=$(MANWIDTH=80 man -l "/usr/share/man/$page.gz" 2>"$tmp/man.err")
        err=$(cat "$tmp/man.err")
        check "man -l $page renders (NAME, SYNOPSIS, nothing on stderr)" \
                'grep -q "^NAME" <<<"$out" && grep -q "^SYNOPSIS" <<<"$out" && [ -z "$err" ]'
done
comp=$(NKPCTL=/usr/sbin/nkpctl NKP_COMPLETION=/usr/share/bash-completion/completions/nkpctl \
        "$tmp/src/tests/test-completion.sh" 2>&1) # the archived tree's test, matching its completion
rc=$?
err=$comp
check "the installed completion offers the providers of a throwaway root (test-completion.sh)" \
        '[ "$rc" = 0 ] && grep -q "^ok .* provider show: the root.s provider names" <<<"$comp"'

# ---- 5. purge ---------------------------------------------------------------------------
out=$(DEBIAN_FRONTEND=noninteractive apt-get purge -y -q nkp libnkp0 2>&1)
rc=$?
err=$out
check "apt-get purge nkp libnkp0 succeeds" '[ "$rc" = 0 ]'
installed=0
for f in /usr/sbin/nkpctl /usr/sbin/nkpd /etc/libvirt/hooks/qemu.d/50-nkp /usr/libexec/nkp \
         /lib/systemd/system/nkpd.service /etc/systemd/system/multi-user.target.wants/nkpd.service /etc/nkp/nkp.conf; do
        check "purged: $f is gone" '! [ -e "$f" ] && ! [ -L "$f" ]'
done
check "purge keeps /var/lib/nkp (the providers are the keys to every VM)" '[ -d /var/lib/nkp ]'
check "... and says why" 'grep -q "/var/lib/nkp was kept" <<<"$out" && grep -q "keys to" <<<"$out"'
if [ "$real_libvirtd" = 0 ]; then
        check "postrm reloaded libvirtd again (the hook is gone)" '[ "$(hups)" = 2 ]'
fi
assert_done
