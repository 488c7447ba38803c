"""Issue 17, item 1: Hugging Face's idioms hold on a compiled model, for every zoo policy.

`generate()` returns the caller's own `input_ids` followed by the new tokens, so
``out[:, inputs["input_ids"].shape[1]:]`` is exactly the generated text (plain ids,
``return_dict_in_generate=True``, a left-padded batch with its attention mask), and
``pipeline("image-text-to-text", model=compiled, processor=...)`` gives the same text.

The reference for the new tokens is the same compiled model driven by hand: a prefill
forward on the short prompt (`rewrite_inputs`, tested in test_compiler_inputs.py), then one
forward per token through the cache, position ids from the mask as transformers makes them.
The processor is a real `LlavaProcessor` built here from local pieces (a word-level
tokenizer over tiny-llava's 256 ids, a `CLIPImageProcessor` for 336-pixel images).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import vtdsl.compiler as vc
from vtdsl.models import get_spec

from plain_refs import image_zoo
from tiny_clip import text_encoder_kwargs

ZOO = image_zoo()  # video methods (evs.vt) run on video in tests/conformance/test_evs.py
SPEC = get_spec("tiny-llava")
IMG, EOS = 255, 2  # tiny-llava's image token; its generation config's eos (also the padding of finished rows)
NEW = 4
# prompts with at least 4 text tokens each (DART takes 4 text pivots), of different lengths
TEXTS = ["w5 w6 <image> w7 w8 w9", "w9 w10 w11 <image> w12 w13 w14 w15 w16"]
VIT_ONLY = "policies/visionzip-64.vt"  # prunes at vit.out only: no LLM stage runs in decode


# ---------------------------------------------------------------------------- fixtures
def build_processor():
    """A `LlavaProcessor` for tiny-llava from local pieces: ids 3..254 are the words
    ``w3``..``w254``, 255 is ``<image>``; tokens decode concatenated (``Fuse``), so a
    sequence's text is its prompt's text followed by its new tokens' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    try:  # the PIL backend needs no torchvision
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    specials = {"<pad>": 0, "<s>": 1, "</s>": EOS, "<image>": IMG}
    vocab = {**specials, **{f"w{i}": i for i in range(3, IMG)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        padding_side="left", extra_special_tokens={"image_token": "<image>"})
    size = SPEC.image_size
    images = ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=SPEC.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def model():
    return SPEC.build(device="cpu", attn_implementation="sdpa", seed=0).eval()


@pytest.fixture(scope="module")
def processor():
    return build_processor()


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((SPEC.image_size,) * 2 + (3,)) * 255).astype(np.uint8)) for _ in TEXTS]


@pytest.fixture(scope="module")
def batch(processor, images):
    """Two prompts of different lengths, left-padded, one 336x336 image each."""
    inputs = dict(processor(images=images, text=TEXTS, return_tensors="pt", padding=True))
    assert inputs["input_ids"].shape[1] == 8 + 576 and (inputs["attention_mask"][0, :3] == 0).all()
    return inputs


def greedy_by_hand(model, inputs: dict, steps: int, *, placeholders: int = 576) -> torch.Tensor:
    """The new tokens of greedy decoding by forward calls: prefill on the short prompt,
    then one token at a time through the cache; a row that emitted EOS gets EOS after.
    `placeholders`: per image in `inputs`."""
    short = vc.rewrite_inputs(inputs["input_ids"], inputs["attention_mask"], image_token_id=IMG,
                              from_count=placeholders, to_count=vc.image_token_count(model))
    ids, mask, pixels = short["input_ids"], short["attention_mask"], inputs["pixel_values"]
    cache, tokens = None, []
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -ids.shape[1]:]
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True)
        cache = out.cache
        token = torch.where(done, EOS, out.logits[:, -1].argmax(-1))
        tokens.append(token)
        done |= token == EOS
        if done.all():
            break
        ids, pixels = token[:, None], None
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return torch.stack(tokens, dim=1)


# ---------------------------------------------------------------------------- every zoo policy
@pytest.mark.slow  # ~0.4 s a policy on one free core (the whole file: ~30 s)
@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_generate_returns_the_callers_prompt_then_the_new_tokens(model, batch, path):
    length = batch["input_ids"].shape[1]
    with vc.apply(path, model, **text_encoder_kwargs(path)), torch.no_grad():
        shortens = vc.image_token_count(model) != vc.original_image_token_count(model)
        out = model.generate(**batch, max_new_tokens=NEW, do_sample=False)
        full = model.generate(**batch, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
                              output_scores=True, output_logits=True)
        want = greedy_by_hand(model, batch, NEW)
    assert torch.equal(out[:, :length], batch["input_ids"])
    assert torch.equal(out[:, length:], want)
    assert torch.equal(full.sequences, out) and torch.equal(full["sequences"], out)
    assert len(full.scores) == len(full.logits) == out.shape[1] - length
    live = torch.cat([torch.ones_like(want[:, :1]), want[:, :-1] != EOS], dim=1).bool()  # rows not finished
    chosen = torch.stack([s.argmax(-1) for s in full.scores], dim=1)
    assert torch.equal(chosen[live], want[live])
    # the zoo reaches the rewrite: most policies shorten the prompt (the rest prune in the LLM)
    assert shortens or "llm." in path.read_text()


