"""What upcycle keeps in its cache folder, and keeping it in check: list it, verify it, prune it.

The cache holds what upcycle fetched (the SmolLM2 folder, the benchmark data, the Shakespeare texts) and what it
derived and reuses (conversions for training, token streams, the demo's MoE, small indexes). Each entry is
published atomically and re-checked on reuse, so pruning only ever costs a rebuild. An entry is removed under the
same lock its builder takes (one that is being built is skipped) and renamed aside first, so no reader ever sees
half of one.
"""

from upcycle.cache.checks import verify_entries
from upcycle.cache.entries import CacheEntry, list_entries
from upcycle.cache.prune import PrunePlan, age_text, plan_prune, remove_entry

__all__ = ["CacheEntry", "PrunePlan", "age_text", "list_entries", "plan_prune", "remove_entry", "verify_entries"]
