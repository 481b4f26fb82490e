"""Vocabulary, sequences, Block Encoder and Block Decoder: shapes, masks and the cache-free reference."""
from __future__ import annotations

import pytest
import torch

from kelix.llm.block_decoder import ParallelBlockDecoder, TransformerBlockDecoder
from kelix.llm.config import LLMConfig
from kelix.llm.sequences import IMAGE, TEXT, SequenceBuilder, collate
from kelix.llm.toy import toy_llm, toy_text_tokenizer
from kelix.llm.vocab import EMPTY, IGNORE, SPECIALS, Vocab

N, S, P = 4, 32, 4


@pytest.fixture(scope="module")
def text_tok():
    return toy_text_tokenizer()


@pytest.fixture(scope="module")
def llm(text_tok):
    return toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P)


def test_vocab_layout():
    v = Vocab(text_size=100, num_codebooks=3, codebook_size=10)
    assert v.codes_to_ids(torch.tensor([0, 9, 4])).tolist() == [100, 119, 124]
    assert v.codebook_range(2) == (120, 130)
    assert v.special_start == 130 and v.size == 130 + len(SPECIALS)
    assert len({v.boi, v.eoi, v.eob, v.gen, v.und, v.pad}) == len(SPECIALS)
    codes = torch.randint(0, 10, (5, 3))
    assert torch.equal(v.ids_to_codes(v.codes_to_ids(codes)), codes)


def test_block_encoder_sums_block_tokens_only(llm):
    table = llm.embedding_table()
    v = llm.vocab
    image = v.codes_to_ids(torch.tensor([1, 2, 3, 4]))
    text = torch.tensor([7, EMPTY, EMPTY, EMPTY])
    out = llm.block_encoder(torch.stack([image, text])[None], table)
    assert out.shape == (1, 2, llm.lm.config.hidden_size)
    torch.testing.assert_close(out[0, 0], table[image].sum(0))
    torch.testing.assert_close(out[0, 1], table[7])  # EMPTY slots add nothing; <eob> is never an input
    # An image block also gets the embedding of its grid position; a text block (-1) gets none.
    placed = llm.block_encoder(torch.stack([image, text])[None], table, torch.tensor([[3, -1]]))
    torch.testing.assert_close(placed[0, 0], out[0, 0] + llm.block_encoder.image_pos[3])
    torch.testing.assert_close(placed[0, 1], out[0, 1])


def test_visual_rows_come_from_codebook_projection(llm):
    table = llm.embedding_table()
    v = llm.vocab
    start, stop = v.codebook_range(1)
    expected = llm.block_encoder.codebook[1] @ llm.block_encoder.visual_proj[1]
    torch.testing.assert_close(table[start:stop], expected)


def test_sequences_targets_and_masks(llm, text_tok):
    v = llm.vocab
    b = SequenceBuilder(v, text_tok)
    codes = torch.randint(0, S, (P, N))
    und = b.understanding(codes, [("What colour is the circle?", "red")])
    gen = b.generation("a red circle", codes)
    batch = collate([und, gen], v)
    q_len, a_len = len(text_tok.encode("What colour is the circle?")), len(text_tok.encode("red"))
    und_len = 2 + P + 1 + q_len + a_len + 1
    gen_len = 1 + len(text_tok.encode("a red circle")) + 1 + P
    assert batch.blocks.shape == (2, max(und_len, gen_len), N)
    assert batch.attention_mask.sum(1).tolist() == [und_len, gen_len]
    # Understanding: targets only for the answer tokens and <eos>, each {token, <eob>}.
    kinds = batch.kinds[0]
    assert kinds.tolist().count(TEXT) == a_len + 1 and IMAGE not in kinds.tolist()
    first = int((kinds == TEXT).nonzero()[0])
    assert batch.targets[0, first, 0] == text_tok.encode("red")[0]
    assert batch.targets[0, first, 1] == v.eob and (batch.targets[0, first, 2:] == IGNORE).all()
    assert batch.targets[0, und_len - 2, 0] == text_tok.eos_id
    # Generation: the <boi> position and every image position but the last predict an image block.
    kinds = batch.kinds[1]
    assert kinds.tolist().count(IMAGE) == P and TEXT not in kinds.tolist()
    rows = batch.targets[1][kinds == IMAGE]
    assert torch.equal(rows[:, :N], v.codes_to_ids(codes)) and (rows[:, N] == v.eob).all()
    # Image blocks carry their grid positions, everything else -1.
    first_image = 1 + len(text_tok.encode("a red circle")) + 1
    assert batch.image_pos[1, first_image: first_image + P].tolist() == list(range(P))
    assert int((batch.image_pos[1] >= 0).sum()) == P
    # Padding is masked and never a target.
    assert (batch.kinds[1, gen_len:] == 0).all() and (batch.attention_mask[1, gen_len:] == 0).all()


