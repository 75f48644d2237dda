#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The qemu hook and an interrupted `nkpctl vm encrypt/decrypt/rekey --deep`
# (journal.c, docs/crash-safety.md), without libvirtd: a plain domain XML
# (no keysafe, no vTPM) never reaches libvirt.  NKP_ROOT = a temp root.
#   lock held              -> start refused with one line, files untouched
#   journal, lock free     -> files reconciled to the XML on stdin, start goes on
#   definition of neither  -> start refused with one line, files untouched
set -u
source "$(dirname "$0")/lib/cli.sh"
HOOK=${NKP_HOOK:?NKP_HOOK not set}
command -v flock >/dev/null || skip_all "flock(1) is not installed"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
export NKP_ROOT=$root
mkdir -p "$root/etc/nkp" && printf '[vtpm]\npolicy=off\n' > "$root/etc/nkp/nkp.conf"
export NKP_LIBVIRT_URI="qemu+unix:///system?socket=$root/no-such-socket"
export NKP_HOOK_TIMEOUT=10

check_diag() { echo "rc=$rc err=$err"; }   # printed after a failed check

uuid=0c1d2e3f-4a5b-4c6d-8e7f-8091a2b3c4d5
xml="<domain type='qemu'><name>vm1</name><uuid>$uuid</uuid><memory>65536</memory><os><type>hvm</type></os><devices/></domain>"
jdir="$root/var/lib/nkp/journal"
img="$root/images"
mkdir -p "$jdir" "$img" && chmod 700 "$root/var/lib/nkp" "$jdir"
P="$img/vda.qcow2"

# journal OLD NEW PHASE [FILE [DIRS]]: an interrupted encrypt of FILE (P), plus
# a scratch dir; DIRS the directories recorded when it began (P's)
journal() {
	mkdir -p "$img/.nkp-work" && echo blob > "$img/.nkp-work/blob"
	printf '[journal]\nversion=1\nop=encrypt\nname=vm1\nuuid=%s\nphase=%s\nold=%s\nnew=%s\nfiles=%s\nscratch=%s\ndirs=%s\n' \
		"$uuid" "$3" "$1" "$2" "${4:-$P}" "$img/.nkp-work" "${5-$(stat -c %d:%i "$img")}" > "$jdir/$uuid.ini"
	chmod 600 "$jdir/$uuid.ini"
	: > "$jdir/$uuid.lock"
}
files() { for f in "$P" "$P.nkp-new" "$P.nkp-old"; do [ -e "$f" ] && printf '%s=%s ' "${f##*/}" "$(cat "$f")"; done; echo; }
run() {
	local e; e=$(mktemp)
	"$HOOK" vm1 prepare begin - <<<"$xml" >/dev/null 2>"$e"
	rc=$?
	err=$(cat "$e"); rm -f "$e"
}
SALT=aa11bb22cc33dd44ee55ff6600112233445566778899aabbccddeeff00112233

# 1. swapped, not yet defined (definition = old = plain): rolled back
echo NEW > "$P"; echo OLD > "$P.nkp-old"
journal none "$SALT" ready
run
check "crash after the swap, plain definition: start goes on" '[ $rc = 0 ] && [ -z "$err" ]'
check "... the original is back, no copy left" '[ "$(files)" = "vda.qcow2=OLD " ]'
check "... journal and scratch removed" '[ ! -e "$jdir/$uuid.ini" ] && [ ! -e "$img/.nkp-work" ]'

# 2. mid-swap, journal new side = plain (an interrupted decrypt, now defined plain): forward
echo NEW > "$P.nkp-new"; echo OLD > "$P.nkp-old"; rm -f "$P"
journal "$SALT" none ready
run
check "crash mid-swap, definition already the new one: start goes on" '[ $rc = 0 ]'
check "... the new copy is in place" '[ "$(files)" = "vda.qcow2=NEW " ] && [ ! -e "$jdir/$uuid.ini" ]'

# 3. the command still runs (lock held): refused, nothing touched
echo OLD > "$P"; echo NEW > "$P.nkp-new"
journal none "$SALT" converting
before=$(files)
exec 9>"$jdir/$uuid.lock"
flock -n 9
run
check "lock held: start refused, exit 1" '[ $rc = 1 ]'
check "... with one line naming the VM and the wait" '[ "$(grep -c . <<<"$err")" = 1 ] && grep -q "VM '"'"'vm1'"'"' cannot start now: it is being re-encrypted by nkpctl (encrypt, converting); wait" <<<"$err"'
check "... files and journal untouched" '[ "$(files)" = "$before" ] && [ -e "$jdir/$uuid.ini" ]'
exec 9>&-

# 4. the definition is neither side: refused, nothing touched
journal "$SALT" "${SALT/aa/bb}" ready
before=$(files)
run
check "definition of neither side: start refused with one line" '[ $rc = 1 ] && [ "$(grep -c . <<<"$err")" = 1 ] && grep -q "neither the one from before nor the one from after" <<<"$err"'
check "... files and journal untouched" '[ "$(files)" = "$before" ] && [ -e "$jdir/$uuid.ini" ]'

# 5. a lock file but no journal (a finished command): nothing happens
rm -f "$jdir/$uuid.ini" "$P.nkp-new"
run
check "lock file, no journal: start goes on" '[ $rc = 0 ] && [ "$(files)" = "vda.qcow2=OLD " ]'

# 6. a journal naming a file outside the directories it recorded (crafted or
#    damaged: here /etc-like), or recording none (older nkp): refused with one
#    line, nothing renamed or removed anywhere
etc="$root/etc-like"
mkdir -p "$etc" && echo SECRET > "$etc/shadow" && echo PLANTED > "$etc/shadow.nkp-old"
echo OLD > "$P"
for row in "$etc/shadow|" "$P|none" ; do
	file=${row%%|*}; dirs=${row#*|}
	if [ "$dirs" = none ]; then journal none "$SALT" ready "$file" ""; else journal none "$SALT" ready "$file"; fi
	before=$(tree_sum "$root")
	run
	check "journal naming $file, dirs '${dirs:-P\'s}': start refused with one line" '[ $rc = 1 ] && [ "$(grep -c . <<<"$err")" = 1 ] && grep -q "outside the directories" <<<"$err"'
	check "... nothing on disk changed" '[ "$(tree_sum "$root")" = "$before" ]'
done

assert_done
