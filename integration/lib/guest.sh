# shellcheck shell=bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# The lab guest in a test: boot it, read its markers, watch its state.
# Sourced by integration/lib/test.sh (needs lab.sh and the assertions).
#
# The guest (integration/guest/build.sh) writes a marker into its vTPM NV
# index and onto its disk on its first boot ("NKP-MARKERS-WRITTEN tpm=M
# disk=M") and reads both back on later boots: "NKP-TPM-MARKER=M", then
# "NKP-DISK-MARKER=M" right after it.
#
#   boot_and_write HOST DOM MARK [CONTEXT]
#       first boot: serial log removed, `virsh start`, the written line
#       (240 s) must name MARK twice; the guest is left running.
#   boot_and_read HOST DOM MARK [--running] [CONTEXT]
#       later boot: serial log removed, `virsh start`, the disk-marker line
#       (240 s), then the TPM-marker line (LAB_TPM_MARKER_WAIT s), both
#       must be MARK; then `virsh destroy` and "shut off" (30 s), unless
#       --running.  Both set BOOT_S (start to markers, s) and count BOOTS,
#       print a TIMING line, and `fail` with CONTEXT (default DOM) and what
#       was wrong.
#   lab_markers_written / lab_markers_read HOST DOM MARK
#       the waits and checks alone, for a guest already started: return 1
#       with the reason in LAB_MARKER_ERR (no `fail`: the demo says it its
#       way); LAB_MARKER_LINES holds the lines read.
#   lab_domstate HOST DOM, lab_wait_domstate HOST DOM STATE SECONDS
#   lab_ticks HOST DOM                 the NKP-TICK numbers in HOST's serial log
#   lab_restart_libvirtd HOST          libvirtd alone (running VMs stay), bounded
#   lab_vm_encrypt HOST ARGS…          nkpctl vm encrypt, retried on QEMU 7.2's
#                                      PBKDF benchmark flake (README pitfalls)
#   lab_vtpm_opens STATEFILE [KEYFILE] swtpm loads the vTPM state (with that key)
#   lab_leftovers HOST DISK STATEDIR   what a conversion may leave (temp files,
#                                      journal, scratch); empty when clean

# The TPM-marker line comes just before the disk-marker line, so it is
# normally in the log already; the bound only covers a serial log flushed in
# pieces on a loaded machine.  (The copies this replaces waited 5 or 10 s.)
: "${LAB_TPM_MARKER_WAIT:=10}"
BOOTS=0
BOOT_S=

lab_domstate() { lab_virsh "$1" domstate "$2" 2>/dev/null | head -n1; }

lab_wait_domstate() { # HOST DOM STATE SECONDS
    local i
    for ((i = 0; i < $4 * 5; i++)); do
        [ "$(lab_domstate "$1" "$2")" = "$3" ] && return 0
        sleep 0.2
    done
    return 1
}

lab_markers_written() { # HOST DOM MARK
    local line
    LAB_MARKER_ERR='' LAB_MARKER_LINES=''
    line=$(lab_wait_serial "$1" "$2" 'NKP-MARKERS-WRITTEN|NKP-ERROR' 240) \
        || { LAB_MARKER_ERR="no marker line within 240 s"; return 1; }
    LAB_MARKER_LINES=$line
    [ "$line" = "NKP-MARKERS-WRITTEN tpm=$3 disk=$3" ] || { LAB_MARKER_ERR="first boot said: $line"; return 1; }
}

lab_markers_read() { # HOST DOM MARK
    local line tline
    LAB_MARKER_ERR='' LAB_MARKER_LINES=''
    line=$(lab_wait_serial "$1" "$2" 'NKP-DISK-MARKER=|NKP-ERROR|NKP-MARKERS-WRITTEN' 240) \
        || { LAB_MARKER_ERR="no marker line within 240 s"; return 1; }
    tline=$(lab_wait_serial "$1" "$2" 'NKP-TPM-MARKER=' "$LAB_TPM_MARKER_WAIT") \
        || { LAB_MARKER_ERR="no TPM marker line (disk: $line)"; return 1; }
    LAB_MARKER_LINES="$tline"$'\n'"$line"
    [ "$line" = "NKP-DISK-MARKER=$3" ] || { LAB_MARKER_ERR="disk marker: $line (want $3)"; return 1; }
    [ "$tline" = "NKP-TPM-MARKER=$3" ] || { LAB_MARKER_ERR="TPM marker: $tline (want $3)"; return 1; }
}

