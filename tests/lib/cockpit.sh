# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Cockpit and a headless browser for the page's tests (tests/test-cockpit.sh,
# integration/t-cockpit.sh), after tests/lib/assert.sh:
#
#   cockpit_check_env             skip_all (exit 77) when a prerequisite is missing
#   cockpit_playwright DIR        playwright-core from npm into NKP_NODE_CACHE
#   cockpit_ws_start DIR BIN      cockpit-ws on 127.0.0.1 (--local-session: the
#                                 bridge runs as root, no login) serving the
#                                 source tree's cockpit/ as package "nkp"; BIN
#                                 goes first in the bridge's PATH (the test's
#                                 `nkpctl` wrapper); sets COCKPIT_URL
#   cockpit_chromium_start DIR    Debian's Chromium, headless, a fresh profile,
#                                 DevTools on loopback; sets COCKPIT_CDP_PORT
#   cockpit_drive SCRIPT          runs a driver (node, tests/lib/cockpit-driver.js)
#                                 and turns its PASS/FAIL/NOTE lines into TAP
#   cockpit_stop                  stops the driver, Chromium and cockpit-ws by PID
#                                 (call it from the test's EXIT trap)
#
# No browser is ever downloaded: playwright-core drives /usr/bin/chromium
# over CDP.  Screenshots go to $COCKPIT_ARTIFACTS
# (default $NKP_BUILD_DIR/meson-logs/cockpit).

