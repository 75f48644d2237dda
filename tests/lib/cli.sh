# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Helpers for the CLI shell tests (tests/test-*.sh, suite unit):
#
#   source "$(dirname "$0")/lib/cli.sh"
#
# brings the shared assertions (tests/lib/assert.sh: pass, not_ok, fail,
# check, skip, skip_all, note, assert_done; TAP lines, exit 0/1/77) and:
#
#   tree_sum DIR          one digest of every path, mode, size, type and
#                         content under DIR (a refused command must leave
#                         it unchanged)
#   cli_newroot PARENT    a new nkp root under PARENT (PARENT/root.XXXXXX,
#                         printed) with /etc/nkp/nkp.conf saying [tpm]
#                         tcti=none, so no test touches the machine's TPM
#
# A test ends with assert_done; its EXIT trap (temp roots, key caches,
# daemons it started, each by PID) stays in the test, which knows what it
# started.

source "$(dirname "${BASH_SOURCE[0]}")/assert.sh"

tree_sum() {
        (cd "$1" && { find . -printf '%p %m %s %y\n' | LC_ALL=C sort
                      find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum; }) | sha256sum
}

cli_newroot() {
        local r
        r=$(mktemp -d "$1/root.XXXXXX") || return 1
        mkdir -p "$r/etc/nkp"
        printf '[tpm]\ntcti=none\n' >"$r/etc/nkp/nkp.conf"
        echo "$r"
}
