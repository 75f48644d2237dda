#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkp's systemd units from the source tree, without installing them (systemd
# need not be PID 1): each *.service in plugin/nkpd/ passes `systemd-analyze
# verify` (ExecStart= pointed at the build's program, no man page lookup),
# and nkpd.service keeps its hardening: ordered after libvirtd, exposure
# (`systemd-analyze security --offline=true`) below 4, the sandbox settings
# README and nkpd(8) describe.  tests/test-deb.sh verifies the installed ones.
set -u
source "$(dirname "$0")/lib/cli.sh"
SRC=${NKP_SOURCE_DIR:?NKP_SOURCE_DIR not set}
BUILD=${NKP_BUILD_DIR:?NKP_BUILD_DIR not set}
command -v systemd-analyze >/dev/null || skip_all "systemd-analyze is not installed"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The build's program of that name (nkpd, nkpctl, nkp-swtpm-certs…), or "".
built() { find "$BUILD/plugin" "$BUILD/swtpm-hooks" -maxdepth 2 -type f -perm -u+x -name "$1" 2>/dev/null | head -n1; }
for unit in "$SRC"/plugin/nkpd/*.service; do
        u=$(basename "$unit")
        cp "$unit" "$tmp/$u"
        # Each Exec*=/usr/…/PROG -> the build's PROG (systemd checks it exists).
        for path in $(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' "$unit" | sort -u); do
                b=$(built "$(basename "$path")")
                [ -n "$b" ] || { note "$u: $path is not built here, checked as /bin/true"; b=/bin/true; }
                sed -i "s|=\([-@:+!]*\)$path|=\1$b|" "$tmp/$u"
        done
        err=$(systemd-analyze verify --man=no "$tmp/$u" 2>&1)
        check "systemd-analyze verify $u" '[ -z "$err" ]'
        [ -z "$err" ] || sed 's/^/# /' <<<"$err"
done

svc=$SRC/plugin/nkpd/nkpd.service
check "nkpd.service is ordered after libvirtd" 'grep -Eq "^After=.*libvirtd\.service" "$svc"'
for s in ProtectSystem=strict ProtectHome=yes PrivateTmp=yes NoNewPrivileges=yes \
         "RestrictAddressFamilies=AF_UNIX" "CapabilityBoundingSet=" "SystemCallFilter=@system-service"; do
        check "nkpd.service: $s" 'grep -q "^$s" "$svc"'
done
score=$(systemd-analyze security --offline=true "$tmp/nkpd.service" 2>/dev/null |
        sed -n 's/.*Overall exposure level for nkpd.service: \([0-9.]*\).*/\1/p')
note "systemd-analyze security nkpd.service: $score"
check "nkpd.service exposure below 4 (README: 9.0 before hardening, 2.9 after)" \
        'awk -v s="$score" "BEGIN { exit !(s != \"\" && s < 4) }"'
assert_done
