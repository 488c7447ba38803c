"""Former home of the score kernels, kept for the code that imports them from here: they
live in `vtdsl.ops.scorers`, one module per scorer family."""

from .scorers.attention import attention_received, cls_attention, query_attention, text_raters
from .scorers.norms import token_norm
from .scorers.values import value_norm, value_similarity

__all__ = ["cls_attention", "attention_received", "query_attention", "token_norm", "value_norm", "value_similarity",
           "text_raters"]
