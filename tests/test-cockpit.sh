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
# Screenshots of each state: $NKP_BUILD_DIR/meson-logs/cockpit/*.png.
# playwright-core comes from npm into NKP_NODE_CACHE (default
# ~/.cache/nkp-test-node); no browser is ever downloaded.
set -u
source "$(dirname "$0")/lib/cli.sh"

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
SRC=${NKP_SOURCE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
BUILD=${NKP_BUILD_DIR:-$SRC/build}
ARTIFACTS=$BUILD/meson-logs/cockpit
PLAYWRIGHT_VERSION=1.61.0  # the last to run on Debian 12's node 18
NODE_CACHE=${NKP_NODE_CACHE:-$HOME/.cache/nkp-test-node}
CHROMIUM=/usr/bin/chromium
WS=/usr/lib/cockpit/cockpit-ws

[ "$(id -u)" = 0 ] || skip_all "needs root (the page runs nkpctl with superuser: require)"
for p in "$WS" /usr/bin/cockpit-bridge "$CHROMIUM"; do
        [ -x "$p" ] || skip_all "$p is not installed (.ci/install-deps.sh installs it)"
done
for c in node npm curl; do
        command -v "$c" >/dev/null || skip_all "$c is not installed (.ci/install-deps.sh installs it)"
done

TOP=$(mktemp -d)
ws_pid= chromium_pid= node_pid=
stop_pid() { # PID: TERM, then KILL after 5 s
        [ -n "$1" ] || return 0
        kill "$1" 2>/dev/null || return 0
        for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$1" 2>/dev/null
}
cleanup() {
        stop_pid "$node_pid"
        stop_pid "$chromium_pid"
        stop_pid "$ws_pid"
        local r
        for r in "$TOP"/root-*; do
                [ -d "$r/var/lib/nkp" ] && "$NKPCTL" --root "$r" host flush-cache >/dev/null 2>&1
        done
        rm -rf "$TOP"
}
trap cleanup EXIT

# ---- playwright-core (npm), Chromium (Debian) ---------------------------------------------
if [ ! -f "$NODE_CACHE/node_modules/playwright-core/package.json" ] ||
   ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$NODE_CACHE/node_modules/playwright-core/package.json"; then
        mkdir -p "$NODE_CACHE"
        PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_CACHE" --no-audit --no-fund \
                --silent "playwright-core@$PLAYWRIGHT_VERSION" >"$TOP/npm.log" 2>&1 ||
                fail "npm install playwright-core@$PLAYWRIGHT_VERSION: $(tail -n 3 "$TOP/npm.log")"
fi
pass "playwright-core $PLAYWRIGHT_VERSION in $NODE_CACHE"

# ---- the page, the wrapper, the roots ---------------------------------------------------------
mkdir -p "$TOP/share/cockpit" "$TOP/bin" "$TOP/home" "$ARTIFACTS"
rm -f "$ARTIFACTS"/*.png
ln -s "$SRC/cockpit" "$TOP/share/cockpit/nkp"
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

# ---- cockpit-ws on loopback ---------------------------------------------------------------------
started=false
for try in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 40000))
        PATH="$TOP/bin:$PATH" XDG_DATA_DIRS="$TOP/share:/usr/share" \
                "$WS" --no-tls --address=127.0.0.1 --port="$port" --local-session=cockpit-bridge \
                </dev/null >"$TOP/ws.log" 2>&1 &
        ws_pid=$!
        for _ in $(seq 50); do
                kill -0 "$ws_pid" 2>/dev/null || break
                if curl -sf -o /dev/null "http://127.0.0.1:$port/cockpit/@localhost/nkp/manifest.json"; then
                        started=true
                        break
                fi
                sleep 0.1
        done
        $started && break
        stop_pid "$ws_pid"
        ws_pid=
done
$started || fail "cockpit-ws serves the page on loopback: $(tail -n 3 "$TOP/ws.log")"
pass "cockpit-ws $(dpkg-query -W -f='${Version}' cockpit-ws 2>/dev/null) serves the page on 127.0.0.1:$port"

# ---- Chromium, headless, a fresh profile, reached over CDP ----------------------------------------
HOME="$TOP/home" "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --disable-dev-shm-usage --user-data-dir="$TOP/chromium" \
        --remote-debugging-address=127.0.0.1 --remote-debugging-port=0 about:blank \
        </dev/null >"$TOP/chromium.log" 2>&1 &
chromium_pid=$!
cdp_port=
for _ in $(seq 100); do
        kill -0 "$chromium_pid" 2>/dev/null || break
        if [ -s "$TOP/chromium/DevToolsActivePort" ]; then
                cdp_port=$(head -n 1 "$TOP/chromium/DevToolsActivePort")
                break
        fi
        sleep 0.1
done
[ -n "$cdp_port" ] || fail "Chromium starts headless: $(tail -n 3 "$TOP/chromium.log")"
pass "$("$CHROMIUM" --version 2>/dev/null) headless, DevTools on 127.0.0.1:$cdp_port"

# ---- the scenario ----------------------------------------------------------------------------------
NKP_PLAYWRIGHT="$NODE_CACHE/node_modules/playwright-core" NKP_CDP_PORT=$cdp_port \
NKP_COCKPIT_URL="http://127.0.0.1:$port" NKP_TOP=$TOP NKPCTL=$NKPCTL NKP_ARTIFACTS=$ARTIFACTS \
        timeout 240 node "$SRC/tests/test-cockpit.js" >"$TOP/driver.out" 2>"$TOP/driver.err" &
node_pid=$!
wait "$node_pid"
driver_rc=$?
node_pid=
while read -r kind what; do
        case $kind in
        PASS) pass "$what" ;;
        FAIL) not_ok "$what" ;;
        *) note "$what" ;;
        esac
done <"$TOP/driver.out"
if [ "$driver_rc" != 0 ]; then
        not_ok "the browser scenario ran to its end (exit $driver_rc)"
        sed 's/^/# driver: /' "$TOP/driver.err" | tail -n 20
        sed 's/^/# cockpit-ws: /' "$TOP/ws.log" | tail -n 20
fi
assert_done
