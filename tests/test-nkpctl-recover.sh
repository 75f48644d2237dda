#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl and the VM lock / conversion journal (docs/crash-safety.md), against
# libvirt's test driver (test:///default: one running domain "test", no
# keysafe) and a temp root; no daemon, no qemu-img.
#   - the lock held long: vm encrypt refused with one line after ~2 s;
#     held briefly (as the hook or vm status hold it): the command goes on
#   - vm status: an interrupted operation pending / in progress (text, --json)
#   - a rerun reconciles first: rolled back to a plain definition; refused
#     when the definition is neither side (journal and files untouched)
set -u
source "$(dirname "$0")/lib/cli.sh"
NKPCTL=${NKPCTL:?NKPCTL not set}
command -v flock >/dev/null || skip_all "flock(1) is not installed"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/nkp" && printf '[tpm]\ntcti=none\n' > "$root/etc/nkp/nkp.conf"
nk() { "$NKPCTL" --root "$root" --connect test:///default "$@"; }
if ! uuid=$(virsh -q -c test:///default domuuid test 2>/dev/null) || [ -z "$uuid" ]; then
	uuid=6695eb01-f6a4-8304-79aa-97f2502e193f # the test driver's fixed UUID
fi
jdir="$root/var/lib/nkp/journal"

check_diag() { echo "rc=$rc out=$out"; }   # printed after a failed check
run() { out=$("$@" 2>&1); rc=$?; }

# The test domain runs, so a command that gets past the lock and the
# recovery stops at "is running": that line proves it got that far.
run nk vm encrypt test
check "no journal: vm encrypt gets to the running check" '[ $rc = 1 ] && grep -q "is running" <<<"$out"'
check "... and made the VM's lock file (0600, in a 0700 directory)" '[ "$(stat -c %a "$jdir/$uuid.lock")" = 600 ] && [ "$(stat -c %a "$jdir")" = 700 ]'

flock -o "$jdir/$uuid.lock" sleep 6 &
holder=$!
sleep 0.3
t0=$(date +%s%N)
run nk vm encrypt test
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
check "lock held by another process: refused with one line" '[ $rc = 1 ] && [ "$(grep -c . <<<"$out")" = 1 ] && grep -q "being changed by another nkpctl command" <<<"$out"'
check "... after waiting about 2 s ($ms ms)" '[ $ms -ge 1500 ]'
kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null

flock -o "$jdir/$uuid.lock" sleep 0.7 &
holder=$!
sleep 0.2
run nk vm encrypt test
check "lock held briefly: the command waits and goes on" '[ $rc = 1 ] && grep -q "is running" <<<"$out"'
wait "$holder" 2>/dev/null

SALT=aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233
img="$root/images"
mkdir -p "$img"
P="$img/vda.qcow2"
journal() { # OLD NEW PHASE
	printf '[journal]\nversion=1\nop=encrypt\nname=test\nuuid=%s\nphase=%s\nold=%s\nnew=%s\nfiles=%s\nscratch=\ndirs=%s\n' \
		"$uuid" "$3" "$1" "$2" "$P" "$(stat -c %d:%i "$img")" > "$jdir/$uuid.ini"
	chmod 600 "$jdir/$uuid.ini"
}

echo OLD > "$P"; echo NEW > "$P.nkp-new"
journal none "$SALT" converting
run nk vm status test
check "vm status: the interrupted operation is pending" 'grep -q "test: interrupted '"'"'vm encrypt'"'"' pending (phase converting)" <<<"$out"'
run nk --json vm status test
check "vm status --json: pending op, phase, not in progress" 'python3 -c "import json,sys; d=json.load(sys.stdin)[\"pending\"]; assert d==dict(op=\"vm encrypt\", phase=\"converting\", in_progress=False), d" <<<"$out"'
flock -o "$jdir/$uuid.lock" sleep 3 &
holder=$!
sleep 0.3
run nk vm status test
check "vm status while the lock is held: in progress" 'grep -q "test: '"'"'vm encrypt'"'"' in progress" <<<"$out"'
kill "$holder" 2>/dev/null; wait "$holder" 2>/dev/null

journal "$SALT" "${SALT/aa/bb}" ready
run nk vm encrypt test
check "definition of neither side: refused with one line naming the VM and the fix" '[ $rc = 1 ] && [ "$(grep -c . <<<"$out")" = 1 ] && grep -q "VM '"'"'test'"'"' has an interrupted '"'"'nkpctl vm encrypt'"'"'" <<<"$out" && grep -q "virsh define" <<<"$out"'
check "... journal and files untouched" '[ -e "$jdir/$uuid.ini" ] && [ "$(cat "$P")" = OLD ] && [ "$(cat "$P.nkp-new")" = NEW ]'

journal none "$SALT" converting
run nk vm encrypt test
check "rerun on the old (plain) definition: rolled back, then goes on" 'grep -q "rolled back the interrupted '"'"'vm encrypt'"'"'" <<<"$out" && grep -q "is running" <<<"$out"'
check "... the new copy removed, the journal too" '[ "$(cat "$P")" = OLD ] && [ ! -e "$P.nkp-new" ] && [ ! -e "$jdir/$uuid.ini" ]'

echo NEW > "$P"; echo OLD > "$P.nkp-old"
printf '[journal]\nversion=1\nop=decrypt\nname=test\nuuid=%s\nphase=ready\nold=%s\nnew=none\nfiles=%s\nscratch=\ndirs=%s\n' "$uuid" "$SALT" "$P" "$(stat -c %d:%i "$img")" > "$jdir/$uuid.ini"
chmod 600 "$jdir/$uuid.ini"
run nk vm decrypt test
check "rerun of the same op whose new (plain) definition is in place: finished, exit 0" '[ $rc = 0 ] && grep -q "VM '"'"'test'"'"': finished the interrupted vm decrypt." <<<"$out"'
check "... the old copy removed, the journal too" '[ "$(cat "$P")" = NEW ] && [ ! -e "$P.nkp-old" ] && [ ! -e "$jdir/$uuid.ini" ]'

assert_done
