#!/bin/sh
# Installs every Debian 12 package nkp needs to build, test and run its lab.
# Idempotent; run as root (or through sudo).
set -eu
[ "$(id -u)" = 0 ] || exec sudo "$0" "$@"
export DEBIAN_FRONTEND=noninteractive
packages="
  meson ninja-build pkg-config gcc clang libclang-rt-14-dev llvm
  libglib2.0-dev libjson-glib-dev libssl-dev openssl libtss2-dev libkeyutils-dev keyutils
  libvirt-dev libxml2-dev python3
  swtpm swtpm-tools tpm2-tools
  libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils virtinst
  busybox-static cpio gzip kmod iproute2 bindfs util-linux procps psmisc strace
  ovmf virtnbdbackup socat curl
  tang clevis clevis-tpm2 jose libjose-dev libgfshare-dev libgfshare-bin
  cockpit-ws cockpit-bridge cockpit-system chromium chromium-driver
  debhelper dpkg-dev fakeroot lintian scdoc bash-completion man-db
"
missing=""
for p in $packages; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
# node and npm for the Cockpit page's browser test (tests/test-cockpit.sh
# installs playwright-core from npm; Chromium is Debian's, never downloaded).
# A node that is already there (with its npm) is kept, whatever its origin.
command -v npm >/dev/null 2>&1 || missing="$missing nodejs npm"
if [ -n "$missing" ]; then
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing
fi
echo "install-deps: all packages present"
