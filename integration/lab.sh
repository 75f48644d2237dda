# shellcheck shell=bash
# nkp's throwaway libvirt lab: sourceable bash library (set -euo pipefail safe).
#
# A lab "host" is a set of namespaces (mount, UTS, network) pinned by bind
# mounts of their ns files, in which per-host copies of /etc/libvirt,
# /var/lib/libvirt, /var/log, /var/cache/libvirt, /run, /var/lib/swtpm-localca,
# /etc/nkp, /var/lib/nkp (and the swtpm_setup / swtpm-localca config files)
# are bind-mounted over the real paths, with its own virtlogd and libvirtd.
# All state lives under one throwaway directory ($LAB_DIR); lab_cleanup_all
# (installed on EXIT by lab_init) stops every process of every host by PID,
# unmounts and removes it.
#
#   source integration/lab.sh
#   lab_init                       # LAB_DIR, EXIT trap, guest kernel/initrd
#   lab_host_up a [10.77.0.1]      # = lab_host_create + lab_host_start
#   lab_virsh a list --all
#   lab_exec a cat /etc/hostname
#   lab_path a /var/lib/libvirt    # where that host's /var/lib/libvirt really is
#   lab_guest_xml --name g1 --disk "$LAB_DIR/shared/g1.qcow2" ... > g1.xml
#   lab_wait_serial a g1 'NKP-MARKERS-WRITTEN' 120
#   lab_host_down a
#   lab_at_exit 'kill $pid'         # ends what the caller started, before the hosts go down
#
# Tests do not source this file directly: integration/lib/test.sh does, with
# the assertions and the guest helpers (integration/README.md, "Shared test
# helpers").
#
# Knobs (environment):
#   NKP_LAB_CACHE      guest/kernel cache (default /var/cache/nkp-lab)
#   LAB_TMP            parent of LAB_DIR (default /var/tmp)
#   LAB_KEEP=1         keep LAB_DIR (logs) after cleanup (daemons are still stopped)
#   LAB_VIRSH_TIMEOUT  bound on each lab_virsh call, seconds (default 180)
#   LAB_LIBVIRTD_CONF_EXTRA / LAB_QEMU_CONF_EXTRA  lines appended to the configs
#   LAB_VERBOSE=1      log every step to stderr
#   LAB_TLS=1          hosts created with an ADDR get TLS: a lab CA, host certs
#                      in /etc/pki (libvirt + QEMU), libvirtd listens on TLS
#                      (16514) as well as TCP, so `virsh migrate --tls` and
#                      qemu+tls://ADDR/system work
#   LAB_HOST_TPM=1     each host gets its own swtpm as "host TPM" on its own
#                      127.0.0.1:2321 (see lab_host_tpm)
#   LAB_FSCRYPT_LIBVIRT=1  each host created gets its /var/lib/libvirt on a
#                      loop-mounted ext4 with the 'encrypt' feature
#                      ($h/var-lib-libvirt.img, 256 MiB sparse), mounted in
#                      the host's mount namespace only and unmounted by
#                      lab_host_down, so `nkpctl host protect` can encrypt
#                      /var/lib/libvirt/swtpm (fscrypt).  From outside, read
#                      that tree with lab_exec (lab_path shows the empty
#                      skeleton under it), and the raw image with lab_fscrypt_image.
#   LAB_FSCRYPT_SIZE   that image's size (default 256M; sparse)

# grep_q PATTERN...: `grep -q` that reads its whole input.  Under pipefail,
# `virsh dumpxml D | grep -q X` fails when grep exits at the first match while
# the writer still writes (SIGPIPE, status 141): a match reported as a miss.
grep_q() { grep "$@" >/dev/null; }

LAB_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${NKP_LAB_CACHE:=/var/cache/nkp-lab}"
: "${LAB_TMP:=/var/tmp}"
: "${LAB_VIRSH_TIMEOUT:=180}"
LAB_DIR=${LAB_DIR:-}
LAB_GUEST_KERNEL=${LAB_GUEST_KERNEL:-}
LAB_GUEST_INITRD=${LAB_GUEST_INITRD:-}

# Commands lab_cleanup_all runs first (lab_at_exit), last registered first.
LAB_AT_EXIT=()

# The directories each host gets its own copy of: "name:path inside the host".
LAB_HOST_DIRS=(
    etc-libvirt:/etc/libvirt
    var-lib-libvirt:/var/lib/libvirt
    var-log:/var/log
    var-cache-libvirt:/var/cache/libvirt
    run:/run
    var-lib-swtpm-localca:/var/lib/swtpm-localca
    etc-nkp:/etc/nkp
    var-lib-nkp:/var/lib/nkp
    etc-pki:/etc/pki
)
# Files (copied from the machine, then bind-mounted), so nkp's swtpm hooks can
# point each host's swtpm_setup at its own create_certs_tool.
LAB_HOST_FILES=(/etc/swtpm_setup.conf /etc/swtpm-localca.conf /etc/swtpm-localca.options)

lab_log() { if [ "${LAB_VERBOSE:-0}" = 1 ]; then echo "lab: $*" >&2; fi; }
lab_say() { echo "lab: $*" >&2; }
lab_die() { echo "lab: ERROR: $*" >&2; return 1; }
lab_now() { date +%s.%N; }
lab_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# lab_check_env: prints a reason and returns 1 when the lab cannot run here.
lab_check_env() {
    local c
    if [ "$(id -u)" != 0 ]; then echo "needs root (namespaces, mounts, libvirtd)"; return 1; fi
    for c in unshare nsenter libvirtd virtlogd virsh qemu-system-x86_64 qemu-img swtpm swtpm_setup \
             ip busybox tpm2 apt-get dpkg-deb flock mount umount; do
        command -v "$c" >/dev/null 2>&1 || { echo "missing command: $c"; return 1; }
    done
    if ! unshare --mount --uts --net true 2>/dev/null; then
        echo "cannot create mount/UTS/network namespaces here (unshare failed)"; return 1
    fi
    return 0
}

