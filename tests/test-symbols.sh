#!/bin/sh
# The shared library exports exactly the functions its public header declares.
set -eu
header=$1 lib=$2
want=$(grep -oE '\bnkp_[a-z0-9_]+\(' "$header" | tr -d '(' | sort -u)
have=$(nm -D --defined-only "$lib" | awk '$2 == "T" { sub(/@.*/, "", $3); print $3 }' | sort -u)
if [ "$want" != "$have" ]; then
        echo "exported symbols differ from include/nkp/nkp.h:"
        diff -u /dev/fd/3 /dev/fd/4 3<<EOF3 4<<EOF4 || true
$want
EOF3
$have
EOF4
        exit 1
fi
echo "ok: $(echo "$want" | wc -l) public symbols exported, nothing else"
