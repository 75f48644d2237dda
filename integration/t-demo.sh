#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The Quickstart works: runs integration/demo.sh (the whole VM demo in a lab
# host) and checks its exit status, the lines that prove each step did what
# it says, and that it left nothing behind (its lab directory and every
# process that mentions it are gone).
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/../tests/lib/assert.sh"
BUILD=${NKP_BUILD_DIR:?NKP_BUILD_DIR not set}
log=$(mktemp /var/tmp/nkp-t-demo.XXXXXX.log)
trap 'rm -f "$log"' EXIT
ASSERT_ON_FAIL+=('echo "----- demo output (tail)"; tail -n 60 "$log"')
note "t-demo: the Quickstart, integration/demo.sh end to end"

start=$(date +%s)
rc=0
"$here/demo.sh" "$BUILD" > "$log" 2>&1 || rc=$?
secs=$(($(date +%s) - start))
if [ $rc = 77 ]; then
    skip_all "$(grep -m1 '^demo: cannot run' "$log" || tail -n1 "$log")"
fi
[ $rc = 0 ] || fail "demo.sh exited $rc: $(grep -m1 '^demo: FAILED' "$log" || true)"
pass "demo.sh exited 0 in $secs s"

out=$(tr -d '\r' < "$log")
mark=$(sed -n 's/^vm1 serial console: NKP-MARKERS-WRITTEN tpm=\([A-Za-z0-9]*\) disk=.*/\1/p' <<<"$out" | head -n1)
[ -n "$mark" ] || fail "no 'NKP-MARKERS-WRITTEN' line from the guest's first boot"
grep -qx "vm1 serial console: NKP-MARKERS-WRITTEN tpm=$mark disk=$mark" <<<"$out" || fail "first boot did not write both markers"
n_tpm=$(grep -cx "vm1 serial console: NKP-TPM-MARKER=$mark" <<<"$out" || true)
n_disk=$(grep -cx "vm1 serial console: NKP-DISK-MARKER=$mark" <<<"$out" || true)
[ "$n_tpm" = 2 ] && [ "$n_disk" = 2 ] || fail "markers read back $n_tpm (vTPM) and $n_disk (disk) times, want 2 each (stop/start, after the restore)"
pass "first boot wrote both markers ($mark), read back intact after stop/start and after the restore"

need() { grep -Eq -- "$1" <<<"$out" || fail "no line matching /$1/ ($2)"; }
need '^demo-host# nkpctl provider backup prod --out [^ ]+\.p12 --password-file [^ ]+$' "backup with a password file"
need '^Wrote the backup of provider .prod.' "backup written"
need '^vm1: encrypted by prod \(' "vm status after vm encrypt"
need '^encrypted: yes' "the qcow2 is LUKS"
need "^error: Hook script execution failed: .*nkp: VM 'vm1' is locked: its key provider 'prod' " "virsh start refused with nkp's line"
need '^vm-locked +vm1 ' "the vm-locked alarm"
need '^vm1: locked: ' "vm status says locked"
need '^Restored provider .prod.' "provider restore"
need '^vm1: unlocked' "host unlock"
need ':0$' "grep counts in the qcow2 and vTPM state"
grep -Eq -- "^/[^ ]*/vm1\.qcow2:0$" <<<"$out" || fail "the qcow2 grep line is missing"
grep -Eq -- "/tpm2-00\.permall:0$" <<<"$out" || fail "the vTPM state grep line is missing"
grep -Eq -- "^[0-9]+ keys \(.*kdk\) looked for .*: none found$" <<<"$out" || fail "no key check, or a key was found in clear"
need '^== demo finished: all [0-9]+ steps did what they say' "the final line"
pass "locked start with nkp's line, vm-locked alarm, vm status locked, restore + unlock, nothing in clear"

labdir=$(sed -n 's/^   (lab directory \([^;]*\);.*/\1/p' <<<"$out" | head -n1)
[ -n "$labdir" ] || fail "the demo did not print its lab directory"
[ ! -e "$labdir" ] || fail "the demo left its lab directory $labdir"
left=$(pgrep -af -- "$labdir" | grep -v -e pgrep || true)
[ -z "$left" ] || fail "processes of the demo's lab still run: $left"
pass "nothing left behind ($labdir and its processes gone)"
timing "demo $secs s"
assert_done
