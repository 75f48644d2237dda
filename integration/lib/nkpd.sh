# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpd in a lab host, for the tests that need automatic enrolment (sourced by
# lib/test.sh).  Host a only, its log in $LAB_DIR/nkpd.log (dumped on a
# failure through ASSERT_ON_FAIL).
#   nkpd_start            start the built nkpd in host a, wait until it follows libvirt
#                         (NKPD_ENV="VAR=value ...": its test-only environment)
#   nkpd_stop             stop it by PID (TERM, then KILL after 5 s); safe to call twice
#   set_policy POLICY     host a's nkp.conf: no TPM, [vtpm] policy=POLICY
# Register `lab_at_exit nkpd_stop` after lab_init so a failing test stops it too.

nkpd_pid=
ASSERT_ON_FAIL+=('[ -z "${LAB_DIR:-}" ] || [ ! -f "$LAB_DIR/nkpd.log" ] || sed "s/^/# nkpd: /" "$LAB_DIR/nkpd.log"')

nkpd_start() {
    # a second start in one test: wait for this nkpd's own line
    local before i
    before=$(grep -c "following libvirt" "$LAB_DIR/nkpd.log" 2>/dev/null || true)
    lab_exec a bash -c "env ${NKPD_ENV:-} '$NKP_BUILD_DIR/plugin/nkpd/nkpd' >>'$LAB_DIR/nkpd.log' 2>&1 & echo \$! > /run/nkpd.test.pid"
    nkpd_pid=$(cat "$(lab_path a /run)/nkpd.test.pid")
    for ((i = 0; i < 50; i++)); do
        [ "$(grep -c "following libvirt" "$LAB_DIR/nkpd.log" 2>/dev/null || true)" -gt "${before:-0}" ] && return 0
        sleep 0.2
    done
    fail "nkpd did not connect to libvirt"
}

nkpd_stop() {
    [ -n "$nkpd_pid" ] || return 0
    kill "$nkpd_pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 50; i++)); do kill -0 "$nkpd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$nkpd_pid" 2>/dev/null || true
    nkpd_pid=
}

set_policy() { printf '[tpm]\ntcti=none\n[vtpm]\npolicy=%s\n' "$1" > "$(lab_path a /etc/nkp)/nkp.conf"; }