COCKPIT_PLAYWRIGHT_VERSION=1.61.0 # the last to run on Debian 12's node 18
COCKPIT_NODE_CACHE=${NKP_NODE_CACHE:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/nkp-test-node}
COCKPIT_CHROMIUM=/usr/bin/chromium
COCKPIT_WS=/usr/lib/cockpit/cockpit-ws
COCKPIT_SRC=${NKP_SOURCE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
COCKPIT_ARTIFACTS=${COCKPIT_ARTIFACTS:-${NKP_BUILD_DIR:-$COCKPIT_SRC/build}/meson-logs/cockpit}
_cockpit_ws_pid='' _cockpit_chromium_pid='' _cockpit_node_pid=''

cockpit_check_env() {
        local p c
        [ "$(id -u)" = 0 ] || skip_all "needs root (the page runs nkpctl with superuser: require)"
        for p in "$COCKPIT_WS" /usr/bin/cockpit-bridge "$COCKPIT_CHROMIUM"; do
                [ -x "$p" ] || skip_all "$p is not installed (.ci/install-deps.sh installs it)"
        done
        for c in node npm curl; do
                command -v "$c" >/dev/null || skip_all "$c is not installed (.ci/install-deps.sh installs it)"
        done
}

_cockpit_stop_pid() { # PID: TERM, then KILL after 5 s
        [ -n "$1" ] || return 0
        kill "$1" 2>/dev/null || return 0
        local _
        for _ in $(seq 50); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
        kill -9 "$1" 2>/dev/null
}

cockpit_stop() {
        _cockpit_stop_pid "$_cockpit_node_pid"
        _cockpit_stop_pid "$_cockpit_chromium_pid"
        _cockpit_stop_pid "$_cockpit_ws_pid"
        _cockpit_node_pid='' _cockpit_chromium_pid='' _cockpit_ws_pid=''
}

cockpit_playwright() {
        local dir=$1 pkg=$COCKPIT_NODE_CACHE/node_modules/playwright-core/package.json
        if [ ! -f "$pkg" ] || ! grep -q "\"version\": \"$COCKPIT_PLAYWRIGHT_VERSION\"" "$pkg"; then
                mkdir -p "$COCKPIT_NODE_CACHE"
                PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$COCKPIT_NODE_CACHE" --no-audit \
                        --no-fund --silent "playwright-core@$COCKPIT_PLAYWRIGHT_VERSION" >"$dir/npm.log" 2>&1 ||
                        fail "npm install playwright-core@$COCKPIT_PLAYWRIGHT_VERSION: $(tail -n 3 "$dir/npm.log")"
        fi
        pass "playwright-core $COCKPIT_PLAYWRIGHT_VERSION in $COCKPIT_NODE_CACHE"
}

cockpit_ws_start() {
        local dir=$1 bin=$2 port started=false _
        mkdir -p "$dir/share/cockpit" "$COCKPIT_ARTIFACTS"
        ln -sfn "$COCKPIT_SRC/cockpit" "$dir/share/cockpit/nkp"
        for _ in 1 2 3 4 5; do
                port=$((20000 + RANDOM % 40000))
                PATH="$bin:$PATH" XDG_DATA_DIRS="$dir/share:/usr/share" \
                        "$COCKPIT_WS" --no-tls --address=127.0.0.1 --port="$port" \
                        --local-session=cockpit-bridge </dev/null >"$dir/ws.log" 2>&1 &
                _cockpit_ws_pid=$!
                for _ in $(seq 50); do
                        kill -0 "$_cockpit_ws_pid" 2>/dev/null || break
                        if curl -sf -o /dev/null "http://127.0.0.1:$port/cockpit/@localhost/nkp/manifest.json"; then
                                started=true
                                break
                        fi
                        sleep 0.1
                done
                $started && break
                _cockpit_stop_pid "$_cockpit_ws_pid"
                _cockpit_ws_pid=
        done
        $started || fail "cockpit-ws serves the page on loopback: $(tail -n 3 "$dir/ws.log")"
        COCKPIT_URL=http://127.0.0.1:$port
        pass "cockpit-ws $(dpkg-query -W -f='${Version}' cockpit-ws 2>/dev/null) serves the page on 127.0.0.1:$port"
}

cockpit_chromium_start() {
        local dir=$1 _
        mkdir -p "$dir/home"
        HOME="$dir/home" "$COCKPIT_CHROMIUM" --headless --no-sandbox --disable-gpu --disable-quic \
                --no-first-run --disable-background-networking --disable-component-update --disable-sync \
                --disable-dev-shm-usage --user-data-dir="$dir/chromium" \
                --remote-debugging-address=127.0.0.1 --remote-debugging-port=0 about:blank \
                </dev/null >"$dir/chromium.log" 2>&1 &
        _cockpit_chromium_pid=$!
        COCKPIT_CDP_PORT=
        for _ in $(seq 100); do
                kill -0 "$_cockpit_chromium_pid" 2>/dev/null || break
                if [ -s "$dir/chromium/DevToolsActivePort" ]; then
                        COCKPIT_CDP_PORT=$(head -n 1 "$dir/chromium/DevToolsActivePort")
                        break
                fi
                sleep 0.1
        done
        [ -n "$COCKPIT_CDP_PORT" ] || fail "Chromium starts headless: $(tail -n 3 "$dir/chromium.log")"
        pass "$("$COCKPIT_CHROMIUM" --version 2>/dev/null) headless, DevTools on 127.0.0.1:$COCKPIT_CDP_PORT"
}

# cockpit_drive DIR SCRIPT [VAR=VALUE…]: the driver with its environment.
cockpit_drive() {
        local dir=$1 script=$2 rc kind what
        shift 2
        env NKP_PLAYWRIGHT="$COCKPIT_NODE_CACHE/node_modules/playwright-core" \
                NKP_CDP_PORT="$COCKPIT_CDP_PORT" NKP_COCKPIT_URL="$COCKPIT_URL" \
                NKP_ARTIFACTS="$COCKPIT_ARTIFACTS" "$@" \
                timeout 280 node "$script" >"$dir/driver.out" 2>"$dir/driver.err" &
        _cockpit_node_pid=$!
        wait "$_cockpit_node_pid"
        rc=$?
        _cockpit_node_pid=
        while read -r kind what; do
                case $kind in
                PASS) pass "$what" ;;
                FAIL) not_ok "$what" ;;
                *) note "$what" ;;
                esac
        done <"$dir/driver.out"
        if [ "$rc" != 0 ]; then
                sed 's/^/# driver: /' "$dir/driver.err" | tail -n 20
                sed 's/^/# cockpit-ws: /' "$dir/ws.log" | grep -v 'Could not connect' | tail -n 20
                fail "the browser scenario ran to its end (exit $rc)"
        fi
}
