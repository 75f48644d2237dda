#!/bin/bash
# SPDX-License-Identifier: LGPL-2.1-or-later
# Benchmark (not a test): time to get a provider's KDK cold (key cache
# flushed: unseal from the TPM) and warm (from the kernel keyring cache),
# median and p95 over RUNS runs, against a throwaway swtpm (or the host's
# TPM with TCTI=device:/dev/tpmrm0).
#   bench/bench-tpm.sh [BUILD_DIR] [RUNS]
set -eu
build=${1:-build}
runs=${2:-200}
bin=$build/bench/bench-tpm
[ -x "$bin" ] || { echo "bench-tpm: build first (ninja -C $build)" >&2; exit 1; }
tmp=$(mktemp -d)
pid=
cleanup() {
	[ -n "$pid" ] && { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; }
	rm -rf "$tmp"
}
trap cleanup EXIT
tcti=${TCTI:-}
if [ -z "$tcti" ]; then
	port=$((20000 + RANDOM % 40000))
	mkdir -p "$tmp/tpm"
	swtpm socket --tpm2 --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
		--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" --tpmstate "dir=$tmp/tpm" \
		--flags not-need-init,startup-clear &
	pid=$!
	for _ in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null && break
		sleep 0.05
	done
	tcti="swtpm:host=127.0.0.1,port=$port"
fi
mkdir -p "$tmp/root/etc/nkp"
printf '[tpm]\ntcti=%s\n' "$tcti" >"$tmp/root/etc/nkp/nkp.conf"
"$bin" "$tmp/root" "$runs"
