#!/bin/bash
# nkp through the whole libvirt lifecycle on one lab host, with a real guest:
#   provider create + backup, vm encrypt (vTPM + LUKS qcow2), start → the
#   guest writes its TPM NV and disk markers, stop, start → read back; no
#   marker, DEK or KDK in the vTPM state or the qcow2, no nkp secret in
#   /etc/libvirt/secrets; "host reboot" (libvirtd down, key cache flushed,
#   up) → unattended start; provider deleted before the reboot → virsh start
#   fails with nkp's one line, vm-locked alarm, data intact; restore +
#   host unlock → starts, markers intact; libvirtd restart while the VM runs
#   → it keeps running, stops and starts; hook wall time; concurrent starts.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-lifecycle "encrypt, start/stop, reboot, locked, restore+unlock, libvirtd restart, concurrent starts" \
    --built libvirt-hooks/nkp-hook
BUILD=$NKP_BUILD_DIR

nk() { lab_exec a nkpctl "$@"; }
ms_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%d", (b-a)*1000}'; }
state_of() { lab_domstate a "$1"; }
sums() { sha256sum "$disk" "$state/tpm2-00.permall" | awk '{print $1}'; }

t0=$(lab_now)
lab_test_init
lab_host_up a || fail "host a did not come up"
lab_install_nkp a "$BUILD"
lab_exec a test -x /etc/libvirt/hooks/qemu.d/nkp || fail "hook not installed"
pass "host a up with nkp installed ($(lab_since "$t0") s)"

# ---- provider -------------------------------------------------------------------
umask 077
printf 'lab password for p1\n' > "$LAB_DIR/pw"
nk provider create p1 >/dev/null || fail "provider create"
if ! out=$(nk provider backup p1 --out "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" 2>&1); then
    case $out in
    *"not implemented"*) skip_all "provider backup has not landed yet ($out)";;
    *) fail "provider backup: $out";;
    esac
fi
nk provider set-default p1 >/dev/null || fail "provider set-default"
pass "provider p1 created, backed up, default"

# ---- a guest, encrypted before its first start -----------------------------------
dom=g1
mark="NKPLIFE$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
disk="$LAB_DIR/shared/$dom.qcow2"
uuid=$(cat /proc/sys/kernel/random/uuid)
qemu-img create -q -f qcow2 "$disk" 64M || fail "qemu-img create"
lab_guest_xml --name "$dom" --uuid "$uuid" --disk "$disk" --marker "$mark" > "$LAB_DIR/$dom.xml"
lab_virsh a define "$LAB_DIR/$dom.xml" >/dev/null || fail "define"
t=$(lab_now)
out=$(nk vm encrypt "$dom" 2>&1) || fail "vm encrypt: $out"
timing "vm encrypt (vTPM + 64 MiB qcow2) $(lab_since "$t") s"
qemu-img info "$disk" | grep_q 'encrypted: yes' || fail "the qcow2 is not encrypted after vm encrypt"
[ ! -e "$disk.nkp-old" ] && [ ! -e "$disk.nkp-new" ] || fail "vm encrypt left temp files"
xml=$(lab_virsh a dumpxml --inactive "$dom")
grep -q 'https://nkp.invalid/xmlns/keysafe/1' <<<"$xml" || fail "no keysafe in the metadata"
grep -q "<encryption secret=" <<<"$xml" || fail "vTPM backend has no <encryption secret>"
grep -q "<encryption format='luks'" <<<"$xml" || fail "disk has no LUKS <encryption>"
st=$(nk --json vm status "$dom") || fail "vm status"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="p1", d' <<<"$st" \
    || fail "vm status: $st"
lst=$(nk --json vm list) || fail "vm list"
python3 -c 'import json,sys; d={v["name"]: v for v in json.load(sys.stdin)}; assert d["g1"]["state"]=="encrypted", d' <<<"$lst" \
    || fail "vm list: $lst"
use=$(nk --json provider usage p1) || fail "provider usage"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["vms"]==["g1"], d' <<<"$use" || fail "provider usage: $use"
out=$(nk vm encrypt "$dom" 2>&1) && fail "a second vm encrypt succeeded"
grep -q "already encrypted" <<<"$out" || fail "second vm encrypt: $out"
pass "vm encrypt: keysafe in metadata, vTPM <encryption>, LUKS qcow2; status/list: encrypted by p1; provider usage: g1"

# ---- first boot: markers written ------------------------------------------------
serial=$(lab_serial_path a "$dom")
boot_and_write a "$dom" "$mark"
secrets=$(lab_virsh a secret-list)
n_sec=$(grep -c . <<<"$secrets" || true)
[ "$n_sec" -ge 2 ] || fail "expected the VM's 2 secrets while it runs, got: $secrets"
for s in $(awk '{print $1}' <<<"$secrets"); do
    lab_virsh a secret-get-value "$s" >/dev/null 2>&1 && fail "secret $s value is readable (not private)"
