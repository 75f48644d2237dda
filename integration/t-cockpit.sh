#!/bin/bash
# The Cockpit page on a lab host, in a real browser: a real VM (vTPM + qcow2
# disk) in a lab libvirtd, the page in cockpit-ws and headless Chromium
# (tests/lib/cockpit.sh), its nkpctl a wrapper that runs the lab host's
# nkpctl inside the host's namespaces.  Through the page
# (integration/t-cockpit.js): encrypt the shut-off VM with the progress
# shown, the state turning "encrypted by p1"; shallow rekey to p2; deep
# rekey, confirmed, with progress; p1 deleted and the key cache flushed:
# the VM "locked" with its reason, a failed start's vm-locked alarm with
# its fix; p1 restored, "host unlock" from the page: encrypted again, the
# alarm gone; decrypt, confirmed, with progress.  Every state checked with
# nkpctl and qemu-img as well.  Then nkpctl --progress=json itself.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
source "$(dirname "$0")/../tests/lib/cockpit.sh"
lab_test t-cockpit "the Cockpit page: encrypt, rekey, deep rekey, decrypt a lab VM with progress" \
    --built libvirt-hooks/nkp-hook
cockpit_check_env
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }

lab_test_init
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
umask 077
printf 'lab password\n' > "$LAB_DIR/pw"
for p in p1 p2; do
    nk provider create "$p" >/dev/null || fail "provider create $p"
    nk provider backup "$p" --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "backup $p"
done
nk provider set-default p1 >/dev/null || fail "provider set-default p1"
dom=g1
disk="$LAB_DIR/shared/$dom.qcow2"
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$(cat /proc/sys/kernel/random/uuid)" --disk "$disk" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define $dom"
pass "host a: providers p1 (default) and p2 backed up, VM $dom (vTPM + qcow2) defined, plain"

# The page's nkpctl: the lab host's, in its namespaces (as lab_exec runs it).
top="$LAB_DIR/cockpit"
h=$(lab_hostdir a)
mkdir -p "$top/bin"
cat >"$top/lab-a" <<EOF
#!/bin/sh
# t-cockpit.sh: a command inside lab host a (as lab_exec runs it).
exec nsenter --mount='$h/ns/mnt' --uts='$h/ns/uts' --net='$h/ns/net' -- \\
    env PATH='$h/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' "\$@"
EOF
printf '#!/bin/sh\nexec %s nkpctl "$@"\n' "$top/lab-a" >"$top/bin/nkpctl"
chmod 755 "$top/lab-a" "$top/bin/nkpctl"
lab_at_exit cockpit_stop
mkdir -p "$COCKPIT_ARTIFACTS"
rm -f "$COCKPIT_ARTIFACTS"/lab-*.png
cockpit_playwright "$top"
cockpit_ws_start "$top" "$top/bin"
cockpit_chromium_start "$top"
cockpit_drive "$top" "$(dirname "$0")/t-cockpit.js" NKP_LAB_EXEC="$top/lab-a" NKP_VM="$dom" \
    NKP_VM_DISK="$disk" NKP_LAB_P1="$LAB_DIR/p1.p12" NKP_LAB_PW="$LAB_DIR/pw"
cockpit_stop

# nkpctl --progress=json: one JSON line per step on stdout, then the result.
out=$(nk --json vm encrypt "$dom" --progress=json) || fail "vm encrypt --progress=json: $out"
printf '%s\n' "$out" >"$top/progress.out"
python3 - "$dom" "$top/progress.out" <<'PY' || fail "vm encrypt --progress=json output: $out"
import json, sys
dom = sys.argv[1]
text = open(sys.argv[2]).read()
lines = text.splitlines()
steps = [json.loads(l)["progress"] for l in lines if l.startswith('{"progress"')]
rest = "\n".join(l for l in lines if not l.startswith('{"progress"'))
assert [(s["step"], s["done"], s["total"]) for s in steps] == \
    [("vda", 0, 2), ("definition", 1, 2), ("done", 2, 2)], steps
assert all(s["op"] == "encrypt" and s["vm"] == dom for s in steps), steps
result = json.loads(rest)
assert result["provider"] == "p1" and result["disks"] == ["vda"], result
PY
pass "nkpctl vm encrypt --progress=json: a line per step (vda 0/2, definition 1/2, done 2/2), then the result"
# On a terminal (script(1) gives nkpctl one): the bar on stderr, by default.
out=$(lab_exec a script -qec "nkpctl vm decrypt $dom" /dev/null) || fail "vm decrypt on a terminal: $out"
if ! grep -q 'decrypt g1 \[###############...............\] 1/2 definition' <<<"$out" ||
   ! grep -q 'decrypt g1 \[##############################\] 2/2 done' <<<"$out"; then
    fail "vm decrypt on a terminal draws the bar: $out"
fi
pass "on a terminal: the progress bar on stderr ($(tr '\r' '\n' <<<"$out" | grep -c '\[') redraws)"
out=$(nk vm encrypt "$dom" 2>&1) || fail "vm encrypt: $out"
case $out in *'{"progress"'*|*'['*'#'*) fail "progress output without --progress and no terminal: $out";; esac
pass "without --progress and no terminal: no progress output"
lab_test_done