# lab_init [--no-guest]: reap labs whose test died (SIGKILL), make LAB_DIR,
# install the cleanup trap, build/fetch the guest and pick the accelerator.
lab_init() {
    lab_reap_stale
    if [ -z "$LAB_DIR" ]; then
        mkdir -p "$LAB_TMP"
        LAB_DIR=$(mktemp -d "$LAB_TMP/nkp-lab.XXXXXX")
    fi
    mkdir -p "$LAB_DIR/hosts" "$LAB_DIR/shared"
    echo "$$ $(_lab_starttime $$)" > "$LAB_DIR/owner"
    export LAB_DIR
    trap 'lab_cleanup_all' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    lab_log "LAB_DIR=$LAB_DIR"
    if [ "${1:-}" != --no-guest ]; then lab_guest_build && lab_accel; fi
}

# fields of /proc/PID/stat after "pid (comm) ": 1 = state, 20 = start time
_lab_stat() {
    local l f=$2
    l=$(cat "/proc/$1/stat" 2>/dev/null) || { echo gone; return 0; }
    l=${l##*) }
    # shellcheck disable=SC2086
    set -- $l
    echo "${!f}"
}
_lab_starttime() { _lab_stat "$1" 20; }

# lab_reap_stale: tear down labs under LAB_TMP whose owning test process is
# gone (killed with SIGKILL, so its EXIT trap never ran). Labs of tests
# that still run are left alone.
lab_reap_stale() {
    local d pid st
    for d in "$LAB_TMP"/nkp-lab.*; do
        [ -f "$d/owner" ] || continue
        read -r pid st < "$d/owner" || continue
        if [ -d "/proc/$pid" ] && [ "$(_lab_starttime "$pid")" = "$st" ]; then continue; fi
        lab_say "reaping stale lab $d (its test, pid $pid, is gone)"
        ( LAB_DIR=$d; LAB_KEEP=0; LAB_AT_EXIT=(); trap - EXIT; lab_cleanup_all ) || true
    done
}

# lab_accel: LAB_DOMAIN_TYPE = kvm if a guest provably boots under KVM here
# (probe cached per machine kernel, QEMU and guest), else qemu (TCG).
# LAB_ACCEL=tcg|kvm|auto (default auto) overrides.
lab_accel() {
    [ -z "${LAB_DOMAIN_TYPE:-}" ] || return 0
    case ${LAB_ACCEL:-auto} in
        tcg|qemu) LAB_DOMAIN_TYPE=qemu ;;
        kvm) LAB_DOMAIN_TYPE=kvm ;;
        *)
            LAB_DOMAIN_TYPE=qemu
            if [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
                local key f out
                key=$(echo "$(uname -r) $(qemu-system-x86_64 --version | head -n1) $LAB_GUEST_KERNEL $LAB_GUEST_INITRD" \
                      | sha256sum | cut -c1-16)
                f="$NKP_LAB_CACHE/accel-probe-$key"
                if [ ! -s "$f" ]; then
                    out=$(mktemp)
                    timeout -k 5 25 qemu-system-x86_64 -machine q35,accel=kvm -m 256 -display none \
                        -no-reboot -serial "file:$out" -kernel "$LAB_GUEST_KERNEL" -initrd "$LAB_GUEST_INITRD" \
                        -append "console=ttyS0 quiet panic=-1 nkp.probe=1" >/dev/null 2>&1 || true
                    if grep -q NKP-PROBE-OK "$out"; then echo kvm > "$f"; else echo qemu > "$f"; fi
                    rm -f "$out"
                fi
                LAB_DOMAIN_TYPE=$(cat "$f")
            fi
            ;;
    esac
    export LAB_DOMAIN_TYPE
    lab_log "domain type: $LAB_DOMAIN_TYPE"
}

lab_guest_build() {
    local out
    [ -n "$LAB_GUEST_KERNEL" ] && [ -s "$LAB_GUEST_KERNEL" ] && return 0
    out=$(NKP_LAB_CACHE="$NKP_LAB_CACHE" "$LAB_LIB_DIR/guest/build.sh") || lab_die "guest build failed" || return 1
    LAB_GUEST_KERNEL=$(sed -n 's/^KERNEL=//p' <<<"$out")
    LAB_GUEST_INITRD=$(sed -n 's/^INITRD=//p' <<<"$out")
    export LAB_GUEST_KERNEL LAB_GUEST_INITRD
}

lab_hostdir() { echo "$LAB_DIR/hosts/$1"; }

