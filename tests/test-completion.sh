#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl's bash completion (plugin/nkpctl/nkpctl.bash-completion) driven as
# bash does it: bash-completion and the file sourced, COMP_WORDS/COMP_CWORD
# set, _nkpctl called, COMPREPLY checked.  Against a throwaway root with two
# providers (alpha, beta), libvirt's test driver for domain names, and a
# directory with a .p12 file for restore.
set -u
source "$(dirname "$0")/lib/cli.sh"
SRC=${NKP_SOURCE_DIR:?NKP_SOURCE_DIR not set}
NKPCTL=${NKPCTL:?NKPCTL not set}
COMPLETION=${NKP_COMPLETION:-$SRC/plugin/nkpctl/nkpctl.bash-completion}
BC=/usr/share/bash-completion/bash_completion
[ -r "$BC" ] || skip_all "bash-completion is not installed ($BC)"

tmp=$(mktemp -d)
trap '"$NKPCTL" --root "$R" host flush-cache >/dev/null 2>&1; rm -rf "$tmp"' EXIT
R=$(cli_newroot "$tmp")
"$NKPCTL" --root "$R" provider create alpha >/dev/null && "$NKPCTL" --root "$R" provider create beta >/dev/null ||
        fail "cannot create the two providers"
mkdir "$tmp/files" && touch "$tmp/files/alpha.p12" "$tmp/files/notes.txt"
mkdir "$tmp/bin" && ln -s "$NKPCTL" "$tmp/bin/nkpctl"

# complete WORD…: the words of the command line (the last one is being
# completed); prints COMPREPLY one per line, sorted.
complete_words() {
        PATH="$tmp/bin:$PATH" bash --norc --noprofile -c '
                source "$1"; source "$2"; shift 2
                COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
                COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
                _nkpctl nkpctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
                printf "%s\n" "${COMPREPLY[@]}" | sort' bash "$BC" "$COMPLETION" "$@"
}
has() { grep -qx -- "$1" <<<"$out"; }

out=$(complete_words nkpctl "")
check "groups: provider vm host alarms" 'has provider && has vm && has host && has alarms'
out=$(complete_words nkpctl --root "$R" provider "")
check "provider verbs, from nkpctl provider --help" 'has create && has restore && has ca-cert && ! has encrypt'
out=$(complete_words nkpctl vm re)
check "a verb prefix: vm re -> rekey, restore-backup, revert" '[ "$out" = "$(printf "rekey\nrestore-backup\nrevert")" ]'
out=$(complete_words nkpctl vm revert vm1 s1 --d)
check "vm revert: its option --delete-abandoned" '[ "$out" = --delete-abandoned ]'
out=$(complete_words nkpctl --root "$R" provider show "")
check "provider show: the root's provider names" '[ "$out" = "$(printf "alpha\nbeta")" ]'
out=$(complete_words nkpctl provider backup --root "$R" b)
check "provider backup b: beta (--root after the verb)" '[ "$out" = beta ]'
out=$(complete_words nkpctl --root "$R" vm encrypt x --provider "")
check "--provider: provider names" 'has alpha && has beta'
out=$(complete_words nkpctl --root "$R" vm rekey --provider=a)
check "--provider=a: alpha" '[ "$out" = alpha ]'
out=$(complete_words nkpctl --root "$R" provider backup alpha --)
check "options of provider backup, from its --help" 'has --out= && has --password-file= && has --json && has --root='
out=$(complete_words nkpctl --root "$R" vm clone a b --s)
check "vm clone --s: --same-keys, from its --help" '[ "$out" = --same-keys ]'
out=$(complete_words nkpctl --root "$R" provider restore "$tmp/files/")
check "provider restore: .p12 files, not others" 'has "$tmp/files/alpha.p12" && ! has "$tmp/files/notes.txt"'
if command -v virsh >/dev/null; then
        out=$(complete_words nkpctl --connect test:///default vm status "")
        check "vm status: domain names from virsh (test driver: 'test')" '[ "$out" = test ]'
else
        skip "virsh is not installed: no domain names"
fi
out=$(complete_words nkpctl --root "$R" alarms clear "")
check "alarms clear: the kinds of the root's alarms (two never backed up: provider-inactive)" '[ "$out" = provider-inactive ]'
out=$(complete_words nkpctl --root "$R" provider show alpha "")
check "nothing after the verb's one argument" '[ -z "$out" ]'
assert_done
