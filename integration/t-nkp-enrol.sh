#!/bin/bash
# Automatic enrolment of vTPMs made by virt-xml/virt-install (issue 7), and
# the vTPM EK certificates from the provider's EK CA, on one lab host with a
# real guest:
#   nkpd runs in the host (started and stopped by PID); a plain domain gets
#   a vTPM with `virt-xml --add-device --tpm emulator,model=tpm-crb` → nkpd
#   enrols it (keysafe names the default provider, <encryption secret>);
#   virsh start → markers written; stop/start → read back; the vTPM state is
#   encrypted (no marker, no certificate strings); swtpm_setup's
#   create_certs_tool (nkp-swtpm-certs, per-host /etc/swtpm_setup.conf)
#   issued the EK certificates with the provider's CA; a start that races
#   the enrolment (nkpd stopped) is refused with nkp's line; [vtpm]
#   policy=require refuses a plain vTPM; policy=off leaves it plain; nkpd
#   reconnects after a libvirtd restart and its scan enrols what was
#   defined meanwhile.
# Exit: 0 pass, 1 fail, 77 skipped (with the reason).
set -euo pipefail
source "$(dirname "$0")/lib/test.sh"
lab_test t-nkp-enrol "virt-xml vTPMs enrolled by nkpd, EK certs from the provider's CA, [vtpm] policy" \
    --needs virt-xml --needs python3 \
    --built libvirt-hooks/nkp-hook --built plugin/nkpd/nkpd --built swtpm-hooks/nkp-swtpm-certs
