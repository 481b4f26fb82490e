"""NBP decoding: KV cache vs none, CFG at scale 1, valid sub-codebook ids, batching, DiT conditions."""
from __future__ import annotations

import pytest
import torch

from kelix.llm.inference import answer_codes, generate_codes, image_hidden_states, sample
from kelix.llm.toy import toy_llm, toy_text_tokenizer

N, S, P = 4, 32, 6
PROMPTS = ["a red circle left of a blue square", "a green star", "yes"]


@pytest.fixture(scope="module")
def text_tok():
    return toy_text_tokenizer()


@pytest.fixture(scope="module")
def llm(text_tok):
    model = toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P).eval()
    # Untrained Block Decoders start as the identity (zero output projection): give them a say.
    torch.manual_seed(1)
    torch.nn.init.normal_(model.block_decoder.proj_out.weight, std=0.3)
    return model


def test_greedy_codes_with_kv_cache_equal_without(llm, text_tok):
    cached = generate_codes(llm, text_tok, PROMPTS, temperature=0)
    plain = generate_codes(llm, text_tok, PROMPTS, temperature=0, use_cache=False)
    assert cached.shape == (len(PROMPTS), P, N)
    assert torch.equal(cached, plain)
    assert len({tuple(c.flatten().tolist()) for c in cached}) > 1  # prompts matter, so the test can fail


def test_greedy_answers_with_kv_cache_equal_without(llm, text_tok):
    codes = torch.randint(0, S, (3, P, N), generator=torch.Generator().manual_seed(0))
    qs = ["What colour is the circle?", "How many objects are there?", "Is there a red star?"]
    cached = answer_codes(llm, text_tok, codes, qs, use_cache=True)
    assert cached == answer_codes(llm, text_tok, codes, qs, use_cache=False)
    assert all(cached) and len(set(cached)) > 1  # real, differing answers, so the comparison can fail


def test_batched_left_padded_answers_equal_one_at_a_time(llm, text_tok):
    codes = torch.randint(0, S, (2, P, N), generator=torch.Generator().manual_seed(1))
    qs = ["What colour is the circle?", "yes"]  # different lengths -> left padding
    together = answer_codes(llm, text_tok, codes, qs)
    alone = [answer_codes(llm, text_tok, codes[i: i + 1], qs[i: i + 1])[0] for i in range(2)]
    assert together == alone
    assert all(together)


def test_cfg_scale_one_equals_no_guidance(llm, text_tok):
    guided = generate_codes(llm, text_tok, PROMPTS, cfg_scale=1.0, seed=3)
    unguided = generate_codes(llm, text_tok, PROMPTS, cfg_scale=None, seed=3)
    assert torch.equal(guided, unguided)
    assert not torch.equal(generate_codes(llm, text_tok, PROMPTS, cfg_scale=4.0, seed=3), unguided)


def test_sampling_is_seeded(llm, text_tok):
    a = generate_codes(llm, text_tok, PROMPTS, seed=5, top_k=8, top_p=0.9)
    assert torch.equal(a, generate_codes(llm, text_tok, PROMPTS, seed=5, top_k=8, top_p=0.9))
    assert not torch.equal(a, generate_codes(llm, text_tok, PROMPTS, seed=6, top_k=8, top_p=0.9))


def test_greedy_flat_codes_with_kv_cache_equal_without(llm, text_tok):
    cached = generate_codes(llm, text_tok, PROMPTS, temperature=0, mode="flat")
    assert torch.equal(cached, generate_codes(llm, text_tok, PROMPTS, temperature=0, mode="flat", use_cache=False))


def test_a_prompts_codes_do_not_depend_on_its_batch(llm, text_tok):
    together = generate_codes(llm, text_tok, PROMPTS, seed=5, temperature=1.5)
    for i, prompt in enumerate(PROMPTS):
        assert torch.equal(together[i], generate_codes(llm, text_tok, [prompt], seed=5 + i, temperature=1.5)[0])
    # Sampled at this temperature, a different seed gives different codes, so the comparison can fail.
    assert not torch.equal(together[1], generate_codes(llm, text_tok, [PROMPTS[1]], seed=5, temperature=1.5)[0])


