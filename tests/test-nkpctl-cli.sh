#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# nkpctl's command-line conventions, for every verb: the verbs come from
# `nkpctl --help`, so a new verb is covered without touching this file.
#   --help on nkpctl, each group and each verb: usage on stdout, exit 0;
#   --version; --json (and --root) before or after the verb give the same
#   document; usage errors (unknown group, verb or option, missing or extra
#   argument) exit 2 with one line ending "Try 'nkpctl GROUP VERB --help'.";
#   a refused command exits 1 with one line.
set -u

NKPCTL=${NKPCTL:?set NKPCTL to the built nkpctl}
SRC=${NKP_SOURCE_DIR:-$(dirname "$0")/..}
TOP=$(mktemp -d)
trap 'rm -rf "$TOP"' EXIT
fails=0
n=0

ok()   { n=$((n + 1)); echo "ok $n - $*"; }
fail() { n=$((n + 1)); fails=$((fails + 1)); echo "not ok $n - $*"; }
# check WHAT EXPR: EXPR (shell code, evaluated now) must succeed.
check() { if eval "$2"; then ok "$1"; else fail "$1${err:+ (stderr: $err)}"; fi; }

# nk ARGS…: runs nkpctl, leaves $out, $err, $rc.
nk() {
        out=$("$NKPCTL" "$@" 2>"$TOP/stderr"); rc=$?
        err=$(cat "$TOP/stderr")
}

# usage_error WHAT HELP_OF ARGS…: exit 2, one line on stderr that starts
# with "nkpctl: " and ends with "Try 'nkpctl HELP_OF --help'.", nothing on
# stdout.
usage_error() {
        local what=$1 help_of=$2; shift 2
        nk "$@"
        local lines
        lines=$(printf '%s' "$err" | grep -c '')
        if [ "$rc" -ne 2 ]; then fail "$what: exit $rc, expected 2 ($err)"; return; fi
        if [ "$lines" -ne 1 ]; then fail "$what: $lines lines on stderr: $err"; return; fi
        case "$err" in
        "nkpctl: "*"  Try 'nkpctl ${help_of:+$help_of }--help'.") ;;
        *) fail "$what: stderr does not name the problem and the help: $err"; return;;
        esac
        if [ -n "$out" ]; then fail "$what: printed on stdout: $out"; return; fi
        ok "$what"
}

