# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The frame of a lab test (integration/t-*.sh): header, assertions, cleanup.
#
#   source "$(dirname "$0")/lib/test.sh"   # lab.sh, the assertions, lib/guest.sh, lib/nkpd.sh
#   lab_test t-nkp-x "what it checks, one line" [--needs CMD]… [--built PATH]…
#   lab_test_init                          # lab_init (EXIT trap) or fail
#   lab_host_with_p1 a                     # host a up, nkp installed, provider p1 (backed up, default)
#   … pass / fail / check / timing / note (tests/lib/assert.sh) …
#   lab_test_done                          # total time, "1..N", exit 0 or 1
#
# lab_test prints "# NAME: WHAT" and skips (exit 77, "1..0 # SKIP why") when
# the lab cannot run here (lab_check_env: not root, no QEMU, no libvirtd, no
# namespaces…), when a --needs command is not installed, or when a --built
# program (a path under $NKP_BUILD_DIR) is not built.
#
# Failures: `fail` prints the not-ok line and the log tails of every lab host
# (lab_dump HOST "$dom": libvirtd, and QEMU/swtpm/serial of the domain the
# test names in $dom), then exits 1; tests add their own dumps with
# ASSERT_ON_FAIL+=('command').  Cleanup: lab_init's EXIT trap
# (lab_cleanup_all in lab.sh) stops every process of every lab host by PID,
# unmounts and removes $LAB_DIR whatever way the test ends; what a test
# starts itself is registered with lab_at_exit 'command'.

LAB_TEST_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$LAB_TEST_LIB/../lab.sh"
source "$LAB_TEST_LIB/../../tests/lib/assert.sh"
source "$LAB_TEST_LIB/guest.sh"
source "$LAB_TEST_LIB/nkpd.sh"

lab_test() {
    local what=$2 c f
    ASSERT_NAME=$1
    LAB_TEST_T0=$(lab_now)
    shift 2
    note "$ASSERT_NAME: $what"
    if ! c=$(lab_check_env); then skip_all "$c"; fi
    while [ $# -gt 0 ]; do
        case $1 in
        --needs) command -v "$2" >/dev/null || skip_all "$2 is not installed";;
        --built) f=${NKP_BUILD_DIR:?NKP_BUILD_DIR not set}/$2
                 [ -x "$f" ] || skip_all "$2 is not built";;
        *) echo "lab_test: unknown option '$1'" >&2; exit 1;;
        esac
        shift 2
    done
    ASSERT_ON_FAIL+=(lab_test_dump)
}

# lab_test_dump: log tails of every lab host, for the domain in $dom if set.
lab_test_dump() {
    local h
    [ -n "${LAB_DIR:-}" ] && [ -d "$LAB_DIR/hosts" ] || return 0
    for h in "$LAB_DIR"/hosts/*; do
        [ -d "$h" ] && lab_dump "$(basename "$h")" "${dom:-}"
    done
    return 0
}

lab_test_init() {
    lab_init || fail "guest build failed"
    note "domain type $LAB_DOMAIN_TYPE, LAB_DIR $LAB_DIR"
}

lab_test_done() {
    timing "total $(lab_since "$LAB_TEST_T0") s"
    assert_done
}

# The start of most one-host tests: HOST up with the built nkp installed,
# provider p1 made, backed up to $LAB_DIR/p1.p12 (password in $LAB_DIR/pw)
# and the default.  Sets umask 077 for the test's own files.
lab_host_with_p1() {
    local h=$1
    lab_host_up "$h" || fail "host $h did not come up"
    lab_install_nkp "$h" "$NKP_BUILD_DIR"
    umask 077
    printf 'lab password\n' > "$LAB_DIR/pw"
    lab_exec "$h" nkpctl provider create p1 >/dev/null || fail "provider create"
    lab_exec "$h" nkpctl provider backup p1 --out "$LAB_DIR/p1.p12" \
        --password-file "$LAB_DIR/pw" >/dev/null || fail "backup"
    lab_exec "$h" nkpctl provider set-default p1 >/dev/null || fail "set-default"
}
