"""`clip_text`: Recoverable Compression's text score (arXiv:2409.01179; banjiuyufen/
Recoverable-Compression @ d9275944, llava/model/multimodal_encoder/clip_encoder.py,
`get_score_by_text`, lines 166-188).

Each patch's hidden state at the layer read (RC: the tower's last layer output,
`clip_text@vit.layer23` on LLaVA-1.5, before the post-layernorm as CLIP's
`last_hidden_state`) goes through CLIP's `visual_projection`; the score is its cosine with
the question's CLIP text embedding, times ``P ** -0.5`` (P the projection width), as RC
computes it. Both the text tower and the projection come from an auxiliary CLIP model the
user gives at compile time (`vtdsl.compiler.text_encoder`): the scorer reads it from
`ScoreContext.aux`, and the compiler refuses the policy, at the score, without one.

Cost: none counted. The projection (2·n·width·P), the cosines (2·n·P) and the text tower
(once per question) run in a model outside the checkpoint whose widths `vtdsl check` does
not know (docs/cost-model.md, "Scores outside the checkpoint").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import ScoreContext, ScorerInfo, register

if TYPE_CHECKING:
    from torch import Tensor


def _clip_text(ctx: ScoreContext) -> Tensor:
    if ctx.aux is None:  # the compiler refuses this before any call; a direct kernel call lands here
        raise ValueError("'clip_text' needs a CLIP text encoder (compile(..., text_encoder=DIR))")
    return ctx.aux.score(ctx.captured["h"][:, ctx.lead:])


register(ScorerInfo(
    "clip_text", ("vit",), canonical="clip_text", queries={(): "none"}, rank=85,
    projections=(), attention=False, rope=False, kernel=_clip_text,
    tower_error="'{name}' compares the vision tower's patches with the question (not at {where})",
    summary="cosine of the patch, through an auxiliary CLIP's visual projection, with the question's CLIP text "
            "embedding (Recoverable Compression; needs a text encoder)",
))