# lab_path NAME PATH: the real location (seen from outside) of PATH inside
# host NAME, for the per-host directories; other paths are returned as is.
lab_path() {
    local h; h=$(lab_hostdir "$1")
    local p=$2 e name target
    for e in "${LAB_HOST_DIRS[@]}"; do
        name=${e%%:*}; target=${e#*:}
        if [ "$p" = "$target" ] || [ "${p#"$target"/}" != "$p" ]; then
            echo "$h/fs/$name${p#"$target"}"; return 0
        fi
    done
    for e in "${LAB_HOST_FILES[@]}"; do
        if [ "$p" = "$e" ]; then echo "$h/files/$(basename "$e")"; return 0; fi
    done
    echo "$p"
}

lab_exec() {
    local name=$1; shift
    local h; h=$(lab_hostdir "$name")
    [ -e "$h/ns/mnt" ] || lab_die "no host $name" || return 1
    nsenter --mount="$h/ns/mnt" --uts="$h/ns/uts" --net="$h/ns/net" -- \
        env PATH="$h/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" "$@"
}

lab_virsh() {
    local name=$1; shift
    lab_exec "$name" timeout -k 5 "$LAB_VIRSH_TIMEOUT" virsh -q -c qemu:///system "$@"
}

_lab_write_configs() { # name addr
    local name=$1 addr=${2:-} h; h=$(lab_hostdir "$name")
    local uuid; uuid=$(cat /proc/sys/kernel/random/uuid)
    echo "$uuid" > "$h/host_uuid"
    {
        echo '# nkp lab host '"$name"
        echo 'unix_sock_group = "root"'
        echo 'unix_sock_ro_perms = "0777"'
        echo 'unix_sock_rw_perms = "0770"'
        echo 'auth_unix_ro = "none"'
        echo 'auth_unix_rw = "none"'
        echo "host_uuid = \"$uuid\""
        echo 'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"'
        echo 'max_workers = 20'
        if [ -n "$addr" ]; then
            if [ "${LAB_TLS:-0}" = 1 ]; then echo 'listen_tls = 1'; else echo 'listen_tls = 0'; fi
            echo 'listen_tcp = 1'
            echo "listen_addr = \"${addr%%/*}\""
            echo 'auth_tcp = "none"'
        fi
        if [ -n "${LAB_LIBVIRTD_CONF_EXTRA:-}" ]; then printf '%s\n' "$LAB_LIBVIRTD_CONF_EXTRA"; fi
    } > "$h/fs/etc-libvirt/libvirtd.conf"
    {
        echo 'user = "root"'
        echo 'group = "root"'
        echo 'swtpm_user = "root"'
        echo 'swtpm_group = "root"'
        echo 'security_driver = "none"'
        echo 'namespaces = [ ]'
        echo 'cgroup_controllers = [ ]'
        echo 'dynamic_ownership = 0'
        echo 'remember_owner = 0'
        if [ -n "$addr" ]; then
            echo "migration_address = \"${addr%%/*}\""
            echo "migration_host = \"${addr%%/*}\""
        fi
        if [ -n "${LAB_QEMU_CONF_EXTRA:-}" ]; then printf '%s\n' "$LAB_QEMU_CONF_EXTRA"; fi
    } > "$h/fs/etc-libvirt/qemu.conf"
    echo 'uri_default = "qemu:///system"' > "$h/fs/etc-libvirt/libvirt.conf"
    echo 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"' > "$h/fs/etc-libvirt/virtlogd.conf"
}

# lab_host_create NAME [ADDR]: namespaces, per-host trees and configs; no
# daemons yet (install hooks, certificates … now, then lab_host_start).
# ADDR (optional, e.g. 10.77.0.1/24): the host's veth address (see lab_link),
# on which libvirtd listens over TCP (auth none) and takes migrations.
lab_host_create() {
    local name=$1 addr=${2:-}
    [ -n "$LAB_DIR" ] || lab_init --no-guest
    local h; h=$(lab_hostdir "$name")
    [ ! -e "$h" ] || lab_die "host $name exists" || return 1
    case $name in *[!a-zA-Z0-9-]*|'') lab_die "bad host name '$name'"; return 1;; esac
    mkdir -p "$h/ns" "$h/fs" "$h/files" "$h/bin"
    echo "$addr" > "$h/addr"
    local e n
    for e in "${LAB_HOST_DIRS[@]}"; do mkdir -p "$h/fs/${e%%:*}"; done
    for e in "${LAB_HOST_FILES[@]}"; do
        if [ -e "$e" ]; then cp "$e" "$h/files/"; fi
    done
    # skeletons
    mkdir -p "$h/fs/etc-libvirt"/{qemu,secrets,hooks/qemu.d,storage,nwfilter} \
             "$h/fs/var-lib-libvirt"/{qemu,swtpm,images,boot} \
             "$h/fs/var-log"/{libvirt/qemu,swtpm/libvirt/qemu,nkp-guest} \
             "$h/fs/var-cache-libvirt/qemu/capabilities" \
             "$h/fs/run/lock"
    chmod 0700 "$h/fs/var-lib-nkp" "$h/fs/etc-libvirt/secrets"
    chmod 0711 "$h/fs/var-lib-libvirt/swtpm"
    # pre-seed QEMU capabilities (libvirt re-probes if they do not match)
    if ls "$NKP_LAB_CACHE"/libvirt-caps/*.xml >/dev/null 2>&1; then
        cp "$NKP_LAB_CACHE"/libvirt-caps/*.xml "$h/fs/var-cache-libvirt/qemu/capabilities/" 2>/dev/null || true
    fi
    _lab_write_configs "$name" "$addr"
    if [ "${LAB_TLS:-0}" = 1 ] && [ -n "$addr" ]; then
        lab_tls_host "$name" "${addr%%/*}" || return 1
    fi
    if [ "${LAB_HOST_TPM:-0}" = 1 ]; then mkdir -p "$h/hosttpm"; fi
    # mount points that may not exist on this machine yet (empty dirs)
    for e in "${LAB_HOST_DIRS[@]}"; do
        n=${e#*:}; [ -d "$n" ] || mkdir -p "$n"
    done
    # pin the namespaces (the ns files' parent mount must be private)
    mount --bind "$h/ns" "$h/ns"
    mount --make-private "$h/ns"
    touch "$h/ns/mnt" "$h/ns/uts" "$h/ns/net"
    local binds="" f
    for e in "${LAB_HOST_DIRS[@]}"; do
        binds+="mount --bind '$h/fs/${e%%:*}' '${e#*:}'"$'\n'
    done
    for f in "${LAB_HOST_FILES[@]}"; do
        if [ -e "$h/files/$(basename "$f")" ]; then
            binds+="mount --bind '$h/files/$(basename "$f")' '$f'"$'\n'
        fi
    done
    if [ "${LAB_FSCRYPT_LIBVIRT:-0}" = 1 ]; then
        truncate -s "${LAB_FSCRYPT_SIZE:-256M}" "$h/var-lib-libvirt.img"
        mkfs.ext4 -q -F -O encrypt "$h/var-lib-libvirt.img" || { lab_say "mkfs.ext4 -O encrypt failed"; return 1; }
        binds+="mount -o loop '$h/var-lib-libvirt.img' /var/lib/libvirt"$'\n'
        binds+="cp -a '$h/fs/var-lib-libvirt/.' /var/lib/libvirt/"$'\n'
    fi
    if ! unshare --mount="$h/ns/mnt" --uts="$h/ns/uts" --net="$h/ns/net" --propagation private \
        /bin/bash -euc "
            $binds
            hostname '$name'
            ip link set lo up
        "; then
        lab_say "creating host $name failed"
        return 1
    fi
    lab_log "host $name created ($h)"
}

# lab_tls_ca: the lab's throwaway CA ($LAB_DIR/tls/ca-{key,cert}.pem).
lab_tls_ca() {
    local d="$LAB_DIR/tls"
    [ -s "$d/ca-cert.pem" ] && return 0
    mkdir -p "$d" && chmod 700 "$d"
    openssl req -x509 -new -newkey rsa:2048 -nodes -keyout "$d/ca-key.pem" -out "$d/ca-cert.pem" \
        -days 7 -subj "/O=nkp lab/CN=nkp lab CA $$" \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
        >/dev/null 2>&1 || lab_die "openssl: lab CA"
}

# lab_tls_host NAME ADDR: a key and a certificate (server + client, SAN =
# ADDR and NAME) signed by the lab CA, installed where libvirt and QEMU look
# in that host (/etc/pki/CA, /etc/pki/libvirt, /etc/pki/qemu).
lab_tls_host() {
    local name=$1 addr=$2 h; h=$(lab_hostdir "$name")
    lab_tls_ca || return 1
    local d="$LAB_DIR/tls/$name" pki="$h/fs/etc-pki"
    mkdir -p "$d"
    printf '%s\n' 'basicConstraints=CA:FALSE' 'keyUsage=critical,digitalSignature,keyEncipherment' \
        'extendedKeyUsage=serverAuth,clientAuth' "subjectAltName=IP:$addr,DNS:$name" > "$d/ext.cnf"
    openssl req -new -newkey rsa:2048 -nodes -keyout "$d/key.pem" -out "$d/req.csr" \
        -subj "/O=nkp lab/CN=$name" >/dev/null 2>&1 || lab_die "openssl: key for $name" || return 1
    openssl x509 -req -in "$d/req.csr" -CA "$LAB_DIR/tls/ca-cert.pem" -CAkey "$LAB_DIR/tls/ca-key.pem" \
        -CAcreateserial -days 7 -out "$d/cert.pem" -extfile "$d/ext.cnf" >/dev/null 2>&1 \
        || lab_die "openssl: cert for $name" || return 1
    mkdir -p "$pki/CA" "$pki/libvirt/private" "$pki/qemu"
    cp "$LAB_DIR/tls/ca-cert.pem" "$pki/CA/cacert.pem"
    cp "$LAB_DIR/tls/ca-cert.pem" "$pki/qemu/ca-cert.pem"
    local k
    for k in server client; do
        cp "$d/cert.pem" "$pki/libvirt/${k}cert.pem"
        cp "$d/key.pem" "$pki/libvirt/private/${k}key.pem"
        cp "$d/cert.pem" "$pki/qemu/$k-cert.pem"
        cp "$d/key.pem" "$pki/qemu/$k-key.pem"
    done
    chmod 600 "$pki/libvirt/private/"*.pem "$pki/qemu/"*-key.pem
}

# lab_host_tpm NAME: start the host's own swtpm ("host TPM 2.0") inside the
# host, state in $LAB_DIR/hosts/NAME/hosttpm (kept across lab_host_restart,
# like a real TPM across reboots), reachable in that host only as TCTI
# "swtpm:host=127.0.0.1,port=2321" (each host has its own loopback).
# lab_host_start does it when the host was created with LAB_HOST_TPM=1.
LAB_HOST_TPM_TCTI="swtpm:host=127.0.0.1,port=2321"
lab_host_tpm() {
    local name=$1 h; h=$(lab_hostdir "$name")
    mkdir -p "$h/hosttpm"
    lab_exec "$name" swtpm socket --tpm2 --tpmstate dir="$h/hosttpm" \
        --server type=tcp,port=2321,bindaddr=127.0.0.1 --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 \
        --flags not-need-init,startup-clear --log file="$h/hosttpm/swtpm.log" \
        --pid file="$h/hosttpm/swtpm.pid" --daemon || lab_die "host TPM of $name did not start" || return 1
    local i
    for ((i = 0; i < 50; i++)); do
        lab_exec "$name" bash -c 'exec 3<>/dev/tcp/127.0.0.1/2321' 2>/dev/null && return 0
        sleep 0.1
    done
    lab_die "host TPM of $name does not answer"
}

# lab_host_start NAME: virtlogd, then libvirtd; waits (bounded) until
# `virsh version` answers.
lab_host_start() {
    local name=$1 h; h=$(lab_hostdir "$name")
    local addr; addr=$(cat "$h/addr")
    local t0; t0=$(lab_now)
    local envv=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8)
    if [ -d "$h/hosttpm" ]; then lab_host_tpm "$name" || return 1; fi
    lab_exec "$name" "${envv[@]}" virtlogd -d || lab_die "virtlogd failed to start on $name" || return 1
    local lflag=()
    [ -z "$addr" ] || lflag=(--listen)
    lab_exec "$name" "${envv[@]}" libvirtd -d "${lflag[@]}" || lab_die "libvirtd failed to start on $name" || return 1
    local i
    for ((i = 0; i < 240; i++)); do
        if lab_exec "$name" timeout 10 virsh -q -c qemu:///system version >/dev/null 2>&1; then
            # capabilities are probed on the first qemu call; do it now
            lab_exec "$name" timeout 120 virsh -q -c qemu:///system domcapabilities --virttype qemu >/dev/null 2>&1 || true
            lab_log "host $name up in $(lab_since "$t0") s"
            echo "$(lab_since "$t0")" > "$h/startup_seconds"
            _lab_save_caps "$name"
            return 0
        fi
        if [ -s "$h/fs/run/libvirtd.pid" ] && ! kill -0 "$(cat "$h/fs/run/libvirtd.pid")" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    lab_say "libvirtd on $name did not answer; its log:"
    tail -n 30 "$h/fs/var-log/libvirt/libvirtd.log" >&2 2>/dev/null || true
    return 1
}

_lab_save_caps() {
    local h; h=$(lab_hostdir "$1")
    local d="$NKP_LAB_CACHE/libvirt-caps"
    if ! ls "$d"/*.xml >/dev/null 2>&1 && ls "$h/fs/var-cache-libvirt/qemu/capabilities/"*.xml >/dev/null 2>&1; then
        mkdir -p "$d.tmp.$$" && cp "$h/fs/var-cache-libvirt/qemu/capabilities/"*.xml "$d.tmp.$$/" \
            && { mv -T "$d.tmp.$$" "$d" 2>/dev/null || rm -rf "$d.tmp.$$"; }
    fi
}

lab_host_up() {
    lab_host_create "$@" && lab_host_start "$1"
}

# PIDs of every process in host NAME's mount or network namespace.
lab_host_pids() {
    local h; h=$(lab_hostdir "$1")
    local mi ni p pid
    mi=$(stat -L -c %i "$h/ns/mnt" 2>/dev/null) || return 0
    ni=$(stat -L -c %i "$h/ns/net" 2>/dev/null) || ni=none
    for p in /proc/[0-9]*; do
        pid=${p#/proc/}
        [ "$pid" != $$ ] || continue
        case "$(readlink "$p/ns/mnt" 2>/dev/null)" in "mnt:[$mi]") echo "$pid"; continue;; esac
        case "$(readlink "$p/ns/net" 2>/dev/null)" in "net:[$ni]") echo "$pid";; esac
    done
}

# lab_procs_snapshot HOST…: "pid starttime" of every process of those hosts;
# lab_procs_alive SNAPSHOT: those still alive (by pid AND start time: after
# a host is gone its namespace inode numbers are reused by new namespaces).
lab_procs_snapshot() {
    local n p
    for n in "$@"; do
        for p in $(lab_host_pids "$n"); do echo "$p $(_lab_starttime "$p")"; done
    done
}
lab_procs_alive() {
    local pid st
    while read -r pid st; do
        [ -n "$pid" ] || continue
        # zombies are dead, not yet reaped; a process whose namespaces are
        # gone is inside exit() (the kernel drops them before the zombie
        # state): both are no leftover
        if [ "$(_lab_starttime "$pid")" = "$st" ] \
           && [ "$(_lab_stat "$pid" 1)" != Z ] && readlink "/proc/$pid/ns/mnt" >/dev/null 2>&1; then
            echo "$pid($(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-60))"
        fi
    done <<<"$1"
}

# lab_host_stop NAME: stop every process of the host (libvirtd, virtlogd,
# qemu, swtpm, anything) by PID; keeps namespaces and state (a "reboot" is
# lab_host_stop + lab_host_start).
lab_host_stop() {
    local name=$1 pids i p
    pids=$(lab_host_pids "$name")
    [ -n "$pids" ] || return 0
    lab_log "stopping $name: $(echo $pids)"
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        pids=$(lab_host_pids "$name")
        [ -n "$pids" ] || return 0
        sleep 0.2
    done
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
    for ((i = 0; i < 50; i++)); do
        [ -n "$(lab_host_pids "$name")" ] || return 0
        sleep 0.1
    done
    lab_say "WARNING: processes of $name survive SIGKILL: $(lab_host_pids "$name" | tr '\n' ' ')"
}

# lab_fscrypt_image NAME: host NAME's raw /var/lib/libvirt image (LAB_FSCRYPT_LIBVIRT=1),
# after its filesystem is synced: what a stolen disk would show.
lab_fscrypt_image() {
    lab_exec "$1" sync -f /var/lib/libvirt
    echo "$(lab_hostdir "$1")/var-lib-libvirt.img"
}

# lab_fscrypt_remount NAME: host NAME's /var/lib/libvirt loop filesystem
# unmounted and mounted again (LAB_FSCRYPT_LIBVIRT=1; the host stopped
# first, lab_host_stop): its fscrypt keys go with the old mount, as at a
# reboot, so the directories they protect are locked again.
lab_fscrypt_remount() {
    local h; h=$(lab_hostdir "$1")
    lab_exec "$1" sh -c "umount /var/lib/libvirt && mount -o loop '$h/var-lib-libvirt.img' /var/lib/libvirt"
}

# lab_host_restart NAME: stop all its daemons and VMs, start libvirtd again.
lab_host_restart() { lab_host_stop "$1" && lab_host_start "$1"; }

# lab_host_down NAME: stop everything, unpin the namespaces, remove the state.
lab_host_down() {
    local name=$1 h; h=$(lab_hostdir "$name")
    [ -d "$h" ] || return 0
    lab_host_stop "$name"
    if [ -e "$h/var-lib-libvirt.img" ]; then
        lab_exec "$name" umount /var/lib/libvirt 2>/dev/null ||
            lab_exec "$name" umount -l /var/lib/libvirt 2>/dev/null || true
    fi
    local f
    for f in mnt uts net; do
        if mountpoint -q "$h/ns/$f" 2>/dev/null || grep_q " $h/ns/$f " /proc/self/mountinfo; then
            umount "$h/ns/$f" 2>/dev/null || umount -l "$h/ns/$f" 2>/dev/null || true
        fi
    done
    while grep -q " $h/ns " /proc/self/mountinfo; do
        umount "$h/ns" 2>/dev/null || umount -l "$h/ns" 2>/dev/null || break
    done
    if grep -q " $h[/ ]" /proc/self/mountinfo; then
        lab_say "WARNING: mounts left under $h, not removing it"
        return 1
    fi
    if [ "${LAB_KEEP:-0}" != 1 ]; then
        rm -rf --one-file-system "$h"
    fi
    lab_log "host $name down"
}

lab_cleanup_all() {
    local rc=$? h i
    set +e
    trap - EXIT
    for ((i = ${#LAB_AT_EXIT[@]} - 1; i >= 0; i--)); do eval "${LAB_AT_EXIT[i]}"; done
    LAB_AT_EXIT=()
    if [ -n "$LAB_DIR" ] && [ -d "$LAB_DIR/hosts" ]; then
        for h in "$LAB_DIR"/hosts/*; do
            [ -d "$h" ] || continue
            lab_host_down "$(basename "$h")"
        done
        rm -f "$LAB_DIR/owner"
        if [ "${LAB_KEEP:-0}" = 1 ]; then
            lab_say "kept $LAB_DIR (LAB_KEEP=1)"
        elif ! grep -q " $LAB_DIR[/ ]" /proc/self/mountinfo; then
            rm -rf --one-file-system "$LAB_DIR"
        fi
    fi
    return $rc
}

# lab_at_exit 'COMMAND': COMMAND (a shell command line) runs when the lab is
# torn down (lab_cleanup_all, the EXIT trap, also after a failed check),
# before the hosts go down; last registered runs first.  For what a test
# starts itself and ends by PID (e.g. nkpd in a host): everything in a
# host's namespaces is also ended by lab_host_down, by PID.
lab_at_exit() { LAB_AT_EXIT+=("$1"); }

# lab_link A B ADDR_A ADDR_B: a veth pair between the two hosts' network
# namespaces ("lab-B" in A, "lab-A" in B), addresses default to /24.
# Made inside A's namespace, so nothing ever lands in the machine's own.
lab_link() {
    local a=$1 b=$2 aa=$3 ab=$4
    case $aa in */*) ;; *) aa=$aa/24;; esac
    case $ab in */*) ;; *) ab=$ab/24;; esac
    local hb; hb=$(lab_hostdir "$b")
    nsenter --net="$hb/ns/net" sleep 60 &
    local sp=$!
    # $! is nsenter's PID before it has entered the namespace: under load
    # the peer would land in the wrong one.  Wait until it is inside.
    local want i; want=$(stat -L -c %i "$hb/ns/net")
    for i in $(seq 100); do
        [ "$(stat -L -c %i "/proc/$sp/ns/net" 2>/dev/null)" = "$want" ] && break
        sleep 0.05
    done
    local ok=0
    if lab_exec "$a" ip link add "lab-$b" type veth peer name "lab-$a" netns "$sp" \
       && lab_exec "$a" ip addr add "$aa" dev "lab-$b" \
       && lab_exec "$a" ip link set "lab-$b" up \
       && lab_exec "$b" ip addr add "$ab" dev "lab-$a" \
       && lab_exec "$b" ip link set "lab-$a" up; then ok=1; fi
    kill "$sp" 2>/dev/null; wait "$sp" 2>/dev/null || true
    [ $ok = 1 ] || lab_die "lab_link $a $b failed"
}

# lab_install_nkp NAME BUILD_DIR: nkp's qemu hook (if built) into the host's
# /etc/libvirt/hooks/qemu.d/ (SIGHUP to libvirtd if it already runs), nkpctl
# on the host's PATH (lab_exec), and /etc/nkp/nkp.conf (root "/": the host's
# bind mounts give it its own /etc/nkp and /var/lib/nkp).
# Env: LAB_NKP_TCTI for [tpm] tcti= (default: the host TPM if the host has
# one (LAB_HOST_TPM=1), else "none").
lab_install_nkp() {
    local name=$1 build=$2 h; h=$(lab_hostdir "$name")
    local hook="$build/libvirt-hooks/nkp-hook"
    if [ -x "$hook" ]; then
        # A link, not a copy: the hook finds libnkp.so.0 through its
        # build-tree RUNPATH ($ORIGIN is the link's target directory).
        ln -sfn "$(realpath "$hook")" "$h/fs/etc-libvirt/hooks/qemu.d/nkp"
        if [ -s "$h/fs/run/libvirtd.pid" ] && kill -0 "$(cat "$h/fs/run/libvirtd.pid")" 2>/dev/null; then
            kill -HUP "$(cat "$h/fs/run/libvirtd.pid")"
        fi
    else
        lab_say "no nkp hook at $hook (not built yet): skipped"
    fi
    local nkpctl
    for nkpctl in "$build/plugin/nkpctl/nkpctl" "$build/nkpctl"; do
        if [ -x "$nkpctl" ]; then
            printf '#!/bin/sh\nexec %q "$@"\n' "$nkpctl" > "$h/bin/nkpctl"
            chmod 0755 "$h/bin/nkpctl"
            break
        fi
    done
    local tcti=${LAB_NKP_TCTI:-}
    if [ -z "$tcti" ]; then
        if [ -d "$h/hosttpm" ]; then tcti=$LAB_HOST_TPM_TCTI; else tcti=none; fi
    fi
    printf '[tpm]\ntcti=%s\n' "$tcti" > "$h/fs/etc-nkp/nkp.conf"
    chmod 0600 "$h/fs/etc-nkp/nkp.conf"
}

# lab_secret_define NAME [--usage vtpm|volume] [--target NAME_OR_PATH] VALUE_FILE
# Defines an ephemeral private secret on host NAME and sets its value from
# VALUE_FILE (never on argv). Prints the secret's UUID.
lab_secret_define() {
    local name=$1; shift
    local usage=vtpm target="lab-$RANDOM$RANDOM" uuid
    while [ $# -gt 1 ]; do
        case $1 in
            --usage) usage=$2; shift 2;;
            --target) target=$2; shift 2;;
            --uuid) uuid=$2; shift 2;;
            *) break;;
        esac
    done
    local file=$1
    : "${uuid:=$(cat /proc/sys/kernel/random/uuid)}"
    local x="$LAB_DIR/secret-$uuid.xml"
    {
        echo "<secret ephemeral='yes' private='yes'><uuid>$uuid</uuid>"
        if [ "$usage" = volume ]; then
            echo "<usage type='volume'><volume>$target</volume></usage>"
        else
            echo "<usage type='vtpm'><name>$target</name></usage>"
        fi
        echo "</secret>"
    } > "$x"
    lab_virsh "$name" secret-define "$x" >/dev/null || return 1
    rm -f "$x"
    lab_virsh "$name" secret-set-value "$uuid" --file "$file" --plain >/dev/null || return 1
    echo "$uuid"
}

# lab_luks_create PATH SIZE KEYFILE: a LUKS qcow2 made as nkp makes them
# (iter-time 10 ms, PBKDF2-SHA512) whose passphrase is KEYFILE's content.
# QEMU 7.2's PBKDF benchmark fails with "Unable to get accurate CPU usage"
# when it measures 0 ms of CPU (integration/README.md, pitfalls): SHA-512
# makes that rare, and it is retried with a growing pause.
lab_luks_create() {
    local path=$1 size=$2 key=$3 i err
    for i in 1 2 3 4 5 6; do
        if err=$(qemu-img create -q -f qcow2 --object secret,id=s0,file="$key" \
                 -o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.hash-alg=sha512 \
                 "$path" "$size" 2>&1); then
            return 0
        fi
        lab_say "qemu-img create (LUKS) attempt $i: $err"
        rm -f "$path"
        sleep "$((i * 2 / 10)).$((i * 2 % 10))"   # 0.2 s, 0.4 s … 1.2 s
    done
    return 1
}

# lab_guest_xml --name N --disk PATH [--uuid U] [--marker M] [--poweroff]
#   [--tpm-secret UUID] [--no-tpm] [--disk-secret UUID] [--mem MiB]
#   [--serial PATH]   (default /var/log/nkp-guest/N.serial: per host, as
#                      /var/log is; read it with lab_serial_path)
#   [--uefi]          <os firmware='efi'> (libvirt picks Debian's OVMF, Secure
#                      Boot; OVMF boots the kernel from fw_cfg) and nkp.efivar=1:
#                      the guest keeps its marker in an EFI variable too
#                      (NVRAM, /var/lib/libvirt/qemu/nvram/N_VARS.fd)
#   [--live]          nkp.live=1: the guest writes a live sector a second,
#                     "NKPLIVE <marker> n " at sector 64 + n % 64, and prints
#                     NKP-LIVE n (see lab_live_written, lab_live_count)
lab_guest_xml() {
    local name="" uuid="" disk="" marker="" poweroff=0 tpmsec="" tpm=1 disksec="" mem=256 serial="" os="<os>" live=0
    while [ $# -gt 0 ]; do
        case $1 in
            --name) name=$2; shift 2;;
            --uuid) uuid=$2; shift 2;;
            --disk) disk=$2; shift 2;;
            --marker) marker=$2; shift 2;;
            --poweroff) poweroff=1; shift;;
            --tpm-secret) tpmsec=$2; shift 2;;
            --no-tpm) tpm=0; shift;;
            --disk-secret) disksec=$2; shift 2;;
            --mem) mem=$2; shift 2;;
            --serial) serial=$2; shift 2;;
            --uefi) os="<os firmware='efi'>"; shift;;
            --live) live=1; shift;;
            *) lab_die "lab_guest_xml: unknown option $1"; return 1;;
        esac
    done
    [ -n "$name" ] && [ -n "$disk" ] || { lab_die "lab_guest_xml: --name and --disk needed"; return 1; }
    [ -n "$LAB_GUEST_KERNEL" ] || lab_guest_build
    lab_accel
    : "${uuid:=$(cat /proc/sys/kernel/random/uuid)}"
    : "${serial:=/var/log/nkp-guest/$name.serial}"
    local cmdline="console=ttyS0 quiet panic=-1"
    [ -z "$marker" ] || cmdline+=" nkp.marker=$marker"
    [ $poweroff = 0 ] || cmdline+=" nkp.poweroff=1"
    [ "$os" = "<os>" ] || cmdline+=" nkp.efivar=1"
    [ $live = 0 ] || cmdline+=" nkp.live=1"
    cat <<EOF
<domain type='$LAB_DOMAIN_TYPE'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  $os
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$LAB_GUEST_KERNEL</kernel>
    <initrd>$LAB_GUEST_INITRD</initrd>
    <cmdline>$cmdline</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
EOF
    if [ -n "$disksec" ]; then
        cat <<EOF
      <encryption format='luks'>
        <secret type='passphrase' uuid='$disksec'/>
      </encryption>
EOF
    fi
    cat <<EOF
    </disk>
    <serial type='file'>
      <source path='$serial'/>
      <target port='0'/>
    </serial>
EOF
    if [ $tpm = 1 ]; then
        echo "    <tpm model='tpm-crb'>"
        if [ -n "$tpmsec" ]; then
            echo "      <backend type='emulator' version='2.0'><encryption secret='$tpmsec'/></backend>"
        else
            echo "      <backend type='emulator' version='2.0'/>"
        fi
        echo "    </tpm>"
    fi
    cat <<EOF
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# lab_serial_path HOST DOMAIN: the domain's serial log on HOST (as seen from outside).
lab_serial_path() { lab_path "$1" "/var/log/nkp-guest/$2.serial"; }

# lab_serial_lines HOST DOMAIN: the whole lines of the serial log (CR and
# NUL dropped).  A line the guest is still writing is left out: a marker
# read half-written would match a regex of its prefix.
lab_serial_lines() {
    local log
    log=$(tr -d '\r\0' 2>/dev/null < "$(lab_serial_path "$1" "$2")"; echo x)
    log=${log%x}
    printf '%s' "${log%"${log##*$'\n'}"}"   # up to the last newline
}

# lab_wait_serial HOST DOMAIN REGEX [TIMEOUT]: wait until the serial log has a
# whole line matching REGEX (grep -E); prints the first match. Returns 1 on
# timeout.
lab_wait_serial() {
    local re=$3 t=${4:-120} i line
    for ((i = 0; i < t * 5; i++)); do
        if line=$(lab_serial_lines "$1" "$2" | grep -a -m1 -E "$re"); then
            echo "$line"; return 0
        fi
        sleep 0.2
    done
    return 1
}

# Live guest data (lab_guest_xml --live, issue 16's copy tests).  The guest
# writes "NKPLIVE <marker> n " (NUL-padded) to sector 64 + n % 64 of vda once
# a second and prints NKP-LIVE n once it is on the host's disk.
#
# lab_live_written HOST DOMAIN: the highest n the guest reported in its
# serial log, -1 when none yet.
lab_live_written() {
    lab_serial_lines "$1" "$2" | awk '$1 == "NKP-LIVE" && $2 ~ /^[0-9]+$/ && $2 + 0 > m { m = $2 + 0 }
        BEGIN { m = -1 } END { print m }'
}

# lab_live_wait HOST DOMAIN N [TIMEOUT]: wait until the guest reported live
# sector N or a later one (default 60 s: a guest ticks once a second, slower
# under TCG on a loaded machine).  Returns 1 on timeout.
lab_live_wait() {
    local t=${4:-60} i
    for ((i = 0; i < t * 5; i++)); do
        [ "$(lab_live_written "$1" "$2")" -ge "$3" ] && return 0
        sleep 0.2
    done
    return 1
}

# lab_live_found HOST DOMAIN: the n of the live sectors the guest found on its
# disk at this boot (its NKP-LIVE-FOUND line), one a line; nothing when none.
lab_live_found() {
    lab_serial_lines "$1" "$2" | sed -n 's/^NKP-LIVE-FOUND//p' | head -n1 | tr ' ' '\n' | grep -E '^[0-9]+$' || true
}

# lab_live_kept HOST DOMAIN N: the disk the guest booted from this time holds
# live sector N or a later write of the same sector (n ≡ N mod 64, n >= N):
# what the guest wrote before a copy, commit or restore is on the disk after it.
lab_live_kept() {
    lab_live_found "$1" "$2" | awk -v n="$3" '$1 % 64 == n % 64 && $1 >= n { ok = 1 } END { exit !ok }'
}

# lab_live_count MARKER FILE…: how many live sectors of MARKER are in clear in
# the FILEs, read raw (a qcow2 file as it lies on disk, as the marker searches
# read it): the occurrences of "NKPLIVE MARKER ".
lab_live_count() {
    local mark=$1; shift
    { grep -a -o -F -- "NKPLIVE $mark " "$@" 2>/dev/null || true; } | wc -l
}

# lab_dump HOST [DOMAIN]: print the useful logs to stderr (for failures).
lab_dump() {
    local name=$1 dom=${2:-} h; h=$(lab_hostdir "$name")
    {
        echo "----- $name: libvirtd.log (tail)"
        tail -n 20 "$h/fs/var-log/libvirt/libvirtd.log" 2>/dev/null
        if [ -n "$dom" ]; then
            echo "----- $name: qemu log of $dom (tail)"
            tail -n 20 "$h/fs/var-log/libvirt/qemu/$dom.log" 2>/dev/null
            echo "----- $name: swtpm log of $dom (tail)"
            tail -n 10 "$h/fs/var-log/swtpm/libvirt/qemu/$dom-swtpm.log" 2>/dev/null
            echo "----- $name: serial of $dom (tail)"
            tail -n 20 "$(lab_serial_path "$name" "$dom")" 2>/dev/null
        fi
        echo "-----"
    } >&2
}