done
[ -z "$(ls -A "$(lab_path a /etc/libvirt/secrets)" 2>/dev/null)" ] || fail "files in /etc/libvirt/secrets: $(ls "$(lab_path a /etc/libvirt/secrets)")"
pass "first boot wrote the markers; 2 ephemeral private secrets while running, nothing in /etc/libvirt/secrets"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy"
lab_wait_domstate a "$dom" "shut off" 30 || fail "not shut off"
sleep 0.5
[ -z "$(lab_virsh a secret-list)" ] || fail "secrets left after the VM stopped: $(lab_virsh a secret-list)"
pass "release removed the VM's secrets"

boot_and_read a "$dom" "$mark"
pass "second boot read both markers back"

# ---- nothing in clear ----------------------------------------------------------------
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")
[ -s "$state/tpm2-00.permall" ] || fail "no vTPM state under $state"
keyfile="$LAB_DIR/keys.txt"
lab_virsh a dumpxml --inactive "$dom" | lab_exec a "$BUILD/tests/test-domain" --dump-keys / > "$keyfile" \
    || fail "cannot read the keys back for the check"
[ "$(grep -c '^dek:' "$keyfile")" = 2 ] || fail "expected 2 DEKs, got $(grep -c '^dek:' "$keyfile")"
python3 - "$mark" "$keyfile" "$disk" "$state"/* <<'PY' || fail "a marker or key is in clear in the state or the qcow2"
import sys, base64
mark = sys.argv[1].encode()
needles = {"marker": mark}
for line in open(sys.argv[2]):
    name, hexv = line.split()
    raw = bytes.fromhex(hexv)
    needles[name + " (raw)"] = raw
    needles[name + " (hex)"] = hexv.encode()
    needles[name + " (base64)"] = base64.b64encode(raw)
bad = 0
for f in sys.argv[3:]:
    data = open(f, "rb").read()
    for what, n in needles.items():
        if n and n in data:
            print("found %s in %s" % (what, f))
            bad = 1
sys.exit(bad)
PY
rm -f "$keyfile"
sz=$(stat -c %s "$state/tpm2-00.permall"); gz=$(gzip -c "$state/tpm2-00.permall" | wc -c)
[ "$gz" -ge $((sz * 95 / 100)) ] || fail "vTPM state compresses ($gz/$sz): not encrypted?"
pass "no marker, DEK or KDK (raw, hex, base64) in the vTPM state or the qcow2; state incompressible"

# ---- hook wall time (prepare on a stopped VM defines the secrets; release removes them)
hookxml="$LAB_DIR/$dom.hook.xml"
lab_virsh a dumpxml --inactive "$dom" > "$hookxml"
times=()
for i in $(seq 1 20); do
    t=$(lab_now)
    lab_exec a /etc/libvirt/hooks/qemu.d/nkp "$dom" prepare begin - < "$hookxml" || fail "hook prepare by hand"
    times+=("$(ms_since "$t")")
    lab_exec a /etc/libvirt/hooks/qemu.d/nkp "$dom" release end - < "$hookxml" || fail "hook release by hand"
done
read -r med p95 < <(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)], a[int(NR*0.95+0.999)]}')
timing "hook prepare wall time (20 runs, via nsenter): median ${med} ms, p95 ${p95} ms"
phases=$(lab_exec a env NKP_HOOK_TIMING=1 /etc/libvirt/hooks/qemu.d/nkp "$dom" prepare begin - < "$hookxml" 2>&1 >/dev/null) \
    || fail "hook prepare with timing: $phases"
lab_exec a /etc/libvirt/hooks/qemu.d/nkp "$dom" release end - < "$hookxml" || fail "hook release by hand"
timing "hook phases (since exec): ${phases#nkp: timing }"
[ -z "$(lab_virsh a secret-list)" ] || fail "secrets left after hook release"

# ---- host "reboot" with the provider present: unattended start ---------------------
lab_host_stop a
nk host flush-cache >/dev/null || fail "host flush-cache"
lab_host_start a || fail "host a did not come back"
boot_and_read a "$dom" "$mark"
pass "after a reboot (daemons down, key cache flushed) the VM starts unattended"

# ---- provider deleted before the reboot: locked -----------------------------------------
before=$(sums)
out=$(nk provider delete p1 2>&1) && fail "deleting a provider in use succeeded without --force"
nk provider delete p1 --force >/dev/null 2>&1 || fail "provider delete --force"
lab_host_stop a
nk host flush-cache >/dev/null || fail "host flush-cache"
lab_host_start a || fail "host a did not come back"
t=$(lab_now)
if err=$(lab_virsh a start "$dom" 2>&1); then fail "a locked VM started"; fi
timing "locked start refused in $(lab_since "$t") s"
echo "# virsh: $err"
grep -q "nkp: VM '$dom' is locked: its key provider 'p1'" <<<"$err" || fail "start error lacks nkp's line: $err"
grep -q "nkpctl provider restore" <<<"$err" && grep -q "nkpctl host unlock" <<<"$err" || fail "start error lacks the fix: $err"
[ "$(state_of "$dom")" = "shut off" ] || fail "locked VM is not shut off"
nk alarms | grep_q "vm-locked" || fail "no vm-locked alarm: $(nk alarms 2>&1)"
st=$(nk --json vm status "$dom") || true
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="locked", d' <<<"$st" || fail "vm status: $st"
[ "$(sums)" = "$before" ] || fail "the locked start changed the disk or the vTPM state"
[ -z "$(lab_virsh a secret-list)" ] || fail "secrets defined for a locked VM"
pass "provider gone after a reboot: start refused with nkp's line and the fix, vm-locked alarm, data intact"

# ---- restore + unlock ---------------------------------------------------------------------
nk provider restore "$LAB_DIR/p1.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider restore"
out=$(nk host unlock 2>&1) || fail "host unlock: $out"
grep -q "$dom: unlocked" <<<"$out" || fail "host unlock did not report $dom: $out"
nk alarms 2>/dev/null | grep_q "vm-locked" && fail "vm-locked alarm still there after unlock"
boot_and_read a "$dom" "$mark"
pass "restore + host unlock: the VM starts, markers intact"

# ---- libvirtd restart while the VM runs -----------------------------------------------------
rm -f "$serial"
lab_virsh a start "$dom" >/dev/null || fail "start before the libvirtd restart"
lab_wait_serial a "$dom" 'NKP-TICK 2$' 240 >/dev/null || fail "guest does not tick"
lab_restart_libvirtd a
sleep 1
[ "$(state_of "$dom")" = "running" ] || fail "VM not running after the libvirtd restart ($(state_of "$dom"))"
n=$(grep -a -c 'NKP-TICK' "$serial")
lab_wait_serial a "$dom" "NKP-TICK $((n + 2))\$" 60 >/dev/null || fail "guest stopped ticking after the libvirtd restart"
[ "$(lab_virsh a secret-list | grep -c .)" -ge 2 ] || fail "reconnect did not define the secrets again"
lab_virsh a destroy "$dom" >/dev/null || fail "destroy after the restart"
boot_and_read a "$dom" "$mark"
pass "libvirtd restart while running: the VM kept running (reconnect re-defined its secrets), stops and starts"

# ---- concurrent starts (paused: the hook path without guest CPU load) ------------------------
N=${NKP_LAB_CONCURRENT:-8}
for i in $(seq 1 "$N"); do
    d=c$i
    qemu-img create -q -f qcow2 "$LAB_DIR/shared/$d.qcow2" 16M
    lab_guest_xml --name "$d" --disk "$LAB_DIR/shared/$d.qcow2" --mem 64 > "$LAB_DIR/$d.xml"
    lab_virsh a define "$LAB_DIR/$d.xml" >/dev/null || fail "define $d"
    out=$(nk vm encrypt "$d" --provider p1 2>&1) || fail "vm encrypt $d: $out"
done
t=$(lab_now)
pids=()
for i in $(seq 1 "$N"); do
    lab_virsh a start --paused "c$i" > "$LAB_DIR/c$i.out" 2>&1 &
    pids+=($!)
done
bad=0
for p in "${pids[@]}"; do wait "$p" || bad=$((bad + 1)); done
timing "$N concurrent starts (encrypted vTPM + disk, paused) all returned in $(lab_since "$t") s, $bad failed"
[ $bad = 0 ] || fail "$bad of $N concurrent starts failed: $(cat "$LAB_DIR"/c*.out | head -n 5)"
for i in $(seq 1 "$N"); do
    [ "$(state_of "c$i")" = "paused" ] || fail "c$i is $(state_of "c$i")"
    lab_virsh a destroy "c$i" >/dev/null
done
pass "$N concurrent starts of encrypted VMs all succeeded"

# ---- vm decrypt round trip ---------------------------------------------------------------------
out=$(nk vm decrypt "$dom" 2>&1) || fail "vm decrypt: $out"
nk vm status "$dom" | grep_q ": plain" || fail "vm status after decrypt: $(nk vm status "$dom" 2>&1)"
qemu-img info "$disk" | grep_q 'encrypted: yes' && fail "qcow2 still encrypted after vm decrypt"
lab_virsh a dumpxml --inactive "$dom" | grep_q 'nkp.invalid' && fail "keysafe left after vm decrypt"
boot_and_read a "$dom" "$mark"
pass "vm decrypt: plain qcow2 and clear vTPM state, the VM starts with its markers"
out=$(nk vm encrypt "$dom" --provider p1 2>&1) || fail "vm encrypt of a vTPM with clear state: $out"
boot_and_read a "$dom" "$mark"
state_sz=$(stat -c %s "$state/tpm2-00.permall"); state_gz=$(gzip -c "$state/tpm2-00.permall" | wc -c)
[ "$state_gz" -ge $((state_sz * 95 / 100)) ] || fail "re-encrypted vTPM state compresses"
pass "vm encrypt converts existing clear vTPM state; markers intact"

lab_test_done
