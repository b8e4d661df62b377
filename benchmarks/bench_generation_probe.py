"""What the generation probe adds to the config check, on real hub shapes (no weights needed).

For each config, side by side in one process: the forward probe the config check always ran (`compute_spec`) and the
generation probe (`generation_spec`: greedy generate() with the cache across every switch point up to 4160
tokens, on the config narrowed to one head). The config check runs both for the dense and the MoE config, so a
conversion pays about twice the sum. Prints seconds and the ratio generation / forward.

    .venv/bin/python benchmarks/bench_generation_probe.py
"""

from __future__ import annotations

import time

from upcycle.hf.probe import compute_spec, load_config
from upcycle.verify import generation_probe as generation

LLAMA3_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, vocab_size=128256, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)  # fmt: skip
MISTRAL_7B = dict(
    model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, sliding_window=4096, max_position_embeddings=32768, vocab_size=32000,
)  # fmt: skip
PHI3_MINI_4K = dict(
    model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, sliding_window=2047, max_position_embeddings=4096, original_max_position_embeddings=4096,
    vocab_size=32064, pad_token_id=32000,
)  # fmt: skip
SMOLLM2_135M = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, vocab_size=49152, rope_theta=100000.0,
    tie_word_embeddings=True,
)  # fmt: skip
CONFIGS = {
    "SmolLM2-135M": SMOLLM2_135M, "Llama-3.1-8B": LLAMA3_8B, "Mistral-7B": MISTRAL_7B, "Phi-3-mini-4k": PHI3_MINI_4K,
}  # fmt: skip


def main() -> None:
    print(f"{'config':16} {'switch points':>16} {'forward probe s':>16} {'generation probe s':>19} {'ratio':>6}")
    for name, config in CONFIGS.items():
        cfg = load_config(config)
        hooks = generation.class_hooks(generation.causal_lm_class(cfg))
        points = generation.switch_points([cfg], bool(hooks))
        start = time.perf_counter()
        compute_spec(config)
        forward = time.perf_counter() - start
        start = time.perf_counter()
        generation.generation_spec(config, points)
        generate = time.perf_counter() - start
        shown = ",".join(map(str, points)) or "-"
        print(f"{name:16} {shown:>16} {forward:16.2f} {generate:19.2f} {generate / forward:6.2f}")


if __name__ == "__main__":
    main()