def test_question_first_pairs_are_the_prompt_plus_answer_and_never_see_each_other(llm, text_tok):
    v = llm.vocab
    b = SequenceBuilder(v, text_tok, question_first=True)
    codes = torch.randint(0, S, (P, N), generator=torch.Generator().manual_seed(0))
    first, second = ("What colour is the circle?", "red"), ("Is there a red star?", "no")
    both = collate([b.understanding(codes, [first, second])], v)
    prompt = collate([b.understanding_prompt(codes, second[0])], v)
    q2, a2 = len(text_tok.encode(second[0])), len(text_tok.encode(second[1])) + 1
    n2 = q2 + 1 + P + 1 + a2  # question <boi> image <eoi> answer <eos>
    asked = slice(-n2, -a2)
    # The second question's blocks, positions and image positions are the inference prompt's after <und>.
    assert prompt.blocks[0, 0, 0] == v.und and prompt.blocks.shape[1] == 1 + n2 - a2
    assert torch.equal(both.blocks[0, asked], prompt.blocks[0, 1:])
    assert both.position_ids[0, asked].tolist() == prompt.position_ids[0, 1:].tolist()
    assert both.image_pos[0, asked].tolist() == prompt.image_pos[0, 1:].tolist()
    assert both.image_pos[0, -n2 + q2 + 1: -a2 - 1].tolist() == list(range(P))
    # Targets: the answers only (both questions' images are inputs), the first answer token after <eoi>.
    assert batch_kinds(both) == {TEXT: len(text_tok.encode(first[1])) + 1 + a2}
    assert both.targets[0, -a2 - 1, 0] == text_tok.encode(second[1])[0]

    def hidden(batch):
        return llm.hidden_states(batch.blocks, batch.attention_mask, batch.position_ids, image_pos=batch.image_pos,
                                 groups=batch.groups)[0]

    torch.testing.assert_close(hidden(both)[asked], hidden(prompt)[1:], atol=1e-5, rtol=1e-4)


