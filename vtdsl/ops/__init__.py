"""Runtime ops: pure, batch-aware, deterministic torch functions the compiler calls.

- `attention`: attention rows recomputed from captured q/k projections.
- `scorers`: the scorer catalogue, one module per family (CLS attention, attention
  received, query attention, norms, values), each with its entries and kernels.
- `similarity`: the cosine matrix shared by similarity selectors.
- `select`: selectors (top-k, diverse, unique, uniform, random, buffers, regions).
- `counts`: adaptive counts (IQR outliers, FlowCut's entropy rule, RC's LOF share).
- `keep`: a union of selection terms (`keep a + b + ...`).
- `merge`: gather, contextual merge, ToMe merge, pooling, drop.

Every op does exactly the matmuls `docs/dev/contracts.md` counts and no other.

The names below are imported on first use (PEP 562): the torch-free front end imports
`vtdsl.ops.scorers` for its entries, and that must not import torch through this package.
"""

from .._lazy import lazy_attributes

__getattr__, __all__ = lazy_attributes(__name__, {
    "vtdsl.ops.attention": ("attention_probs", "repeat_kv", "split_heads"),
    "vtdsl.ops.scorers.attention": ("cls_attention", "attention_received", "query_attention", "text_raters"),
    "vtdsl.ops.scorers.norms": ("token_norm",),
    "vtdsl.ops.scorers.values": ("value_norm", "value_similarity"),
    "vtdsl.ops.similarity": ("pairwise_cosine",),
    "vtdsl.ops.select": ("topk", "diverse", "diverse_sum", "far", "unique", "uniform", "random", "buffers",
                         "split_chunks", "split_regions", "per_region", "proportional_shares", "softmax_shares"),
    "vtdsl.ops.counts": ("outlier_count", "entropy_count", "normalised_entropy", "lof_outliers", "lof_count"),
    "vtdsl.ops.keep": ("TermSpec", "select_union"),
    "vtdsl.ops.merge": ("gather_tokens", "merge_rest", "absorb_neighbours", "recycle_clusters", "recycle_cells",
                        "contextual_targets", "bipartite_merge", "pool2d", "pooled_grid", "drop_all"),
})
