"""KelixLLM construction, visual embedding init and folding, save/load round trip."""
from __future__ import annotations

import json

import pytest
import torch

from kelix.llm.config import LLMConfig
from kelix.llm.inference import generate_codes
from kelix.llm.model import CONFIG_NAME, KelixLLM
from kelix.llm.toy import toy_llm, toy_text_tokenizer

N, S, P = 4, 32, 4


@pytest.fixture(scope="module")
def text_tok():
    return toy_text_tokenizer()


def _assert_same_state(a: KelixLLM, b: KelixLLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("folded", [False, True])
def test_save_load_round_trip(tmp_path, text_tok, folded):
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P)
    if folded:
        llm.fold_visual_embeddings()
    llm.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert meta["folded"] is folded and meta["num_positions"] == P
    back = KelixLLM.from_pretrained(tmp_path / "m")
    _assert_same_state(llm, back)
    assert back.block_encoder.folded is folded and back.vocab == llm.vocab
    a = generate_codes(llm.eval(), text_tok, ["a green star"], seed=1)
    assert torch.equal(a, generate_codes(back.eval(), text_tok, ["a green star"], seed=1))


def test_fold_keeps_the_embedding_table_and_drops_the_projection(text_tok):
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)
    before = llm.embedding_table().detach().clone()
    llm.fold_visual_embeddings()
    torch.testing.assert_close(llm.embedding_table(), before)
    names = [n for n, _ in llm.named_parameters()] + [n for n, _ in llm.named_buffers()]
    assert [n for n in names if n.startswith("block_encoder.")] == ["block_encoder.image_pos"]


def test_visual_init_codebook_vs_random(text_tok):
    vectors = torch.randn(N, S, 8)
    # Two codes with identical codebook vectors start with identical embeddings only under codebook init.
    vectors[0, 1] = vectors[0, 0]
    cfg = LLMConfig()
    llm = KelixLLM.from_config(cfg, N, S, text_tok.vocab_size, vectors)
    start, _ = llm.vocab.codebook_range(0)
    table = llm.embedding_table()
    torch.testing.assert_close(table[start], table[start + 1])
    rand = KelixLLM.from_config(LLMConfig(visual_embed_init="random"), N, S, text_tok.vocab_size, vectors)
    table = rand.embedding_table()
    assert not torch.allclose(table[start], table[start + 1])
    with pytest.raises(ValueError, match="codebook_vectors"):
        KelixLLM.from_config(cfg, N, S, text_tok.vocab_size, None)
    with pytest.raises(ValueError, match="codebook vectors are"):
        KelixLLM.from_config(cfg, N, S + 1, text_tok.vocab_size, vectors)


def test_a_pretrained_qwen3_loads_in_float32_with_a_head_of_its_own(tmp_path, text_tok):
    """Checkpoints are bf16 and the small Qwen3s tie lm_head to embed_tokens: loaded as they are, the fp32
    Block Decoder meets bf16 tensors, and stage 1 (Qwen3 frozen) trains the embeddings through the tied head."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kelix.llm.stages import set_trainable

    qwen = Qwen3Config(vocab_size=text_tok.vocab_size + 7, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    Qwen3ForCausalLM(qwen).to(torch.bfloat16).save_pretrained(tmp_path / "qwen")
    llm = KelixLLM.from_config(LLMConfig(pretrained=str(tmp_path / "qwen")), N, S, text_tok.vocab_size,
                               torch.randn(N, S, 8), num_positions=P)
    assert {p.dtype for p in llm.parameters()} == {torch.float32}
    embed, head = llm.lm.get_input_embeddings().weight, llm.lm.get_output_embeddings().weight
    assert head is not embed and torch.equal(head, embed)  # untied, starting from the same values
    trained = {id(p) for p in set_trainable(llm, 1)}
    assert id(head) in trained and id(embed) not in trained
    codes = generate_codes(llm.eval(), text_tok, ["a green star"], seed=1)  # no fp32/bf16 mix anywhere
    assert codes.shape == (1, P, N)