@pytest.mark.parametrize("path", ZOO, ids=[p.stem for p in ZOO])
def test_pipeline_text_equals_the_idiom(model, processor, images, path):
    from transformers import pipeline

    one = dict(processor(images=images[:1], text=TEXTS[:1], return_tensors="pt"))
    kwargs = dict(max_new_tokens=NEW, do_sample=False)
    with vc.apply(path, model, **text_encoder_kwargs(path)), torch.no_grad():
        out = model.generate(**one, **kwargs)
        pipe = pipeline("image-text-to-text", model=model, processor=processor)
        text = pipe(images=images[0], text=TEXTS[0], return_full_text=False, generate_kwargs=kwargs)
        ids = pipe(images=images[0], text=TEXTS[0], return_tensors=True, generate_kwargs=kwargs)
    new = out[0, one["input_ids"].shape[1]:]
    assert text[0]["generated_text"] == processor.decode(new, skip_special_tokens=True)
    assert torch.equal(ids[0]["generated_token_ids"], out[0])


# ---------------------------------------------------------------------------- generate's other arguments
def test_streamer_sees_the_callers_prompt_then_each_new_token(model, processor, batch):
    from transformers import TextIteratorStreamer
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    one = {"input_ids": batch["input_ids"][1:], "pixel_values": batch["pixel_values"][1:]}  # the unpadded row
    length = one["input_ids"].shape[1]
    recorder, text = Recorder(), TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with vc.apply(VIT_ONLY, model), torch.no_grad():
        out = model.generate(**one, max_new_tokens=NEW, do_sample=False, streamer=recorder)
        again = model.generate(**one, max_new_tokens=NEW, do_sample=False, streamer=text)
    assert torch.equal(again, out) and recorder.ended
    assert torch.equal(recorder.puts[0], one["input_ids"])
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in recorder.puts[1:]], dim=1), out[:, length:])
    assert "".join(text) == processor.decode(out[0, length:], skip_special_tokens=True)


def test_length_limits_count_the_callers_prompt(model, batch):
    length = batch["input_ids"].shape[1]
    with vc.apply(VIT_ONLY, model), torch.no_grad():
        by_new = model.generate(**batch, max_new_tokens=3, do_sample=False)
        by_total = model.generate(**batch, max_length=length + 3, do_sample=False)
        at_least = model.generate(**batch, min_length=length + 3, max_new_tokens=3, do_sample=False)
    assert by_new.shape[1] == length + 3 and torch.equal(by_total, by_new) and torch.equal(at_least, by_new)


def test_positional_prompt_and_inputs_keyword(model, batch):
    rest = {k: v for k, v in batch.items() if k != "input_ids"}
    with vc.apply(VIT_ONLY, model), torch.no_grad():
        named = model.generate(**batch, max_new_tokens=2, do_sample=False)
        positional = model.generate(batch["input_ids"], **rest, max_new_tokens=2, do_sample=False)
        inputs = model.generate(inputs=batch["input_ids"], **rest, max_new_tokens=2, do_sample=False)
    assert torch.equal(positional, named) and torch.equal(inputs, named)


def test_beams_repeat_the_callers_prompt_per_returned_sequence(model, batch):
    length = batch["input_ids"].shape[1]
    with vc.apply(VIT_ONLY, model), torch.no_grad():
        out = model.generate(**batch, max_new_tokens=2, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4
    assert torch.equal(out[:, :length], batch["input_ids"].repeat_interleave(2, dim=0))


def test_a_prompt_with_the_compiled_count_passes_through(model, processor, images):
    """A processor patched to the compiled count gives a short prompt: returned as given."""
    with vc.apply(VIT_ONLY, model), vc.processor_for(processor, model), torch.no_grad():
        short = dict(processor(images=images, text=TEXTS, return_tensors="pt", padding=True))
        out = model.generate(**short, max_new_tokens=NEW, do_sample=False)
        count = vc.image_token_count(model)
        want = greedy_by_hand(model, short, NEW, placeholders=count)
    length = short["input_ids"].shape[1]
    assert count < 576 and length == 8 + count
    assert torch.equal(out[:, :length], short["input_ids"]) and torch.equal(out[:, length:], want)


def test_uncompiled_generate_is_the_class_method_again(model, batch):
    with vc.apply(VIT_ONLY, model):
        assert "generate" in model.__dict__
    assert "generate" not in model.__dict__


# ---------------------------------------------------------------------------- LLaVA-NeXT
def test_llava_next_generate_returns_the_callers_prompt():
    """A ViT stage on tiny-llava-next (placeholder count from each call's image size):
    the new tokens are those the class's generate gives on the explicitly shortened prompt."""
    spec = get_spec("tiny-llava-next")
    model = spec.build(device="cpu", attn_implementation="sdpa", seed=0).eval()
    crop, n_img = spec.image_size, spec.for_image(2 * spec.image_size, 2 * spec.image_size).image_tokens
    rows = [[5, 6, 7] + [IMG] * n_img + [8, 9, 10], [11, 12, 13, 14, 15] + [IMG] * n_img + [18, 19, 20, 21]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left-padded
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 5, 3, crop, crop, generator=torch.Generator().manual_seed(3))  # base + 2x2 crops
    sizes = torch.tensor([[2 * crop, 2 * crop]] * 2)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_sizes=sizes)
    with vc.apply("at vit.layer2 keep cls top 8", model), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False)
        short = vc.rewrite_inputs(ids, mask, image_token_id=IMG, from_count=n_img,
                                  to_count=vc.image_token_count(model))
        before = type(model).generate(model, **{**inputs, **short}, max_new_tokens=NEW, do_sample=False)
        count = vc.image_token_count(model)
    assert count == 5 * 8 and short["input_ids"].shape[1] == width - n_img + count
    assert torch.equal(out[:, :width], ids)
    assert torch.equal(out[:, width:], before[:, short["input_ids"].shape[1]:])
