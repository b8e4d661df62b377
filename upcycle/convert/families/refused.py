"""Dense decoder families without an exact native MoE home that upcycle writes, each with the measured reason."""

_SANDWICH = "sandwich norms (after attention and after the MLP, as well as before) that no native MoE class has"
_NOT_GATED = "its MLP is not gated ({}), while native MoE experts are gated (SwiGLU)"
_PROBE = "an exact home ({}) exists, but the config-equivalence check cannot yet probe {}, so upcycle cannot prove it"

REFUSED: dict[str, str] = {
    "gemma": "Gemma scales embeddings by sqrt(hidden) and its norms by (1 + w), which Mixtral holds only after "
    "folding both into the weights (not supported yet)",
    "gemma2": f"Gemma 2 has {_SANDWICH}, and logit soft-capping",
    "gemma3": f"Gemma 3 has {_SANDWICH}, and two rotary tables",
    "gemma3_text": f"Gemma 3 has {_SANDWICH}, and two rotary tables",
    "gemma4": "Gemma 4's MoE block runs beside the dense MLP, each behind its own RMSNorm; the extra norm's epsilon "
    "makes it inexact (0.23 relative on the logits measured)",
    "gemma4_text": "Gemma 4's MoE block runs beside the dense MLP, each behind its own RMSNorm; the extra norm's "
    "epsilon makes it inexact (0.23 relative on the logits measured)",
    "vaultgemma": "VaultGemma soft-caps logits and scales queries by query_pre_attn_scalar",
    "glm4": f"GLM-4-0414 has {_SANDWICH}",
    "glm": "GLM-4 rotates interleaved pairs on part of each head; Glm4-MoE holds it only after permuting the q/k "
    "rows (not supported yet)",
    "helium": "Helium rotates interleaved pairs; Mixtral holds it only after permuting the q/k rows (not supported "
    "yet)",
    "qwen3_5": _PROBE.format("Qwen3.5-MoE", "its linear-attention layers"),
    "qwen3_5_text": _PROBE.format("Qwen3.5-MoE", "its linear-attention layers"),
    "olmo3": "FlexOlmo has no sliding-window attention, which OLMo 3 uses on most layers (0.88 relative measured)",
    "olmo": "OLMo v1 uses LayerNorm without weights, which no native MoE class has",
    "exaone4": "EXAONE 4 normalises the outputs of attention and MLP, while EXAONE-MoE normalises their inputs "
    "(1.4 relative measured)",
    "cohere": "Cohere v1 rotates every layer, while Cohere2-MoE rotates only windowed layers (7.3e-3 measured)",
    "hyperclovax": "HyperCLOVA X adds norms after attention and MLP and scales the residual stream",
    "youtu": "Youtu-LLM's exact home is DeepSeek-V3 (multi-head latent attention), which upcycle does not write yet",
    "apertus": _NOT_GATED.format("xIELU"),
    "arcee": _NOT_GATED.format("ReLU squared"),
    "nemotron": _NOT_GATED.format("ReLU squared") + ", and LayerNorm1p",
    "jais2": _NOT_GATED.format("ReLU squared") + ", and LayerNorm with biases",
    "starcoder2": _NOT_GATED.format("GELU") + ", and LayerNorm with biases",
    "nanochat": _NOT_GATED.format("ReLU squared") + ", and weightless norms",
    "stablelm": "StableLM uses LayerNorm with biases and partial rotary embeddings, which no native MoE class has",
    "diffllama": "DiffLlama's differential attention has no native MoE counterpart",
    "bitnet": "BitNet's quantised linear layers and sub-norms have no native MoE counterpart",
    "phimoe": "PhiMoE is already a mixture of experts",
}
