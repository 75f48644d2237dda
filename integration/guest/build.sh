#!/bin/bash
# Build (or reuse from the cache) the lab's tiny test guest: a Debian 12
# distribution kernel plus a small initramfs (busybox-static, the host's
# tpm2-tools with their shared libraries, the virtio modules) whose /init
# writes a marker into a TPM NV index and onto /dev/vda on the first boot,
# reads both back on later boots, then ticks once a second.
#
# Usage: build.sh            prints two lines: KERNEL=<path> and INITRD=<path>
# Env:   NKP_LAB_CACHE       cache dir (default /var/cache/nkp-lab)
#        NKP_LAB_KERNEL_PKG  kernel package to use (default: what
#                            linux-image-amd64 depends on, else newest cached)
#
# Guest kernel command line (see the /init below):
#   nkp.marker=XYZ   marker to write on the first boot (default "nomarker")
#   nkp.poweroff=1   power off after writing / reading the markers
#   nkp.nvindex=0x1500016  the NV index to use
#   nkp.probe=1      print NKP-PROBE-OK and power off at once (accelerator probe)
#   nkp.marker2=XYZ  a second disk (issue 15, t-nkp-disks): when /dev/vdb is
#                    there, read its marker (NKP-DISK2-MARKER=X) or, when it
#                    has none, write XYZ onto it (NKP-DISK2-WRITTEN=XYZ)
#   nkp.efivar=1     (UEFI guests) also keep the marker in a non-volatile EFI
#                    variable NkpMarker-6e6b7000-75ef-4a1c-9d2b-6e6b70656669
#                    (efivarfs): written with the others, read back later
#   nkp.live=1       live data (issue 16, the copy tests): at boot, before the
#                    markers, print NKP-LIVE-FOUND n… (the n of every sector
#                    64..127 of /dev/vda holding "NKPLIVE <marker> n ", in
#                    sector order); then in the tick loop, each second, write
#                    sector 64 + (n % 64) as "NKPLIVE <marker> n " padded with
#                    NULs to 512 bytes (oflag=direct, conv=fsync: on the host's
#                    disk when NKP-LIVE n is printed) and print NKP-LIVE n.
#                    Sector 0 (the disk marker) is never written by it.
# ACPI power button (virsh shutdown): busybox acpid prints NKP-ACPI-POWEROFF,
# syncs and powers off.
# Serial console lines the tests read:
#   NKP-GUEST-UP, NKP-MARKERS-WRITTEN tpm=X disk=X, NKP-TPM-MARKER=X,
#   NKP-DISK-MARKER=X, NKP-DISK2-WRITTEN=X, NKP-DISK2-MARKER=X, NKP-DISK2-NONE,
#   NKP-TICK n, NKP-POWEROFF, NKP-ERROR <why>,
#   with nkp.live=1: NKP-LIVE-FOUND n… (before the TPM/disk lines), NKP-LIVE n,
#   with nkp.efivar=1: NKP-EFIVAR-WRITTEN=X or NKP-EFI-MARKER=X (before the
#   TPM/disk lines)
set -euo pipefail

cache=${NKP_LAB_CACHE:-/var/cache/nkp-lab}
mkdir -p "$cache/debs"
self="$(readlink -f "${BASH_SOURCE[0]}")"

exec 9>"$cache/.build.lock"
flock -w 900 9 || { echo "build.sh: cannot lock $cache/.build.lock" >&2; exit 1; }

log() { echo "build.sh: $*" >&2; }

# --- which kernel package ----------------------------------------------------
pkg=${NKP_LAB_KERNEL_PKG:-}
kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1 || true
}
if [ -z "$pkg" ]; then
    pkg=$(kernel_pkg)
    if [ -z "$pkg" ] && ! ls "$cache"/debs/linux-image-*.deb >/dev/null 2>&1; then
        log "no package lists: apt-get update"
        apt-get update -qq >&2 || true
        pkg=$(kernel_pkg)
    fi
