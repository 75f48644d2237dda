# shellcheck shell=bash
# The VM-creation tests' host (t-nkp-create, t-nkp-install): lab host a with
# /var/lib/libvirt on a loop ext4 -O encrypt, nkp installed, [vtpm]
# policy=enrol, a backed-up default provider, nkpd running; and what they
# read of it.  Sourced after lib/test.sh.

# create_host_up PROVIDER: host a as above ($LAB_DIR/pw holds the backup's
# password, $LAB_DIR/PROVIDER.p12 the backup); sets umask 077.
create_host_up() {
    local p=$1 t0
    t0=$(lab_now)
    lab_test_init
    lab_at_exit nkpd_stop
    LAB_FSCRYPT_LIBVIRT=1 lab_host_create a || fail "host a"
    lab_install_nkp a "$NKP_BUILD_DIR"
    lab_host_start a || fail "host a did not start"
    set_policy enrol
    pass "host a up: /var/lib/libvirt on a loop ext4 -O encrypt ($(lab_since "$t0") s)"
    umask 077   # the rest of the test too: its files are nobody else's
    printf 'lab password %s\n' "$p" > "$LAB_DIR/pw"
    lab_exec a nkpctl provider create "$p" >/dev/null || fail "provider create"
    lab_exec a nkpctl provider backup "$p" --out "$LAB_DIR/$p.p12" --password-file "$LAB_DIR/pw" \
        >/dev/null || fail "provider backup"
    lab_exec a nkpctl provider set-default "$p" >/dev/null || fail "set-default"
    nkpd_start
}

# create_has_keysafe DOM: DOM's persistent definition carries nkp's keysafe.
create_has_keysafe() { lab_virsh a dumpxml --inactive "$1" | grep_q 'nkp.invalid/xmlns/keysafe'; }

# create_state_info UUID MARK: "flag=<0|1> marker=<count>" of the vTPM
# state file, read in host a (flag 1: swtpm-encrypted).
create_state_info() {
    lab_exec a python3 - "/var/lib/libvirt/swtpm/$1/tpm2/tpm2-00.permall" "$2" <<'PY'
import sys
d = open(sys.argv[1], "rb").read()
print("flag=%d marker=%d" % (d[5] & 1, d.count(sys.argv[2].encode())))
PY
}

# create_raw_count MARK: copies of MARK in host a's raw filesystem image.
create_raw_count() { grep -a -c "$1" "$(lab_fscrypt_image a)" || true; }
