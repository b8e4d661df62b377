"""Hunyuan dense: Llama-like layers with per-head q/k RMSNorms applied after the rotation."""

from upcycle.convert.families.base import DenseModel, Family, llama_traits


def _head_dim(dense: DenseModel) -> str | None:
    if dense.resolved.get("head_dim") is None:
        return "config.json sets no head_dim, without which Hunyuan's classes cannot run (set it to hidden / heads)"
    return None


FAMILY = Family(
    model_type="hunyuan_v1_dense",
    title="Hunyuan (dense)",
    example="tencent/Hunyuan-7B-Pretrain",
    targets=("hunyuan_v1_moe",),
    traits=lambda c: llama_traits(c, block="hunyuan", qk_norm="head"),
    refusals=(_head_dim,),
)
