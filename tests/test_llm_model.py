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


def test_a_pretrained_qwen3_brings_its_own_text_tokenizer(tmp_path, text_tok):
    """With llm.pretrained the text ids must be the checkpoint's (they index its trained embedding rows), not
    the dataset BPE's; its special tokens are found by their Qwen names."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from kelix.llm.stages import text_tokenizer
    from kelix.text import TextTokenizer

    qwen_tok = Tokenizer(models.BPE())
    qwen_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    qwen_tok.train_from_iterator(["a green star left of a red circle"] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "qwen"
    qwen = Qwen3Config(vocab_size=qwen_tok.get_vocab_size() + 16, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    checkpoint = Qwen3ForCausalLM(qwen)
    checkpoint.save_pretrained(folder)
    qwen_tok.save(str(folder / "tokenizer.json"))

    bpe_dir = tmp_path / "tokenizer-3"
    text_tok.save(bpe_dir)
    assert text_tokenizer(LLMConfig(), bpe_dir).encode("a red star") == text_tok.encode("a red star")
    cfg = LLMConfig(pretrained=str(folder))
    mine = text_tokenizer(cfg, bpe_dir)
    ids = mine.encode("a green star")
    assert ids == qwen_tok.encode("a green star", add_special_tokens=False).ids
    assert (mine.pad_id, mine.bos_id, mine.eos_id) == (0, 1, 2)  # <|endoftext|>, <|im_start|>, <|im_end|>
    llm = KelixLLM.from_config(cfg, N, S, mine.vocab_size, torch.randn(N, S, 8), num_positions=P)
    rows = checkpoint.get_input_embeddings().weight
    assert torch.equal(llm.embedding_table()[ids], rows[ids])  # each id keeps the row it was trained with
    mine.save(tmp_path / "llm-1")  # what the stage ships beside its model, and the bundle loads
    assert TextTokenizer.load(tmp_path / "llm-1").eos_id == mine.eos_id
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json: a pretrained LLM needs its own tokenizer"):
        text_tokenizer(LLMConfig(pretrained=str(tmp_path)), bpe_dir)
