#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The man pages and README's admin guide do not drift from the code: every
# nkpctl verb (from nkpctl's own --help, i.e. its command table) appears in
# nkpctl(8) and in the admin guide, and every nkp.conf key (context.c's
# config_keys) appears in nkp.conf(5) under its section and in the admin
# guide.  Each missing one is printed on its own line saying what to add
# where, e.g.
#   MISSING docs/man/nkpctl.8.scd: verb 'vm backup' (add "*vm backup* ..." under "## vm")
set -u
source "$(dirname "$0")/lib/cli.sh"
SRC=${NKP_SOURCE_DIR:?NKP_SOURCE_DIR not set}
NKPCTL=${NKPCTL:?NKPCTL not set}
MAN=$SRC/docs/man
README=$SRC/README.md

# README's admin guide: from "## Admin guide" to the next level-2 heading.
guide=$(awk '/^## Admin guide/ { on = 1; next } on && /^## / { exit } on' "$README")
check "README has an admin guide" '[ -n "$guide" ]'

# ---- nkpctl verbs -------------------------------------------------------------
groups=$("$NKPCTL" --help | awk '/^Commands:/ { on = 1; next } /^$/ { on = 0 }
        on && $1 ~ /^[a-z]/ && !seen[$1]++ { print $1 }')
check "nkpctl --help lists groups" '[ -n "$groups" ]'
verbs=()
for g in $groups; do
        while read -r v; do verbs+=("$g $v"); done < <("$NKPCTL" "$g" --help | awk -v g="$g" '$1 == g && $2 ~ /^[a-z]/ { print $2 }')
done
note "${#verbs[@]} verbs: ${verbs[*]}"
check "every group lists its verbs" '[ "${#verbs[@]}" -ge 10 ]'

missing=()
for gv in "${verbs[@]}"; do
        g=${gv% *} v=${gv#* }
        # nkpctl(8): the verb as a term, "*GROUP VERB*..." under "## GROUP".
        grep -Eq "^\*$g $v\*" "$MAN/nkpctl.8.scd" ||
                missing+=("MISSING docs/man/nkpctl.8.scd: verb '$gv' (add a term \"*$gv* ARGS\" and a tab-indented description under \"## $g:\" in COMMANDS, and its document under JSON OUTPUT)")
        # README: "nkpctl GROUP VERB" somewhere in the admin guide.
        grep -Eq "(^|[^a-z-])$g $v([^a-z-]|$)" <<<"$guide" ||
                missing+=("MISSING README.md (## Admin guide): verb '$gv' (add an example line \"nkpctl $gv ...\" to the admin guide's subsection on $g)")
done

# ---- nkp.conf keys ----------------------------------------------------------------
keys=$(sed -n '/^} config_keys\[\] = {/,/^};/p' "$SRC/plugin/lib/context.c" |
        sed -n 's/^ *{ "\([a-z_]*\)", { \(.*\)NULL } },.*/\1 \2/p' | tr -d '",' |
        awk '{ for (i = 2; i <= NF; i++) print $1, $i }')
check "context.c's config_keys parsed" '[ "$(wc -l <<<"$keys")" -ge 5 ]'
note "nkp.conf keys: $(tr '\n' ',' <<<"$keys")"
while read -r sec key; do
        # nkp.conf(5): "*key* =" after the "## [sec]" heading, before the next heading.
        awk -v s="## [$sec]" '$0 == s { on = 1; next } on && /^#/ { exit } on' "$MAN/nkp.conf.5.scd" |
                grep -q "^\*$key\* =" ||
                missing+=("MISSING docs/man/nkp.conf.5.scd: key [$sec] $key (add \"*$key* = VALUES\" with its default and what a wrong value gets under \"## [$sec]\" in SETTINGS)")
        # README: the key in a config example ("key = " or "#key = ") after a [sec] line.
        awk -v s="[$sec]" 'index($0, s) { on = 1 } on' <<<"$guide" | grep -Eq "^#? ?$key ?=" ||
                missing+=("MISSING README.md (## Admin guide): key [$sec] $key (add \"#$key = DEFAULT\" with a comment line to a config example under a \"[$sec]\" line)")
done <<<"$keys"

# ---- every page has a source and renders ----------------------------------------------
for p in nkpctl.8 nkpd.8 nkp-hook.8 nkp.conf.5 nkp-swtpm-certs.8; do
        check "docs/man/$p.scd renders with scdoc" 'scdoc <"$MAN/$p.scd" >/dev/null'
done

for m in "${missing[@]}"; do echo "$m"; done
check "every verb and key is in the man pages and the admin guide (${#missing[@]} missing)" '[ "${#missing[@]}" = 0 ]'
assert_done