fi
deb=
if [ -n "$pkg" ]; then
    deb=$(ls -1 "$cache/debs/${pkg}"_*.deb "$cache/debs/${pkg}-unsigned"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$deb" ]; then
        log "downloading ${pkg}-unsigned"
        ( cd "$cache/debs" && apt-get download -q "${pkg}-unsigned" >&2 2>/dev/null ) \
          || ( cd "$cache/debs" && apt-get download -q "${pkg}" >&2 ) \
          || log "apt-get download of $pkg failed"
        deb=$(ls -1 "$cache/debs/${pkg}"_*.deb "$cache/debs/${pkg}-unsigned"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    fi
fi
if [ -z "$deb" ]; then
    deb=$(ls -1 "$cache/debs"/linux-image-*-amd64*.deb 2>/dev/null | sort -V | tail -n1 || true)
fi
[ -n "$deb" ] || { log "no kernel package (apt-get download failed and cache empty)"; exit 1; }

key=$( { sha256sum "$self" | cut -d' ' -f1; basename "$deb"; sha256sum /bin/busybox /usr/bin/tpm2 | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/guest-$key"
if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
    touch "$out"        # in use: not pruned
    echo "KERNEL=$out/vmlinuz"
    echo "INITRD=$out/initrd.img"
    exit 0
fi

log "building guest in $out from $(basename "$deb")"
work=$(mktemp -d "$cache/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work" ./boot ./lib/modules
kver=$(ls "$work/lib/modules" | head -n1)
moddir="$work/lib/modules/$kver"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,lib/modules,lib64,lib/x86_64-linux-gnu,usr/lib/x86_64-linux-gnu}
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

# --- busybox + tpm2-tools ------------------------------------------------------
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp /usr/bin/tpm2 "$root/usr/bin/tpm2"
for t in nvdefine nvwrite nvread nvreadpublic nvundefine getcap startup pcrread; do
    ln -s tpm2 "$root/usr/bin/tpm2_$t"
done
libs() { ldd "$@" | awk '/=> \//{print $3} /^\t\/lib/{print $1}'; }
tcti=$(readlink -f /usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0)
{ libs /usr/bin/tpm2; libs "$tcti"; } | sort -u | while read -r l; do
    mkdir -p "$root$(dirname "$l")"
    cp -L "$l" "$root$l"
done
cp -L "$tcti" "$root/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"

# --- kernel modules (dependencies from each module's .modinfo) -----------------
declare -A modpath=()
while read -r f; do
    n=$(basename "$f" .ko); modpath[${n//-/_}]=$f
done < <(cd "$moddir" && find kernel -name '*.ko')
declare -A seen=()
order=()
addmod() {
    local m=${1//-/_} d deps
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    if [ -z "${modpath[$m]:-}" ]; then
        grep -q "/$1.ko\$" "$moddir/modules.builtin" 2>/dev/null && return 0
        grep -q "/${m}.ko\$" "$moddir/modules.builtin" 2>/dev/null && return 0
        log "module $m not found (and not built in)"; return 1
    fi
    deps=$(tr '\0' '\n' < "$moddir/${modpath[$m]}" | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do addmod "$d"; done
    order+=("$m")
}
for m in virtio_pci virtio_blk virtio_console tpm_crb tpm_tis evdev button; do addmod "$m"; done
addmod efivarfs || log "no efivarfs module: nkp.efivar=1 will say NKP-ERROR"
for m in "${order[@]}"; do
    cp "$moddir/${modpath[$m]}" "$root/lib/modules/$m.ko"
    echo "$m" >> "$root/etc/modules.order"
done
touch "$root/etc/modules.order"
log "modules: ${order[*]:-none}"

mkdir -p "$root/etc/acpi/PWRF"
cat > "$root/etc/acpi/PWRF/00000080" <<'ACPI'
#!/bin/sh
echo "NKP-ACPI-POWEROFF" > /dev/console
sync
poweroff -f
ACPI
chmod 755 "$root/etc/acpi/PWRF/00000080"

# --- /init -------------------------------------------------------------------
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
exec </dev/console >/dev/console 2>&1

marker=nomarker; poweroff=0; idx=0x1500016; ekcert=0; marker2=; efivar=0; live=0
for a in $(cat /proc/cmdline); do
    case "$a" in
        nkp.marker=*) marker=${a#nkp.marker=} ;;
        nkp.poweroff=1|nkp.poweroff) poweroff=1 ;;
        nkp.nvindex=*) idx=${a#nkp.nvindex=} ;;
        nkp.probe=1) echo "NKP-PROBE-OK"; poweroff -f ;;
        nkp.ekcert=1) ekcert=1 ;;
        nkp.marker2=*) marker2=${a#nkp.marker2=} ;;
        nkp.efivar=1) efivar=1 ;;
        nkp.live=1) live=1 ;;
    esac
done
echo "NKP-GUEST-UP $(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m.ko 2>/dev/null || true
done
# up to 60 s: a TCG guest on a loaded host may take long to probe its devices
n=0
while { [ ! -b /dev/vda ] || [ ! -c /dev/tpmrm0 ]; } && [ $n -lt 600 ]; do
    sleep 0.1; n=$((n+1))
done
[ -b /dev/vda ] || echo "NKP-ERROR no /dev/vda"
[ -c /dev/tpmrm0 ] || echo "NKP-ERROR no /dev/tpmrm0"
export TPM2TOOLS_TCTI=device:/dev/tpmrm0

# nkp.live=1: the live sectors an earlier boot (or the VM this disk was copied
# from) wrote, read before this boot writes any: the copy tests check that a
# restored or committed disk holds them.
if [ $live = 1 ]; then
    found=$(dd if=/dev/vda bs=512 skip=64 count=64 2>/dev/null | tr '\000' '\n' \
            | sed -n "s/^NKPLIVE $marker \([0-9][0-9]*\) \$/\1/p" | tr '\n' ' ')
    echo "NKP-LIVE-FOUND ${found% }"
fi

# nkp.efivar=1 (t-nkp-uefi): the marker in a non-volatile EFI variable, that
# is in the VM's UEFI NVRAM file on the host.  efivarfs takes a variable as
# one write: 4 bytes of attributes (NV|BS|RT = 7) then the value.  The
# GUID is nkp's own: Linux makes new names under the EFI global GUID immutable.
if [ $efivar = 1 ]; then
    ev=/sys/firmware/efi/efivars/NkpMarker-6e6b7000-75ef-4a1c-9d2b-6e6b70656669
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
    if [ ! -d /sys/firmware/efi/efivars ]; then
        echo "NKP-ERROR no EFI runtime (not booted by UEFI?)"
    elif [ -e "$ev" ]; then
        echo "NKP-EFI-MARKER=$(tail -c +5 "$ev")"
    else
        { printf '\007\000\000\000'; printf '%s' "$marker"; } > /tmp/ev
        if err=$(dd if=/tmp/ev of="$ev" bs=4096 2>&1); then
            echo "NKP-EFIVAR-WRITTEN=$marker"
        else
            echo "NKP-ERROR writing the EFI variable failed: $err"
        fi
    fi
fi

if tpm2_nvreadpublic "$idx" >/dev/null 2>&1; then
    tv=$(tpm2_nvread -C o -s 64 "$idx" 2>/dev/null | tr -d ' \000\n')
    set -- $(dd if=/dev/vda bs=512 count=1 2>/dev/null | tr '\000' '\n' | head -n1)
    if [ "${1:-}" = NKPDISK1 ]; then dv=${2:-}; else dv='<none>'; fi
    echo "NKP-TPM-MARKER=${tv:-<none>}"
    echo "NKP-DISK-MARKER=$dv"
else
    ok=1
    printf '%-64s' "$marker" > /tmp/m
    tpm2_nvdefine "$idx" -C o -s 64 -a "ownerread|ownerwrite" >/dev/null || ok=0
    tpm2_nvwrite "$idx" -C o -i /tmp/m || ok=0
    printf 'NKPDISK1 %s \n' "$marker" | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null || ok=0
    sync
    if [ $ok = 1 ]; then
        echo "NKP-MARKERS-WRITTEN tpm=$marker disk=$marker"
    else
        echo "NKP-ERROR writing markers failed"
    fi
fi
# issue 15 (t-nkp-disks): nkp.marker2=M, a marker on the second disk vdb.
if [ -n "$marker2" ]; then
    n=0
    while [ ! -b /dev/vdb ] && [ $n -lt 30 ]; do sleep 0.1; n=$((n+1)); done
    if [ ! -b /dev/vdb ]; then
        echo "NKP-DISK2-NONE"
    else
        set -- $(dd if=/dev/vdb bs=512 count=1 2>/dev/null | tr '\000' '\n' | head -n1)
        if [ "${1:-}" = NKPDISK2 ]; then
            echo "NKP-DISK2-MARKER=${2:-}"
        elif printf 'NKPDISK2 %s \n' "$marker2" | dd of=/dev/vdb bs=512 conv=sync,fsync 2>/dev/null; then
            sync
            echo "NKP-DISK2-WRITTEN=$marker2"
        else
            echo "NKP-ERROR writing the marker on /dev/vdb failed"
        fi
    fi
fi
# issue 7 (t-nkp-enrol): nkp.ekcert=1 prints the RSA EK certificate from NV
# index 0x01c00002 in base64, between NKP-EKCERT-BEGIN and NKP-EKCERT-END.
if [ $ekcert = 1 ]; then
    if tpm2_nvread -C o -o /tmp/ek.der 0x01c00002 >/dev/null 2>&1 ||
       tpm2_nvread -C 0x01c00002 -o /tmp/ek.der 0x01c00002 >/dev/null 2>&1; then
        echo "NKP-EKCERT-BEGIN"
        base64 /tmp/ek.der | sed 's/^/NKP-EKCERT /'
        echo "NKP-EKCERT-END"
    else
        echo "NKP-ERROR cannot read the EK certificate (NV 0x01c00002)"
    fi
fi
sync
acpid -c /etc/acpi -l /tmp/acpid.log 2>/dev/null || true
if [ $poweroff = 1 ]; then
    echo "NKP-POWEROFF"
    poweroff -f
fi
# nkp.live=1: one sector a second, never sector 0.  O_DIRECT where the disk
# takes it (else through the page cache), fsync either way: the sector is in
# QEMU's hands when NKP-LIVE n is printed.
direct=oflag=direct
i=0
while :; do
    echo "NKP-TICK $i"
    if [ $live = 1 ]; then
        s=$((64 + i % 64))
        if printf 'NKPLIVE %s %d ' "$marker" $i | dd of=/dev/vda bs=512 seek=$s conv=notrunc,sync,fsync $direct 2>/dev/null ||
           { [ -n "$direct" ] && direct= &&
             printf 'NKPLIVE %s %d ' "$marker" $i | dd of=/dev/vda bs=512 seek=$s conv=notrunc,sync,fsync 2>/dev/null; }; then
            echo "NKP-LIVE $i"
        else
            echo "NKP-ERROR writing live sector $s failed"
        fi
    fi
    i=$((i+1))
    sleep 1
done
INIT
chmod 755 "$root/init"

mkdir -p "$work/out"
cp "$work/boot/vmlinuz-$kver" "$work/out/vmlinuz"
( cd "$root" && find . -mindepth 1 | sed 's|^\./||' | busybox cpio -o -H newc 2>/dev/null ) | gzip -6 > "$work/out/initrd.img"
rm -rf "$out"
mv "$work/out" "$out"
# prune guests of other build.sh versions nobody used for 3 days
find "$cache" -maxdepth 1 -name 'guest-*' -type d -mtime +3 ! -path "$out" -exec rm -rf {} + 2>/dev/null || true
log "initrd $(du -h "$out/initrd.img" | cut -f1), kernel $kver"
echo "KERNEL=$out/vmlinuz"
echo "INITRD=$out/initrd.img"
