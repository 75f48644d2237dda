#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): write throughput into a directory protected by the
# host key (fscrypt v2, AES-256-XTS contents, AES-256-CTS names: what
# hostkey.c sets) vs a plain directory, on the same loop-mounted ext4
# (mkfs.ext4 -O encrypt), in the same invocation, runs interleaved
# (protected, plain, protected, plain …).  Each run: `dd if=/dev/zero bs=1M
# count=SIZE conv=fsync` into a new file (so the figure includes the data
# reaching the loop device, not just the page cache), then the file removed.
# Prints every sample (MiB/s), then the medians and the ratio protected/plain.
#   bench/bench-hostkey-io.sh BUILD_DIR [RUNS] [SIZE_MIB]   (root; default 5, 256)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/bench-lib.sh"
BUILD=${1:?usage: bench-hostkey-io.sh BUILD_DIR [RUNS] [SIZE_MIB]}
RUNS=${2:-5}
SIZE_MIB=${3:-256}
die() { echo "bench-hostkey-io: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (loop mount, fscrypt key)"
for c in mkfs.ext4 mount dd python3; do command -v "$c" >/dev/null || die "missing command: $c"; done
helper="$BUILD/tests/test-hostkey"
[ -x "$helper" ] || die "build first: $helper is missing"

dir=$(mktemp -d "${TMPDIR:-/var/tmp}/nkp-bench-hostkey.XXXXXX")
cleanup() {
    umount "$dir/mnt" 2>/dev/null || umount -l "$dir/mnt" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

truncate -s "$((SIZE_MIB * 2 + 256))M" "$dir/fs.img"
mkfs.ext4 -q -F -O encrypt "$dir/fs.img"
mkdir "$dir/mnt"
mount -o loop "$dir/fs.img" "$dir/mnt"
mkdir "$dir/mnt/protected" "$dir/mnt/plain"
"$helper" --protect-empty "$dir/mnt/protected" || die "cannot protect the test directory"
lsattr -d "$dir/mnt/protected" | grep -q '^[^ ]*E' || die "the protected directory is not encrypted"

# dd's last line: "268435456 bytes (268 MB, 256 MiB) copied, 0.61 s, 440 MB/s"
mibps() { sed -n 's/^\([0-9]*\) bytes .* copied, \([0-9.e-]*\) s,.*/\1 \2/p' | awk '{printf "%.1f\n", $1 / 1048576 / $2}'; }

samples="$dir/samples"
: > "$samples"
for i in $(seq "$RUNS"); do
    for v in protected plain; do
        sync
        x=$(dd if=/dev/zero of="$dir/mnt/$v/file" bs=1M count="$SIZE_MIB" conv=fsync 2>&1 | mibps)
        [ -n "$x" ] || die "dd into $v failed"
        echo "run $i $v: $x MiB/s"
        echo "$v write_MiBps $x" >> "$samples"
        rm -f "$dir/mnt/$v/file"
    done
done
echo
echo "dd bs=1M count=$SIZE_MIB conv=fsync, $RUNS runs each, $(uname -r), $(nproc) CPUs"
bench_table "$samples" plain protected
