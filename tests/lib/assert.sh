# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Assertions for every nkp shell test: the CLI tests (tests/test-*.sh, through
# tests/lib/cli.sh) and the lab tests (integration/t-*.sh, through
# integration/lib/test.sh) source this one file.  One output format (TAP
# lines), one counter, and the exit status follows the failures:
#
#   pass WHAT             "ok N - WHAT"
#   not_ok WHAT           "not ok N - WHAT"; the test goes on, assert_done exits 1
#   fail WHAT             "not ok N - WHAT", runs ASSERT_ON_FAIL, exits 1 at once
#                         (a lab test stops at its first failure: every step
#                         builds on the one before; EXIT traps still clean up)
#   check WHAT COND       COND is one shell condition, eval'd in the test's shell
#                         ('[ $rc = 0 ] && grep -q x <<<"$out"'; $? there is the
#                         status of the command run just before) → pass or not_ok
#   check WHAT CMD ARG…   more than one word: the command run as is → pass or not_ok
#   skip WHAT             "ok N # SKIP WHAT": one case that cannot run here
#   skip_all WHY          "1..0 # SKIP WHY", exit 77: the whole test cannot run here
#   note TEXT             "# TEXT" (context, measured figures)
#   timing TEXT           "# TIMING: TEXT"
#   assert_done           "1..N" and "# NAME: P passed, F failed"; exit 0 or 1
#
# Hooks the test may set: check_diag, a function called after a failed
# check (its output is printed as "# " lines: rc, stderr…); ASSERT_ON_FAIL,
# an array of commands that `fail` runs before it exits (log dumps).
# ASSERT_NAME names the test in the summary (default: the script's name).
# Exit codes: 0 every check passed, 77 skipped, 1 otherwise.

ASSERT_NAME=${ASSERT_NAME:-$(basename "$0" .sh)}
ASSERT_N=0
ASSERT_FAILS=0
ASSERT_ON_FAIL=()

pass() { ASSERT_N=$((ASSERT_N + 1)); echo "ok $ASSERT_N - $*"; }
not_ok() { ASSERT_N=$((ASSERT_N + 1)); ASSERT_FAILS=$((ASSERT_FAILS + 1)); echo "not ok $ASSERT_N - $*"; }
skip() { ASSERT_N=$((ASSERT_N + 1)); echo "ok $ASSERT_N # SKIP $*"; }
note() { echo "# $*"; }
timing() { echo "# TIMING: $*"; }

fail() {
        not_ok "$@"
        local _assert_hooks=("${ASSERT_ON_FAIL[@]}") _assert_c
        ASSERT_ON_FAIL=()       # a hook that fails must not loop back here
        for _assert_c in "${_assert_hooks[@]}"; do eval "$_assert_c" || true; done
        echo "# $ASSERT_NAME: stopped at its first failure (check $ASSERT_N)"
        exit 1
}

# (COND still sees in $? the exit status of the command run just before check.)
check() {
        local _assert_rc=$? _assert_what=$1 _assert_ok=0
        shift
        if [ $# = 0 ]; then
                not_ok "$_assert_what (check without a condition)"
                return 0
        elif [ $# = 1 ]; then
                _assert_return "$_assert_rc"
                if eval "$1"; then _assert_ok=1; fi
        elif "$@"; then
                _assert_ok=1
        fi
        if [ $_assert_ok = 1 ]; then
                pass "$_assert_what"
        else
                not_ok "$_assert_what"
                if declare -F check_diag >/dev/null; then check_diag 2>&1 | sed 's/^/# /'; fi
        fi
        return 0
}

_assert_return() { return "$1"; }

skip_all() {
        echo "1..0 # SKIP $*"
        exit 77
}

assert_done() {
        echo "1..$ASSERT_N"
        echo "# $ASSERT_NAME: $((ASSERT_N - ASSERT_FAILS)) passed, $ASSERT_FAILS failed"
        [ "$ASSERT_FAILS" = 0 ] && exit 0
        exit 1
}