def batch_kinds(batch) -> dict[int, int]:
    values, counts = batch.kinds[batch.kinds > 0].unique(return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def test_question_answer_pairs_never_see_each_other(llm, text_tok):
    b = SequenceBuilder(llm.vocab, text_tok)
    codes = torch.randint(0, S, (P, N), generator=torch.Generator().manual_seed(0))
    second = ("Is there a red star?", "no")
    both = collate([b.understanding(codes, [("What colour is the circle?", "red"), second])], llm.vocab)
    other = collate([b.understanding(codes, [("What colour is the circle?", "blue"), second])], llm.vocab)
    alone = collate([b.understanding(codes, [second])], llm.vocab)
    n2 = len(text_tok.encode(second[0])) + len(text_tok.encode(second[1])) + 1

    def hidden(batch, groups=True):
        return llm.hidden_states(batch.blocks, batch.attention_mask, batch.position_ids, image_pos=batch.image_pos,
                                 groups=batch.groups if groups else None)[0, -n2:]

    # The second pair sees the image, not the first pair, at the positions it would have alone.
    assert both.position_ids[0, -n2:].tolist() == alone.position_ids[0, -n2:].tolist()
    assert torch.equal(both.targets[0, -n2:], alone.targets[0, -n2:])
    torch.testing.assert_close(hidden(both), hidden(alone), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(hidden(both), hidden(other), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(hidden(both, groups=False), hidden(other, groups=False), atol=1e-5)


def test_captioning_sequence_targets_the_caption(llm, text_tok):
    b = SequenceBuilder(llm.vocab, text_tok)
    caption = "One object: a red circle."
    batch = collate([b.captioning(torch.randint(0, S, (P, N)), caption)], llm.vocab)
    tokens = batch.targets[0][batch.kinds[0] == TEXT][:, 0].tolist()
    assert tokens == text_tok.encode(caption) + [text_tok.eos_id]


def test_left_padding_puts_every_prompt_end_in_the_last_column(llm, text_tok):
    b = SequenceBuilder(llm.vocab, text_tok)
    batch = collate([b.generation_prompt("a red circle"), b.generation_prompt("")], llm.vocab, left_pad=True)
    assert (batch.blocks[:, -1, 0] == llm.vocab.boi).all()
    assert batch.attention_mask[1].tolist() == [0] * (batch.blocks.shape[1] - 2) + [1, 1]


@pytest.mark.parametrize("kind", ["transformer", "parallel"])
def test_block_decoder_shapes_and_incremental_equals_teacher_forcing(kind):
    torch.manual_seed(0)
    hidden = 32
    bd = (TransformerBlockDecoder(hidden, 16, 2, 4, 32, block_len=N + 1) if kind == "transformer"
          else ParallelBlockDecoder(hidden, 16, block_len=N + 1))
    for p in bd.parameters():  # zero-init output projections would hide wrong wiring
        torch.nn.init.normal_(p, std=0.2)
    h, embs = torch.randn(3, hidden), torch.randn(3, N, hidden)
    full = bd(h, embs)
    assert full.shape == (3, N + 1, hidden)
    for use_cache in (True, False):
        state, out = bd.start(h, use_cache)
        steps = [out] + [bd.step(state, embs[:, k], use_cache) for k in range(N)]
        torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_block_decoder_is_causal_within_the_block():
    torch.manual_seed(0)
    bd = TransformerBlockDecoder(32, 16, 1, 4, 32, block_len=N + 1)
    torch.nn.init.normal_(bd.proj_out.weight, std=0.2)
    h, embs = torch.randn(2, 32), torch.randn(2, N, 32)
    changed = embs.clone()
    changed[:, 2] += 1.0
    a, b = bd(h, embs), bd(h, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # outputs 0-2 predict tokens 0-2 and never see token 2
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_parallel_ablation_from_config(text_tok):
    llm = toy_llm(text_tok, LLMConfig(block_decoder="parallel"), num_codebooks=N, codebook_size=S)
    assert isinstance(llm.block_decoder, ParallelBlockDecoder)
    with pytest.raises(ValueError, match="block_decoder"):
        toy_llm(text_tok, LLMConfig(block_decoder="mlp"), num_codebooks=N, codebook_size=S)


def test_length_buckets_split_a_batch_into_shorter_pieces_with_the_same_loss_and_gradient(llm, text_tok):
    from kelix.llm.loss import bucketed_nbp_loss, nbp_loss

    b = SequenceBuilder(llm.vocab, text_tok)
    codes = torch.randint(0, S, (P, N), generator=torch.Generator().manual_seed(0))
    seqs = [b.understanding(codes, [("What colour is the circle?", "red"), ("How many objects are there?", "one")]),
            b.generation("a red circle", codes), b.captioning(codes, "One object: a small red circle."),
            b.generation("", codes), b.understanding(codes, [("Is there a red circle?", "yes")])]
    batch = collate(seqs, llm.vocab)
    lengths = batch.attention_mask.sum(1)
    pieces = batch.buckets(3)
    assert sorted(sum((p.attention_mask.sum(1).tolist() for p in pieces), [])) == sorted(lengths.tolist())
    assert [p.blocks.shape[1] for p in pieces] == [int(p.attention_mask.sum(1).max()) for p in pieces]
    assert [p.blocks.shape[1] for p in pieces] == sorted(p.blocks.shape[1] for p in pieces)  # shortest first
    assert sum(p.attention_mask.numel() for p in pieces) < batch.attention_mask.numel()

    def loss_and_grads(fn):
        llm.zero_grad(set_to_none=True)
        loss, metrics = fn()
        loss.backward()
        return float(loss.detach()), {k: float(v) for k, v in metrics.items()}, {k: p.grad.clone() for k, p in llm.named_parameters() if p.grad is not None}

    whole = loss_and_grads(lambda: nbp_loss(llm, batch))
    split = loss_and_grads(lambda: bucketed_nbp_loss(llm, batch, 3))
    llm.zero_grad(set_to_none=True)
    assert split[0] == pytest.approx(whole[0], rel=1e-5)
    for k in ("text_loss", "code_loss", "eob_loss", "text_acc"):
        assert split[1][k] == pytest.approx(whole[1][k], rel=1e-5), k
    assert whole[2].keys() == split[2].keys()
    for k, g in whole[2].items():
        torch.testing.assert_close(split[2][k], g, rtol=1e-4, atol=1e-6)
