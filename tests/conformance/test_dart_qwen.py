"""DART's Qwen2-VL and Qwen2.5-VL files against the authors' rule for those families.

Reference: ZichenWen1/DART @ 5a19452fc173017191c247848673e0bde755695a, read in the fork
xqy1111111/DART (the authors' commits, unchanged under these paths):
Qwen2-VL/Qwen2VL_DART/modeling_qwen2_vl_self.py lines 337-365 and 401-445, and
Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py lines 1458-1510 and 1553-1597
(at layer K = 2: the output of layer 1 through the final norm, and layer 1's keys as the
cache holds them, with M-RoPE; TOKEN_TOPK = int(N * (1 - reduction_ratio) / 8); 4 image
pivots by the keys' L1 norm, 4 text pivots among every token after the image; each pivot
of `set(image_indices + query_indices)`, walked in set order, keeps the TOKEN_TOPK free
image tokens least cosine-similar to it; text pivots are not kept), and
lmms-eval/lmms_eval/models/qwen2_vl.py lines 306-308 (qwen2_5_vl.py lines 334-336): the
image runs from the first <|image_pad|> to <|vision_end|>. The plain model's own cache and
hidden states feed the rule, so nothing of vtdsl is on this side.
Two image sizes, 16x16 and 32x24 patches (64 and 192 merged tokens), each a size at which
the file's `far 22.2%` and DART's truncated count agree (12 and 44 tokens kept)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import IMPLS, SEEDS, qwen_image_case

FILES = {"dart-qwen2.5-vl": "tiny-qwen2.5-vl", "dart-qwen2-vl": "tiny-qwen2-vl"}
CLAIMS = dict.fromkeys(FILES, 1.0)  # the policies' `# conformance:` lines (1.0: equal kept sets)
REDUCTION_RATIO = 0.778
IMG, START, END = 250, 251, 252  # the tiny variants' <|image_pad|>, <|vision_start|>, <|vision_end|>
SIZES = ((16, 16), (32, 24))  # patches per side; the merged grid is half of each


def qwen_case(seed: int, rows: int, cols: int) -> dict:
    """One prompt: a question of 5 + seed random ids (`qwen_image_case`)."""
    return qwen_image_case(2000 + seed, rows, cols, 5 + seed)


def dart_keep(model, inputs: dict, by_position: bool = False, reduction_ratio: float = REDUCTION_RATIO,
              pivot_image_token: int = 4, pivot_text_token: int = 4) -> list[int]:
    """DART's kept image positions; `by_position` walks the pivots in position order
    instead of the set's (a control: the seeds must make the order matter somewhere)."""
    ids = inputs["input_ids"][0].tolist()
    image_token_start_index = ids.index(IMG)
    image_token_length = ids.index(END) - image_token_start_index
    with torch.no_grad():
        out = model(**inputs, use_cache=True, output_hidden_states=True)
        last_layer_state = model.model.language_model.norm(out.hidden_states[2])[0]  # layer 1's output
    keys = out.past_key_values.layers[1].keys[0]  # [kv heads, seq, head dim], M-RoPE applied
    k_states = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    token_topk = int(image_token_length * (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))
    end = image_token_start_index + image_token_length
    image_indices = (k_states[image_token_start_index:end].norm(p=1, dim=-1).topk(pivot_image_token).indices
                     + image_token_start_index).tolist()
    query_indices = (k_states[end:].norm(p=1, dim=-1).topk(pivot_text_token).indices + end).tolist()
    indices_set = set(image_indices + query_indices)
    valid = set(range(image_token_start_index, end)) - set(image_indices)
    valid_list = list(valid)
    for item in sorted(image_indices) + sorted(query_indices) if by_position else list(indices_set):
        cos_sim = -F.cosine_similarity(last_layer_state[item][None], last_layer_state[valid_list], dim=-1)
        chosen = [valid_list[i] for i in cos_sim.topk(token_topk).indices.tolist()]
        indices_set.update(chosen)
        valid.difference_update(chosen)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=[f"{r}x{c}" for r, c in SIZES])
@pytest.mark.parametrize("name", FILES)
def test_dart_keeps_what_dart_keeps_on_qwen(name, size, attn, qwen_models, qwen_compiled, once):
    models = qwen_models(FILES[name])
    for seed in SEEDS:
        inputs = qwen_case(seed, *size)
        want, _ = references(once, name, size, seed, models, inputs)
        got = sorted(qwen_compiled(name, models[attn], inputs)["llm.layer2#0"])
        n = size[0] * size[1] // 4
        assert len(want) == 4 + 8 * int(n * (1 - REDUCTION_RATIO) / 8), f"seed {seed}"
        assert got == want, f"seed {seed}"


def references(once, name, size, seed, models, inputs) -> list:
    """DART's kept set walking the pivots in its set order, and walking them by position
    (computed once per case, shared by both tests)."""
    return once((name, size, seed), lambda: [dart_keep(models["eager"], inputs, order) for order in (False, True)])


def test_dart_order_is_exercised_on_qwen(qwen_models, once):
    """Some case where a position-order walk keeps other tokens than DART's set order, so
    the equality above checks the order too."""
    differs = []
    for name, model_name in FILES.items():
        models = qwen_models(model_name)
        for size in SIZES:
            for seed in SEEDS:
                in_set_order, by_position = references(once, name, size, seed, models, qwen_case(seed, *size))
                differs.append(in_set_order != by_position)
    assert any(differs)