BUILD=$NKP_BUILD_DIR
nk() { lab_exec a nkpctl "$@"; }
plain_domain() { # NAME MARK: a domain without a vTPM
    local d=$1
    qemu-img create -q -f qcow2 "$LAB_DIR/shared/$d.qcow2" 64M
    lab_guest_xml --name "$d" --disk "$LAB_DIR/shared/$d.qcow2" --marker "$2" --no-tpm |
        sed 's|<cmdline>|<cmdline>nkp.ekcert=1 |' > "$LAB_DIR/$d.xml"
    lab_virsh a define "$LAB_DIR/$d.xml" >/dev/null || fail "define $d"
}
add_tpm() { lab_exec a virt-xml --connect qemu:///system "$1" --add-device --tpm emulator,model=tpm-crb >/dev/null 2>&1 || fail "virt-xml --add-device --tpm on $1"; }
has_keysafe() { lab_virsh a dumpxml --inactive "$1" | grep_q 'nkp.invalid/xmlns/keysafe'; }

t0=$(lab_now)
lab_test_init
lab_at_exit nkpd_stop
lab_host_create a || fail "host a"
lab_install_nkp a "$BUILD"
# swtpm_setup in this host calls nkp's create_certs_tool.
conf=$(lab_path a /etc/swtpm_setup.conf)
# In place (same inode): the file is bind-mounted into the host.
new=$(sed "s|^create_certs_tool *=.*|create_certs_tool = $BUILD/swtpm-hooks/nkp-swtpm-certs|" "$conf")
printf '%s\n' "$new" > "$conf"
grep -q "nkp-swtpm-certs" "$conf" || fail "cannot set create_certs_tool in $conf"
lab_host_start a || fail "host a did not start"
pass "host a up: hook, nkpctl, create_certs_tool = nkp-swtpm-certs ($(lab_since "$t0") s)"

umask 077
printf 'lab password enrol\n' > "$LAB_DIR/pw"
nk provider create pe >/dev/null || fail "provider create"
nk provider backup pe --out "$LAB_DIR/pe.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "provider backup"
nk provider set-default pe >/dev/null || fail "set-default"
nk provider ca-cert pe > "$LAB_DIR/ca.pem" || fail "provider ca-cert"

# ---- a race: plain vTPM, nkpd not running → refused ------------------------------
dom=e1
mark="NKPENROL$(od -An -N5 -tx1 /dev/urandom | tr -d ' \n')"
plain_domain "$dom" "$mark"
add_tpm "$dom"
has_keysafe "$dom" && fail "enrolled without nkpd?"
if err=$(lab_virsh a start "$dom" 2>&1); then fail "a plain vTPM with no state started (nkpd not running)"; fi
grep -q "would write its state in clear" <<<"$err" && grep -q "nkpctl vm encrypt" <<<"$err" || fail "race start error: $err"
uuid=$(lab_virsh a domuuid "$dom" | tr -d '[:space:]')
[ ! -e "$(lab_path a "/var/lib/libvirt/swtpm/$uuid")/tpm2/tpm2-00.permall" ] || fail "clear vTPM state written by a refused start"
pass "start before enrolment refused with nkp's line and the fix, no state written"

# ---- nkpd enrols it (scan at start), then new ones (events) ------------------------
nkpd_start
for ((i = 0; i < 50; i++)); do has_keysafe "$dom" && break; sleep 0.2; done
has_keysafe "$dom" || fail "nkpd did not enrol $dom at start"
st=$(nk --json vm status "$dom") || fail "vm status"
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="encrypted" and d["provider"]=="pe" and "vtpm:vtpm" in d["objects"], d' <<<"$st" || fail "vm status: $st"
dom2=e2
plain_domain "$dom2" "${mark}2"
add_tpm "$dom2"
for ((i = 0; i < 50; i++)); do has_keysafe "$dom2" && break; sleep 0.2; done
has_keysafe "$dom2" || fail "nkpd did not enrol $dom2 on its DEFINED event"
lab_virsh a dumpxml --inactive "$dom2" | grep_q "<encryption secret=" || fail "$dom2: no <encryption secret>"
pass "nkpd enrolled the virt-xml vTPMs (scan at start, DEFINED event): keysafe names 'pe'"

# ---- first start: markers, certificates from the provider's CA ------------------------
boot_and_write a "$dom" "$mark"
swlog=$(cat "$(lab_path a /var/log/swtpm/libvirt/qemu)/$dom-swtpm.log" 2>/dev/null || true)
n=$(grep -c "with the EK CA of provider 'pe'" <<<"$swlog" || true)
[ "$n" = 3 ] || fail "swtpm_setup log does not show 3 certificates by provider pe: $(tail -5 <<<"$swlog")"
lab_wait_serial a "$dom" 'NKP-EKCERT-END|NKP-ERROR' 60 >/dev/null || fail "the guest printed no EK certificate"
tr -d '\r' < "$(lab_serial_path a "$dom")" | sed -n 's/^NKP-EKCERT //p' | base64 -d > "$LAB_DIR/ek.der" ||
    fail "cannot decode the guest's EK certificate"
openssl x509 -inform der -in "$LAB_DIR/ek.der" -out "$LAB_DIR/ek.pem" 2>/dev/null || fail "the guest's EK certificate is not X.509"
openssl verify -CAfile "$LAB_DIR/ca.pem" "$LAB_DIR/ek.pem" >/dev/null || fail "the guest's EK cert does not verify against host a's ca-cert"
pass "the EK certificate read in the guest (NV 0x01c00002) verifies against 'nkpctl provider ca-cert pe' on host a"
lab_virsh a destroy "$dom" >/dev/null
[ ! -e "$(lab_path a /run/nkp/ekca)/$uuid" ] || fail "the certificate ticket outlived the VM"
pass "first start: markers written; swtpm_setup got the RSA+ECC EK and platform certificates from pe's CA; ticket gone"

boot_and_read a "$dom" "$mark" "$dom, second boot"
state=$(lab_path a "/var/lib/libvirt/swtpm/$uuid/tpm2")/tpm2-00.permall
python3 - "$mark" "$state" <<'PY' || fail "the vTPM state has the marker or certificate strings in clear"
import sys
data = open(sys.argv[2], "rb").read()
for n in (sys.argv[1].encode(), b"nkp EK CA", b"swtpm", b"id:00001014"):
    if n in data:
        print("found", n); sys.exit(1)
PY
sz=$(stat -c %s "$state"); gz=$(gzip -c "$state" | wc -c)
[ "$gz" -ge $((sz * 95 / 100)) ] || fail "vTPM state compresses ($gz/$sz)"
pass "stop/start: TPM and disk markers read back; vTPM state encrypted (no marker, no certificate strings)"

# ---- host b restores the provider: same CA -----------------------------------------------
lab_host_create b || fail "host b"
lab_install_nkp b "$BUILD"
lab_exec b nkpctl provider restore "$LAB_DIR/pe.p12" --password-file "$LAB_DIR/pw" >/dev/null || fail "restore on b"
lab_exec b nkpctl provider ca-cert pe > "$LAB_DIR/ca-b.pem" || fail "ca-cert on b"
openssl verify -CAfile "$LAB_DIR/ca-b.pem" "$LAB_DIR/ek.pem" >/dev/null || fail "the guest's EK cert does not verify against host b's ca-cert"
lab_exec b nkpctl host flush-cache >/dev/null 2>&1 || true
pass "host b (provider restored from the backup): the guest's EK certificate verifies against its ca-cert too"

# ---- libvirtd restarts: nkpd reconnects and scans -------------------------------------------
# A domain written into libvirt's config while libvirtd is down is seen by
# no event: only the scan at nkpd's reconnect can enrol it.
connects=$(grep -c "following libvirt" "$LAB_DIR/nkpd.log")
lpid=$(cat "$(lab_hostdir a)/fs/run/libvirtd.pid")
kill "$lpid"
for ((i = 0; i < 50; i++)); do kill -0 "$lpid" 2>/dev/null || break; sleep 0.2; done
dom4=e4
uuid4=$(cat /proc/sys/kernel/random/uuid)
printf '%s\n' "<domain type='qemu'><name>$dom4</name><uuid>$uuid4</uuid><memory>65536</memory>" \
    "<os><type arch='x86_64' machine='pc'>hvm</type></os><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>" \
    "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm></devices></domain>" \
    > "$(lab_path a /etc/libvirt/qemu)/$dom4.xml"
for ((i = 0; i < 50; i++)); do grep -q "libvirt went away; reconnecting" "$LAB_DIR/nkpd.log" && break; sleep 0.2; done
grep -q "libvirt went away; reconnecting" "$LAB_DIR/nkpd.log" || fail "nkpd did not notice that libvirtd stopped"
sleep 2.5 # at least one failed connect: the 2 s retry
lab_exec a env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 libvirtd -d ||
    fail "libvirtd did not start again"
for ((i = 0; i < 60; i++)); do [ "$(grep -c "following libvirt" "$LAB_DIR/nkpd.log")" -gt "$connects" ] && break; sleep 0.5; done
[ "$(grep -c "following libvirt" "$LAB_DIR/nkpd.log")" -gt "$connects" ] || fail "nkpd did not reconnect after libvirtd restarted"
for ((i = 0; i < 50; i++)); do has_keysafe "$dom4" && break; sleep 0.2; done
has_keysafe "$dom4" || fail "nkpd's scan at reconnect did not enrol $dom4"
lab_virsh a undefine "$dom4" >/dev/null
pass "libvirtd restarted: nkpd reconnected and its scan enrolled a domain defined meanwhile"

# ---- policy require / off ---------------------------------------------------------------
nkpd_stop
set_policy require
dom3=e3
plain_domain "$dom3" "${mark}3"
add_tpm "$dom3"
if err=$(lab_virsh a start "$dom3" 2>&1); then fail "policy require: a plain vTPM started"; fi
grep -q "policy requires it" <<<"$err" || fail "policy require: $err"
pass "policy require: plain vTPM start refused with a clear message"
set_policy off
nkpd_start
sleep 2
has_keysafe "$dom3" && fail "policy off: nkpd enrolled $dom3"
lab_virsh a start "$dom3" >/dev/null || fail "policy off: plain vTPM start: $(lab_virsh a start "$dom3" 2>&1 || true)"
lab_wait_serial a "$dom3" 'NKP-MARKERS-WRITTEN|NKP-ERROR' 240 >/dev/null || fail "policy off: no marker line"
lab_virsh a destroy "$dom3" >/dev/null
st=$(nk --json vm status "$dom3") || true
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["state"]=="plain", d' <<<"$st" || fail "policy off: vm status: $st"
pass "policy off: plain vTPM untouched, starts in clear, vm status plain"
nkpd_stop

lab_test_done