def test_more_image_positions_than_the_model_embeds_is_a_clear_error(text_tok):
    model = toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P).eval()
    with pytest.raises(ValueError, match=f"num_positions {P + 2} is more than the {P} image positions"):
        generate_codes(model, text_tok, PROMPTS[:1], num_positions=P + 2)
    assert generate_codes(model, text_tok, PROMPTS[:1], num_positions=P - 1).shape == (1, P - 1, N)


def test_top_k_and_top_p_keep_only_the_likeliest_ids():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    u = torch.rand(64, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, 1.0, 1, 1.0, u), greedy)
    assert torch.equal(sample(logits, 1.0, 0, 1e-6, u), greedy)
    assert torch.equal(sample(logits, 1.0, 0, 0.0, u), greedy)  # top_p=0 is greedy, not id 0
    assert torch.equal(sample(logits, 0.0, 0, 1.0, u), greedy)
    top3 = logits.topk(3).indices
    many = torch.stack([sample(logits, 1.0, 3, 1.0, torch.full((64,), q)) for q in torch.linspace(0, 0.999, 50)], 1)
    assert bool((many[..., None] == top3[:, None]).any(-1).all())
    assert len(set(many[0].tolist())) == 3  # all three are drawn, so the test sees sampling, not argmax
    # bf16 logits and u near 1 (which bf16 rounds to 1.0) still draw a kept id.
    edge = sample(logits.bfloat16(), 1.0, 2, 1.0, torch.full((64,), 0.9999))
    assert bool((edge[:, None] == logits.bfloat16().float().topk(2).indices).any(-1).all())
    # top_p: the kept ids are the smallest set, likeliest first, holding top_p of the mass.
    probs = logits.softmax(-1)
    order = probs.argsort(-1, descending=True)
    mass = probs.gather(-1, order).cumsum(-1)
    kept = (mass - probs.gather(-1, order) < 0.5)
    drawn = torch.stack([sample(logits, 1.0, 0, 0.5, torch.full((64,), q)) for q in torch.linspace(0, 0.999, 50)], 1)
    for row in range(64):
        allowed = set(order[row][kept[row]].tolist())
        assert set(drawn[row].tolist()) <= allowed


@pytest.mark.parametrize("mode", ["nbp", "flat"])
def test_codes_are_valid_ids_of_their_own_sub_codebook(text_tok, mode):
    model = toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P).eval()
    v = model.vocab
    with torch.no_grad():
        # Make every id outside sub-codebook i's range far likelier than any inside it: any leak shows up.
        w = model.lm.lm_head.weight
        w.mul_(0.01)
        w[: v.visual_start] += 5.0
        w[v.special_start:] += 5.0
        w[v.codebook_range(1)[0]: v.codebook_range(1)[1]] += 3.0
    codes = generate_codes(model, text_tok, PROMPTS, temperature=1.5, seed=0, mode=mode)
    assert codes.shape == (len(PROMPTS), P, N)
    assert int(codes.min()) >= 0 and int(codes.max()) < S
    ids = v.codes_to_ids(codes)
    for i in range(N):
        start, stop = v.codebook_range(i)
        assert bool(((ids[..., i] >= start) & (ids[..., i] < stop)).all())


def test_image_hidden_states_are_the_image_positions(llm, text_tok):
    codes = generate_codes(llm, text_tok, PROMPTS[:2], temperature=0)
    h = image_hidden_states(llm, text_tok, PROMPTS[:2], codes)
    assert h.shape == (2, P, llm.lm.config.hidden_size)
    # Row 1 alone (no padding) gives the same states: padding is masked and positions follow the mask.
    alone = image_hidden_states(llm, text_tok, PROMPTS[1:2], codes[1:2])
    torch.testing.assert_close(h[1], alone[0], atol=1e-5, rtol=1e-4)
    # Each image position sees its own block: changing the last code changes only the last state.
    changed = codes.clone()
    changed[:, -1, 0] = (changed[:, -1, 0] + 1) % S
    h2 = image_hidden_states(llm, text_tok, PROMPTS[:2], changed)
    torch.testing.assert_close(h2[:, :-1], h[:, :-1])
    assert not torch.allclose(h2[:, -1], h[:, -1])
