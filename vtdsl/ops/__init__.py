"""Runtime ops: pure, batch-aware, deterministic torch functions the compiler calls.

- `attention`: attention rows recomputed from captured q/k projections.
- `scores`: per-token scores (CLS attention, attention received, query attention, norms).
- `similarity`: the cosine matrix shared by similarity selectors.
- `select`: selectors (top-k, diverse, unique, uniform, random, buffers, regions).
- `counts`: adaptive counts (IQR outliers, FlowCut's entropy rule).
- `keep`: a union of selection terms (`keep a + b + ...`).
- `merge`: gather, contextual merge, ToMe merge, pooling, drop.

Every op does exactly the matmuls `docs/dev/contracts.md` counts and no other.
"""

from .attention import attention_probs, repeat_kv, split_heads
from .counts import entropy_count, normalised_entropy, outlier_count
from .keep import TermSpec, select_union
from .merge import (
    bipartite_merge,
    contextual_targets,
    drop_all,
    gather_tokens,
    merge_rest,
    absorb_neighbours,
    recycle_clusters,
    recycle_cells,
    pool2d,
    pooled_grid,
)
from .scores import (
    attention_received,
    cls_attention,
    query_attention,
    text_raters,
    token_norm,
    value_norm,
    value_similarity,
)
from .select import (
    buffers,
    diverse,
    diverse_sum,
    far,
    per_region,
    proportional_shares,
    random,
    split_chunks,
    split_regions,
    topk,
    uniform,
    unique,
)
from .similarity import pairwise_cosine

__all__ = [
    "attention_probs",
    "repeat_kv",
    "split_heads",
    "cls_attention",
    "value_norm",
    "value_similarity",
    "attention_received",
    "query_attention",
    "text_raters",
    "token_norm",
    "pairwise_cosine",
    "topk",
    "diverse",
    "diverse_sum",
    "far",
    "unique",
    "uniform",
    "random",
    "buffers",
    "split_chunks",
    "split_regions",
    "per_region",
    "proportional_shares",
    "outlier_count",
    "entropy_count",
    "normalised_entropy",
    "TermSpec",
    "select_union",
    "gather_tokens",
    "merge_rest",
    "absorb_neighbours",
    "recycle_clusters",
    "recycle_cells",
    "contextual_targets",
    "bipartite_merge",
    "pool2d",
    "pooled_grid",
    "drop_all",
]