R=$(mktemp -d "$TOP/root.XXXXXX")
mkdir -p "$R/etc/nkp"
printf '[tpm]\ntcti=none\n' >"$R/etc/nkp/nkp.conf"
G=(--root "$R" --connect test:///default)

# ---- nkpctl --help, --version ---------------------------------------------------
nk --help
check "--help: exit 0, usage on stdout, nothing on stderr" \
        '[ "$rc" -eq 0 ] && [[ $out == "Usage: nkpctl "* ]] && [ -z "$err" ]'
help=$out
check "--help documents the exit codes" 'grep -q "0 done, 1 refused or failed.*2 usage error" <<<"$help"'
nk -h
check "-h is --help" '[ "$rc" -eq 0 ] && [ "$out" = "$help" ]'
version=$(sed -n "s/^ *version *: *'\([^']*\)'.*/\1/p" "$SRC/meson.build" | head -1)
nk --version
check "--version prints 'nkpctl $version', exit 0" '[ "$rc" -eq 0 ] && [ -n "$version" ] && [ "$out" = "nkpctl $version" ]'

# The verbs: the leading lower-case words of each line of the Commands list.
mapfile -t verbs < <(sed -n '/^Commands:$/,/^$/p' <<<"$help" |
        sed -n 's/^  \([a-z][a-z-]*\) \([a-z][a-z-]*\)\( .*\)\{0,1\}$/\1 \2/p')
mapfile -t groups < <(printf '%s\n' "${verbs[@]}" | cut -d' ' -f1 | uniq)
check "--help lists the verbs (${#verbs[@]}) of the groups ${groups[*]}" \
        '[ "${#verbs[@]}" -ge 15 ] && [ "${groups[*]}" = "provider vm host alarms" ]'
for v in "provider create" "vm encrypt" "vm rekey" "host unlock" "alarms clear"; do
        check "  ... among them '$v'" 'printf "%s\n" "${verbs[@]}" | grep -qx "$v"'
done

# ---- GROUP --help ----------------------------------------------------------------------
for grp in "${groups[@]}"; do
        nk "$grp" --help
        missing=$(printf '%s\n' "${verbs[@]}" | grep "^$grp " | while read -r v; do
                grep -q "^  $v\b" <<<"$out" || echo "$v"; done)
        check "$grp --help: exit 0, lists every $grp verb${missing:+ (missing: $missing)}" \
                '[ "$rc" -eq 0 ] && [ -z "$err" ] && [ -z "$missing" ]'
done
nk --help vm
check "--help before the group: the group's help" '[ "$rc" -eq 0 ] && grep -q "^  vm encrypt" <<<"$out"'

# ---- GROUP VERB --help and usage errors, for every verb ---------------------------------
for v in "${verbs[@]}"; do
        read -r grp verb <<<"$v"
        # The usage column: "GROUP VERB PARAMS", then the summary after 2+ spaces.
        left=$(grep -E "^  $grp $verb( |\$)" <<<"$help" | head -1 | awk -F'  +' '{print $2}')
        params=${left#"$grp $verb"}
        params=${params# }
        nk "$grp" "$verb" --help
        usage=$(grep -F "nkpctl $grp $verb [OPTION" <<<"$out" | sed 's/ *$//')
        check "$grp $verb --help: exit 0, its usage and the global options on stdout" \
                '[ "$rc" -eq 0 ] && [ -z "$err" ] && [[ $usage == *"]${params:+ $params}" ]] &&
                 grep -q -- "--json" <<<"$out" && grep -q -- "--root" <<<"$out"'
        usage_error "$grp $verb: unknown option" "$grp $verb" "${G[@]}" "$grp" "$verb" --no-such-option
        if [ -n "$params" ]; then
                usage_error "$grp $verb: missing argument ($params)" "$grp $verb" "${G[@]}" "$grp" "$verb"
        fi
        extra=(a b c d)
        # a verb that takes a list (PARAM…) takes up to 32: one more is the error
        [[ $params == *"…"* ]] && extra=($(seq 0 32))
        usage_error "$grp $verb: extra arguments" "$grp $verb" "${G[@]}" "$grp" "$verb" "${extra[@]}"
done
nk --help provider create
check "--help before the verb: the verb's help" '[ "$rc" -eq 0 ] && grep -q "nkpctl provider create" <<<"$out"'
nk provider show -h
check "-h after the verb" '[ "$rc" -eq 0 ] && grep -q "nkpctl provider show \[OPTION.*\] NAME" <<<"$out"'

# ---- other usage errors ---------------------------------------------------------------
usage_error "no command" "" "${G[@]}"
usage_error "unknown group" "" "${G[@]}" frobnicate
usage_error "unknown option before the group" "" --no-such-option provider list
usage_error "--root without its value" "" --root
for grp in "${groups[@]}"; do
        usage_error "$grp: unknown verb" "$grp" "${G[@]}" "$grp" frobnicate
        check "  ... naming it" 'grep -q "unknown $grp command .frobnicate." <<<"$err"'
done
usage_error "provider without a verb" provider "${G[@]}" provider
usage_error "a verb's option before the verb" provider "${G[@]}" provider --force delete x
usage_error "provider show: missing argument" "provider show" "${G[@]}" provider show
check "  ... says what it takes" 'grep -q ".provider show. takes exactly one NAME" <<<"$err"'
usage_error "provider backup without --out" "provider backup" "${G[@]}" provider backup p
usage_error "--out without its value" "provider backup" "${G[@]}" provider backup p --out
usage_error "vm rekey: DOMAIN and --all" "vm rekey" "${G[@]}" vm rekey test --all
usage_error "vm rekey: --all --deep" "vm rekey" "${G[@]}" vm rekey --all --deep
usage_error "vm rekey: neither DOMAIN nor --all" "vm rekey" "${G[@]}" vm rekey
usage_error "alarms clear: no KIND" "alarms clear" "${G[@]}" alarms clear
usage_error "vm encrypt: --progress of an unknown kind" "vm encrypt" "${G[@]}" vm encrypt test --progress=bogus
check "  ... naming the kinds" 'grep -q "progress is json, bar or none" <<<"$err"'

# ---- refused: exit 1, one line --------------------------------------------------------
refused() {
        local what=$1; shift
        nk "$@"
        check "$what: exit 1, one line" \
                '[ "$rc" -eq 1 ] && [ "$(printf "%s" "$err" | grep -c "")" -eq 1 ] && [[ $err == nkpctl:* ]]'
}
refused "provider show of a missing provider" "${G[@]}" provider show nope
refused "vm status of a missing domain" "${G[@]}" vm status nosuch
refused "vm rekey of a plain VM" "${G[@]}" vm rekey test
# A domain named like an option goes after "--": it is the argument, not a
# usage error (libvirt then says there is no such domain).
for verb in encrypt decrypt status; do
        refused "vm $verb -- -x: '-x' is the DOMAIN" "${G[@]}" vm "$verb" -- -x
        check "  ... and is looked up" 'grep -q "domain .-x." <<<"$err"'
done

# ---- --json (and --root) before or after the verb ---------------------------------------
"$NKPCTL" --root "$R" provider create one >/dev/null 2>&1
"$NKPCTL" --root "$R" provider create two >/dev/null 2>&1
same_json() {
        local what=$1 before after
        shift
        read -r -a first <<<"$1"
        read -r -a second <<<"$2"
        before=$("$NKPCTL" "${first[@]}" 2>&1)
        after=$("$NKPCTL" "${second[@]}" 2>&1)
        err=
        check "$what: the same JSON document before and after the verb" \
                'python3 -c "import json,sys; a=json.loads(sys.argv[1]); assert a == json.loads(sys.argv[2]) and a is not None" "$before" "$after"'
}
same_json "provider list" "--root $R --json provider list" "provider list --root $R --json"
same_json "provider show" "--json --root $R provider show one" "--root $R provider show --json one"
same_json "alarms" "--root $R --json alarms" "--root $R alarms --json"
same_json "alarms list" "--json --root $R alarms list" "alarms list --root=$R --json"
same_json "host status" "--root $R --json host status" "--root $R host status --json"
same_json "alarms clear" "--root $R --json alarms clear vm-locked web01" "--root $R alarms clear vm-locked web01 --json"
same_json "vm list" "--root $R --connect test:///default --json vm list" "vm list --json --connect=test:///default --root $R"
same_json "vm status" "--json --root $R --connect test:///default vm status test" "--root $R vm status test --connect test:///default --json"
nk --root "$R" provider list --json
check "provider list --json names both providers" \
        'python3 -c "import json,sys; assert [p[\"name\"] for p in json.loads(sys.argv[1])] == [\"one\", \"two\"]" "$out"'
# nkpctl holds KDKs: like the hook and nkpd it makes itself non-dumpable
# and turns core dumps off first thing (seen by strace, where there is one).
if command -v strace >/dev/null; then
        trace=$(strace -qq -e trace=prctl,setrlimit,prlimit64 "$NKPCTL" --root "$R" provider list 2>&1 >/dev/null)
        err=$trace
        check "nkpctl: PR_SET_DUMPABLE 0 at start" 'grep -Eq "prctl\\(PR_SET_DUMPABLE, (0|SUID_DUMP_DISABLE)\\)" <<<"$trace"'
        check "nkpctl: RLIMIT_CORE 0 at start" 'grep -Eq "(setrlimit|prlimit64)\(.*RLIMIT_CORE, \{rlim_cur=0, rlim_max=0\}" <<<"$trace"'
        err=
else
        ok "# SKIP strace is not installed: dumpable/core checks"
fi
"$NKPCTL" --root "$R" host flush-cache >/dev/null 2>&1

echo "1..$n"
[ "$fails" -eq 0 ]
