#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Cockpit page in a real browser, on real Cockpit and real nkpctl:
# cockpit-ws on loopback (--local-session: the bridge runs as this user,
# root, no login) serving the page from the source tree, Debian's Chromium
# headless, driven by playwright-core (tests/test-cockpit.js: the scenario
# and its checks).  The page runs `nkpctl` from PATH, as in production; here
# PATH starts with a wrapper that adds --root (a throwaway root, switched by
# the driver) and --connect test://FILE (libvirt's test driver, with VMs
# the driver writes).  Nothing of the page is changed for the test.
#
# Screenshots of each state: $NKP_BUILD_DIR/meson-logs/cockpit/NN-*.png.
# Cockpit, Chromium and playwright-core (npm): tests/lib/cockpit.sh.
set -u
source "$(dirname "$0")/lib/cli.sh"
source "$(dirname "$0")/lib/cockpit.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
cockpit_check_env

TOP=$(mktemp -d)
cleanup() {
        cockpit_stop
        local r
        for r in "$TOP"/root-*; do
                [ -d "$r/var/lib/nkp" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1
        done
        rm -rf "$TOP"
}
trap cleanup EXIT

cockpit_playwright "$TOP"

# The roots, and the page's nkpctl: a wrapper on the current one.
mkdir -p "$TOP/bin"
for r in a b c; do
        mkdir -p "$TOP/root-$r/etc/nkp"
        printf '[tpm]\ntcti=none\n' >"$TOP/root-$r/etc/nkp/nkp.conf"
done
echo "$TOP/root-a" >"$TOP/current-root"
cat >"$TOP/bin/nkpctl" <<EOF
#!/bin/sh
# test-cockpit.sh: the page's nkpctl on the test's current root and VMs.
exec '$NKPCTL' --root "\$(cat '$TOP/current-root')" --connect 'test://$TOP/libvirt.xml' "\$@"
EOF
chmod 755 "$TOP/bin/nkpctl"

mkdir -p "$COCKPIT_ARTIFACTS"
rm -f "$COCKPIT_ARTIFACTS"/[0-9][0-9]-*.png
cockpit_ws_start "$TOP" "$TOP/bin"
cockpit_chromium_start "$TOP"
cockpit_drive "$TOP" "$COCKPIT_SRC/tests/test-cockpit.js" NKP_TOP="$TOP" NKPCTL="$NKPCTL"
assert_done