# _lab_boot HOST DOM CONTEXT: serial log removed, virsh start (fail with its error)
_lab_boot() {
    local err
    rm -f "$(lab_serial_path "$1" "$2")"
    LAB_BOOT_T=$(lab_now)
    err=$(lab_virsh "$1" start "$2" 2>&1 >/dev/null) || fail "$3: virsh start: $err"
}

boot_and_write() { # HOST DOM MARK [CONTEXT]
    local ctx=${4:-$2}
    _lab_boot "$1" "$2" "$ctx"
    lab_markers_written "$1" "$2" "$3" || fail "$ctx: $LAB_MARKER_ERR"
    BOOT_S=$(lab_since "$LAB_BOOT_T")
    BOOTS=$((BOOTS + 1))
    timing "$ctx: first boot, start to markers written $BOOT_S s"
}

boot_and_read() { # HOST DOM MARK [--running] [CONTEXT]
    local h=$1 d=$2 mark=$3 running=0
    shift 3
    if [ "${1:-}" = --running ]; then running=1; shift; fi
    local ctx=${1:-$d}
    _lab_boot "$h" "$d" "$ctx"
    lab_markers_read "$h" "$d" "$mark" || fail "$ctx: $LAB_MARKER_ERR"
    BOOT_S=$(lab_since "$LAB_BOOT_T")
    BOOTS=$((BOOTS + 1))
    timing "$ctx: start to markers read $BOOT_S s"
    [ $running = 1 ] && return 0
    lab_virsh "$h" destroy "$d" >/dev/null || fail "$ctx: virsh destroy"
    lab_wait_domstate "$h" "$d" "shut off" 30 || fail "$ctx: not shut off after virsh destroy"
}

lab_ticks() { # HOST DOM
    lab_serial_lines "$1" "$2" | sed -n 's/^NKP-TICK \([0-9]*\)$/\1/p'
}

lab_restart_libvirtd() { # HOST: libvirtd only; running VMs stay, ephemeral secrets go
    local h pid i
    h=$(lab_hostdir "$1")
    pid=$(cat "$h/fs/run/libvirtd.pid")
    kill -TERM "$pid"
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    ! kill -0 "$pid" 2>/dev/null || fail "libvirtd of $1 did not stop"
    lab_exec "$1" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 libvirtd -d || fail "libvirtd of $1 did not start again"
    for ((i = 0; i < 120; i++)); do
        lab_exec "$1" timeout 10 virsh -q -c qemu:///system version >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    fail "libvirtd of $1 does not answer after the restart"
}

lab_vm_encrypt() { # HOST ARGS…: `nkpctl vm encrypt ARGS…`, up to 5 attempts
    local h=$1 i out
    shift
    for i in 1 2 3 4 5; do
        out=$(lab_exec "$h" nkpctl vm encrypt "$@" 2>&1) && return 0
        grep -q "Unable to get accurate CPU usage" <<<"$out" || break
        note "vm encrypt $*, attempt $i (QEMU's PBKDF benchmark): $out"
    done
    fail "vm encrypt $*: $out"
}

lab_vtpm_opens() { # STATEFILE [KEYFILE]: swtpm loads the state (with that key), as vm encrypt's own check does
    local d ok=1 key=() i
    d=$(mktemp -d "$LAB_DIR/vtpm.XXXXXX")
    cp "$1" "$d/tpm2-00.permall"
    [ -z "${2:-}" ] || key=(--key "pwdfile=$2,mode=aes-256-cbc")
    if swtpm socket --tpm2 --tpmstate "dir=$d" "${key[@]}" \
        --ctrl "type=unixio,path=$d/ctrl" --server "type=unixio,path=$d/srv" \
        --flags not-need-init --pid "file=$d/pid" --log "file=$d/log" -d 2>/dev/null; then
        for ((i = 0; i < 100; i++)); do [ -S "$d/ctrl" ] && break; sleep 0.05; done
        if swtpm_ioctl --unix "$d/ctrl" --save permanent "$d/blob" >/dev/null 2>&1 && [ -s "$d/blob" ]; then ok=0; fi
        swtpm_ioctl --unix "$d/ctrl" -s >/dev/null 2>&1 || true
        [ ! -s "$d/pid" ] || kill "$(cat "$d/pid")" 2>/dev/null || true
    fi
    rm -rf "$d"
    return $ok
}

lab_leftovers() { # HOST DISK STATEDIR
    ls -d "$2".nkp-* "$3"/*.nkp-* "$(lab_path "$1" /var/lib/nkp/journal)"/*.ini "$3"/../.nkp-work 2>/dev/null || true
}
