"""LLM stages: what each stage freezes, exact resume through the shared loop, and the four stages end to end."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kelix.llm.config import LLMConfig
from kelix.llm.corpus import Mixture, Split
from kelix.llm.loss import nbp_loss
from kelix.llm.sequences import SequenceBuilder
from kelix.llm.stages import set_trainable
from kelix.llm.toy import toy_llm, toy_text_tokenizer
from kelix.train.config import TrainConfig
from kelix.train.loop import train

N, S, P = 4, 32, 4


@pytest.fixture(scope="module")
def text_tok():
    return toy_text_tokenizer()


def _trainable(llm) -> set[str]:
    return {n for n, p in llm.named_parameters() if p.requires_grad}


def test_stage1_trains_only_block_decoder_lm_head_and_visual_projection(text_tok):
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)
    set_trainable(llm, 1)
    names = _trainable(llm)
    expected = ({"lm.lm_head.weight", "block_encoder.visual_proj", "block_encoder.image_pos"}
                | {f"block_decoder.{n}" for n, _ in llm.block_decoder.named_parameters()}
                | {f"answer_prior.{n}" for n, _ in llm.answer_prior.named_parameters()})  # new, like the decoder
    assert names == expected
    assert not any(n.startswith("lm.model.") for n in names)  # Qwen3: layers, norms, text embeddings


def test_stage2_onward_train_everything_in_one_table(text_tok):
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)
    llm.fold_visual_embeddings()
    for stage in (2, 3, 4):
        set_trainable(llm, stage)
        assert _trainable(llm) == {n for n, _ in llm.named_parameters()}
        assert "lm.model.embed_tokens.weight" in _trainable(llm)
    with pytest.raises(ValueError, match="folded"):
        set_trainable(llm, 1)


def _records(k: int) -> list[dict]:
    colours, shapes = ["red", "green", "blue"], ["circle", "star", "square"]
    return [{"key": f"r{i}", "caption": f"One object: a {colours[i % 3]} {shapes[i % 3]}.",
             "prompt": f"a {colours[i % 3]} {shapes[i % 3]}",
             "qa": [{"q": f"What colour is the {shapes[i % 3]}?", "a": colours[i % 3], "type": "colour"},
                    {"q": "How many objects are there?", "a": "one", "type": "count"}]} for i in range(k)]


def _run(tmp_path, text_tok, name: str, crash_at: int | None) -> dict[str, torch.Tensor]:
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S, seed=0)
    params = set_trainable(llm, 1)
    split = Split(_records(12), torch.randint(0, S, (12, P, N), generator=torch.Generator().manual_seed(0)))
    mixture = Mixture(SequenceBuilder(llm.vocab, text_tok), split, batch_size=4, seed=0, understanding=0.3,
                      generation=0.4, interleaved=0.1, captioning=0.2)
    cfg = TrainConfig(num_steps=4, batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, log_every=1)

    def step_fn(model, batch):
        if crash_at is not None and step_fn.calls == crash_at:
            raise KeyboardInterrupt("simulated crash")
        step_fn.calls += 1
        return nbp_loss(model, batch)

    step_fn.calls = 0
    run_dir = tmp_path / name
    if crash_at is not None:
        with pytest.raises(KeyboardInterrupt):
            train(llm, [{"params": params}], mixture, step_fn, cfg, run_dir, progress=False)
        # A fresh process: new model object, same seed, resumes from the step-2 checkpoint.
        llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S, seed=0)
        params = set_trainable(llm, 1)
        step_fn.calls, crash_at = 0, None
        result = train(llm, [{"params": params}], mixture, step_fn, cfg, run_dir, progress=False)
        assert result.resumed_from == 2
    else:
        train(llm, [{"params": params}], mixture, step_fn, cfg, run_dir, progress=False)
    return {k: v.detach().clone() for k, v in llm.state_dict().items()}


def test_an_understanding_draw_without_questions_is_a_captioning_example(text_tok):
    """Imported records may have no QA: the understanding share must stay image-to-text, not turn into
    generation (caption dropout and all)."""
    import numpy as np

    from kelix.llm.sequences import IMAGE, TEXT

    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)
    records = [{**r, "qa": []} for r in _records(4)]
    split = Split(records, torch.randint(0, S, (4, P, N), generator=torch.Generator().manual_seed(0)))
    mix = Mixture(SequenceBuilder(llm.vocab, text_tok), split, batch_size=4, seed=0, understanding=1.0,
                  generation=0.0, interleaved=0.0, captioning=0.0)
    for seed in range(8):
        segs = mix.example(seed % 4, np.random.default_rng(seed))
        assert [seg.kind for seg in segs][-1] == TEXT and segs[-1].loss  # the caption is the target
        assert not any(seg.kind == IMAGE and seg.loss for seg in segs)  # no image is generated


def test_teacher_forced_text_loss_averages_only_batches_with_questions(text_tok):
    from kelix.llm.evaluate import teacher_forced_losses

    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S, num_positions=P).eval()
    codes = torch.randint(0, S, (8, P, N), generator=torch.Generator().manual_seed(0))
    with_qa = teacher_forced_losses(llm, text_tok, Split(_records(4), codes[:4]), limit=4, batch_size=4)
    records = _records(4) + [{**r, "qa": []} for r in _records(4)]
    mixed = teacher_forced_losses(llm, text_tok, Split(records, codes), limit=8, batch_size=4)
    assert mixed["val_text_loss"] == pytest.approx(with_qa["val_text_loss"])


def test_resume_after_crash_equals_uninterrupted(tmp_path, text_tok):
    straight = _run(tmp_path, text_tok, "straight", None)
    resumed = _run(tmp_path, text_tok, "crashed", crash_at=3)
    initial = toy_llm(text_tok, num_codebooks=N, codebook_size=S, seed=0).state_dict()
    assert not torch.equal(straight["lm.lm_head.weight"], initial["lm.lm_head.weight"])  # it did train
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_four_stages_end_to_end(tmp_path, tiny_dataset):
    """llm-1..4 with a random tokenizer on the shared tiny dataset, two steps each: outputs and metrics."""
    import kelix.tokenizer.model as tok_model
    from kelix.config import load_config
    from kelix.llm.inference import generate_codes
    from kelix.llm.model import KelixLLM
    from kelix.stages.catalogue import StageContext
    from kelix.text import TextTokenizer, dataset_texts, train_text_tokenizer
    from kelix.data.reader import iter_records
    from kelix.llm import stages

    cfg = load_config("tiny")
    small = TrainConfig(num_steps=2, batch_size=4, lr=1e-3, warmup_steps=0, checkpoint_every=2, log_every=1)
    cfg.llm = dataclasses.replace(cfg.llm, val_questions=8, val_records=4, train1=small, train2=small, train3=small, train4=small)
    tok_dir = tmp_path / "tokenizer-3"
    torch.manual_seed(0)
    tokenizer = tok_model.KelixTokenizer.from_config(cfg.tokenizer)
    tokenizer.save_pretrained(tok_dir / "model")
    train_text_tokenizer(dataset_texts(iter_records(tiny_dataset)), cfg.tokenizer.text_vocab_size).save(tok_dir)
    inputs = {"tokenizer-3": tok_dir}
    for i, fn in enumerate((stages.align, stages.unify, stages.anneal, stages.sft), start=1):
        out = tmp_path / f"llm-{i}"
        ctx = StageContext(name=f"llm-{i}", cfg=cfg, data_dir=tiny_dataset, inputs=dict(inputs), out_dir=out,
                           device=torch.device("cpu"), progress=False)
        metrics = fn(ctx)
        assert metrics["steps"] == 2 and 0.0 <= metrics["vqa_accuracy"] <= 1.0
        assert {"val_text_loss", "val_code_loss_0", f"val_code_loss_{tokenizer.num_codebooks - 1}"} <= set(metrics)
        assert (out / "model" / "model.safetensors").exists() and (out / "text_tokenizer.json").exists()
        inputs[f"llm-{i}"] = out
    llm = KelixLLM.from_pretrained(tmp_path / "llm-4" / "model")
    assert llm.block_encoder.folded and llm.num_positions == tokenizer.num_positions
    codes = generate_codes(llm.eval(), TextTokenizer.load(tmp_path / "llm-4"), ["a red circle"])
    assert codes.shape == (1, tokenizer.num_positions, tokenizer.num_codebooks)
    # The answer prior's kinds come from the training questions: colours, shapes, numbers, yes/no, directions.
    text_tok = TextTokenizer.load(tmp_path / "llm-4")
    kind = {w: int(llm.answer_prior.kind[text_tok.encode(w)[0]]) for w in ("red", "blue", "star", "one", "yes", "no")}
    assert kind["red"] == kind["blue"] >= 0 and kind["yes"] == kind["no"] >= 0
    assert len({kind["red"], kind["star"], kind["one"], kind["yes"]}) == 4


def test_the_tiny_presets_interleaved_sequences_fit_its_max_blocks(tiny_dataset):
    """Two images and their captions: cut at max_blocks, the second caption was never trained."""
    from kelix.config import load_config
    from kelix.data.reader import iter_records
    from kelix.llm.model import Vocab
    from kelix.text import dataset_texts, train_text_tokenizer

    cfg = load_config("tiny")
    t = cfg.tokenizer
    records = list(iter_records(tiny_dataset, "train"))
    tok = train_text_tokenizer(dataset_texts(records), t.text_vocab_size)
    builder = SequenceBuilder(Vocab(tok.vocab_size, t.num_codebooks, t.codebook_size), tok)
    longest = sorted(records, key=lambda r: len(tok.encode(r["caption"])))[-2:]
    codes = torch.zeros(t.num_positions, t.num_codebooks, dtype=torch.long)
    blocks = sum(len(seg.ids) for seg in builder.interleaved([(codes, r["caption"]) for r in longest]))
    assert blocks <= cfg.llm.max_blocks, f"{blocks} blocks > llm.max_blocks {cfg.llm.max_blocks}"


def test_question_first_understanding_asks_each_question_with_its_own_image(text_tok):
    import numpy as np

    from kelix.llm.sequences import IMAGE

    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)
    split = Split(_records(4), torch.randint(0, S, (4, P, N), generator=torch.Generator().manual_seed(0)))
    mix = Mixture(SequenceBuilder(llm.vocab, text_tok, question_first=True), split, batch_size=4, seed=0,
                  understanding=1.0, generation=0.0, questions=1)
    asked = set()
    for seed in range(8):
        segs = mix.example(0, np.random.default_rng(seed))
        images = [s for s in segs if s.kind == IMAGE]
        assert len(images) == 1 and images[0].group == 1 and not images[0].loss  # one question, one copy
        assert segs[0].ids[0, 0] == llm.vocab.und and segs[0].group == 0
        asked.add(tuple(segs[1].ids[:, 0].tolist()))  # the question comes first in its group
    assert len(asked) == 2  # either of the record's two questions, drawn per example


def test_extra_questions_ask_about_other_pairs_and_objects_after_the_records_own(text_tok):
    import numpy as np

    objects = [{"colour": "red", "shape": "circle", "x": 0.2, "y": 0.5},
               {"colour": "blue", "shape": "star", "x": 0.8, "y": 0.45},
               {"colour": "green", "shape": "square", "x": 0.5, "y": 0.9}]
    record = {**_records(1)[0], "objects": objects}
    record["qa"] = record["qa"] + [{"q": "Where is the red circle relative to the blue star?", "a": "left",
                                    "type": "spatial"}]
    codes = torch.zeros(1, P, N, dtype=torch.long)
    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S)

    def mixture(extra):
        return Mixture(SequenceBuilder(llm.vocab, text_tok), Split([record], codes), batch_size=1, seed=0,
                       understanding=1.0, generation=0.0, extra_spatial=extra)

    qa = [(x["q"], x["a"]) for x in record["qa"]]
    extra = mixture(3).extra_questions(record, qa, np.random.default_rng(0))
    assert len(extra) == 3 and not {q for q, _ in extra} & {q for q, _ in qa}
    want = {"Where is the blue star relative to the red circle?": "right",
            "Where is the green square relative to the red circle?": "below",
            "Where is the red circle relative to the green square?": "above",
            "Where is the blue star relative to the green square?": "above",
            "Where is the green square relative to the blue star?": "below"}
    assert all(want[q] == a for q, a in extra)
    assert len(mixture(9).extra_questions(record, qa, np.random.default_rng(0))) == 5  # every other ordered pair
    assert mixture(2).extra_questions({**record, "objects": objects[:1]}, qa, np.random.default_rng(0)) == []
    # Colour and shape questions: the record asks the circle's colour already, so 5 of the 6 remain.
    attrs = Mixture(SequenceBuilder(llm.vocab, text_tok), Split([record], codes), batch_size=1, seed=0,
                    understanding=1.0, generation=0.0, extra_attributes=9).extra_questions(record, qa, np.random.default_rng(0))
    assert sorted(attrs) == sorted([("What colour is the star?", "blue"), ("What colour is the square?", "green"),
                                    ("What shape is the red object?", "circle"), ("What shape is the blue object?", "star"),
                                    ("What shape is the green object?", "square")])
    # Where each object lies, against the image's centre (a centre on the line counts as below / right).
    where = Mixture(SequenceBuilder(llm.vocab, text_tok), Split([record], codes), batch_size=1, seed=0,
                    understanding=1.0, generation=0.0, extra_positions=2).extra_questions(record, qa, np.random.default_rng(0))
    places = {"red circle": "below left", "blue star": "above right", "green square": "below right"}
    named = {f"Where is the {n}?": a for full, a in places.items()
             for n in (full, full.split()[1], f"{full.split()[0]} object")}
    assert len(where) == 2 and set(where) < set(named.items())
    assert len(Mixture(SequenceBuilder(llm.vocab, text_tok), Split([record], codes), batch_size=1, seed=0,
                       understanding=1.0, generation=0.0, extra_positions=12).extra_questions(record, qa, rng=np.random.default_rng(0))) == 9
    # The record's own questions come first, drawn as without the option; the extra ones follow.
    plain, more = (mixture(k).example(0, np.random.default_rng(5)) for k in (0, 2))
    assert len(more) == len(plain) + 4  # two more groups of question and answer
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(plain, more))


def test_vqa_accuracy_scores_spatial_answers_by_axis_as_well(monkeypatch, text_tok):
    from kelix.llm import evaluate

    qa = [("Where is the red circle relative to the blue star?", "left", "spatial"),
          ("Where is the blue star relative to the red circle?", "right", "spatial"),
          ("Where is the green square relative to the red circle?", "below", "spatial"),
          ("What colour is the circle?", "red", "colour")]
    record = {"key": "r0", "qa": [{"q": q, "a": a, "type": t} for q, a, t in qa]}
    split = Split([record], torch.zeros(1, P, N, dtype=torch.long))
    said = ["Right.", "right", "left", "red"]  # wrong order, right, wrong axis, right
    monkeypatch.setattr(evaluate, "answer_codes", lambda llm, tok, codes, questions: said[: len(questions)])
    out = evaluate.vqa_accuracy(torch.nn.Identity(), text_tok, split)
    assert out["vqa_accuracy_spatial"] == pytest.approx(1 / 3)
    assert out["vqa_spatial_axis_accuracy"] == pytest.approx(2 / 3)
    assert out["vqa_accuracy"] == 0.5 and out["vqa_accuracy_colour"] == 1.0


def test_answer_prior_takes_what_the_question_predicts_and_decoding_reads_the_product(text_tok, tmp_path):
    from kelix.llm.answer_prior import question_bags
    from kelix.llm.inference import answer_codes
    from kelix.llm.model import CONFIG_NAME
    from kelix.llm.sequences import TEXT, collate

    torch.manual_seed(0)
    plain = toy_llm(text_tok, LLMConfig(answer_prior=False), num_codebooks=N, codebook_size=S, seed=0)
    llm = toy_llm(text_tok, LLMConfig(answer_prior=True), num_codebooks=N, codebook_size=S, seed=0)
    assert llm.answer_prior is not None and plain.answer_prior is None
    assert set(set_trainable(llm, 1)) >= set(llm.answer_prior.parameters())
    builder = SequenceBuilder(llm.vocab, text_tok)
    codes = torch.randint(0, S, (P, N), generator=torch.Generator().manual_seed(1))
    batch = collate([builder.understanding(codes, [("What colour is the star?", "blue"), ("How many?", "one")]),
                     builder.generation("a blue star", codes)], llm.vocab)

    # Each answer token's bag is its own group's text so far: question and earlier answer tokens, no image.
    text_at = (batch.kinds == TEXT).nonzero(as_tuple=True)
    inside = batch.groups[text_at] > 0
    rows, cols = text_at[0][inside], text_at[1][inside]
    tokens, mask = question_bags(batch.blocks, batch.groups, batch.image_pos, batch.attention_mask, rows, cols)
    for r, c, m in zip(rows, cols, mask):
        held = m.nonzero().squeeze(1)
        assert (batch.groups[r, held] == batch.groups[r, c]).all() and (batch.image_pos[r, held] < 0).all()
        assert int(held.max()) == int(c)
    assert len(torch.unique(batch.groups[rows, cols])) == 2

    # The prior trains on its own loss; answers are scored as the product, and the text metric reads it too.
    loss, metrics = nbp_loss(llm, batch)
    loss_plain, metrics_plain = nbp_loss(plain, batch)
    assert "answer_prior_loss" in metrics and float(loss.detach()) != pytest.approx(float(loss_plain.detach()))
    loss.backward()
    assert llm.answer_prior.out.weight.grad.abs().sum() > 0
    # A batch that asks nothing still gives the prior (zero) gradients: FSDP's collectives need every rank's.
    llm.zero_grad(set_to_none=True)
    nbp_loss(llm, collate([builder.generation("a blue star", codes)], llm.vocab))[0].backward()
    assert all(p.grad is not None and not p.grad.any() for p in llm.answer_prior.parameters())
    assert float(metrics["text_loss"]) != pytest.approx(float(metrics_plain["text_loss"]), abs=1e-4)
    with torch.no_grad():  # the product is normalised: a flat prior leaves every answer's loss as it was
        llm.answer_prior.out.weight.zero_()
        llm.answer_prior.out.bias.zero_()
        _, flat = nbp_loss(llm, batch)
    assert float(flat["text_loss"]) == pytest.approx(float(metrics_plain["text_loss"]), abs=1e-6)

    # Saved and loaded with the model; a model saved before the option existed loads without one.
    again = type(llm).from_pretrained(llm.save_pretrained(tmp_path / "m"))
    assert torch.equal(again.answer_prior.out.weight, llm.answer_prior.out.weight)
    old = plain.save_pretrained(tmp_path / "old")
    meta = json.loads((old / CONFIG_NAME).read_text())
    del meta["llm"]["answer_prior"]
    (old / CONFIG_NAME).write_text(json.dumps(meta))
    assert type(llm).from_pretrained(old).answer_prior is None

    # Decoding answers as the product: a flat prior changes nothing, a prior sure of one word gives that word.
    ask = ["What colour is the star?", "How many?"]
    both = codes[None].expand(2, -1, -1)
    assert answer_codes(llm.eval(), text_tok, both, ask) == answer_codes(plain.eval(), text_tok, both, ask)
    word = text_tok.encode("red")[0]
    with torch.no_grad():
        llm.answer_prior.out.bias[word] = 1e4
    assert answer_codes(llm, text_tok, both, ask, max_new_tokens=1) == [text_tok.decode([word])] * 2 != ["", ""]


def test_decoding_reads_the_priors_kind_of_answer_and_the_llms_choice_within_it(text_tok, tmp_path):
    from kelix.llm.answer_prior import answer_kinds, kind_log_probs
    from kelix.llm.inference import answer_scores
    from kelix.llm.model import WEIGHTS_NAME
    from safetensors.torch import load_file, save_file

    red, blue, green, one, two = (text_tok.encode(w)[0] for w in ("red", "blue", "green", "one", "two"))
    pairs = [("What colour is the star?", red), ("What colour is the star?", blue),
             ("What colour is the circle?", blue), ("What colour is the circle?", green),
             ("How many?", one), ("How many?", two)]
    kind = answer_kinds(pairs, text_tok.vocab_size)
    assert kind[red] == kind[blue] == kind[green] != kind[one] == kind[two] and (kind >= 0).sum() == 5
    logp = torch.randn(3, text_tok.vocab_size).log_softmax(-1)
    marginal = kind_log_probs(logp, kind)
    colours = torch.tensor([red, blue, green])
    assert torch.allclose(marginal[:, red].exp(), logp[:, colours].exp().sum(-1))
    assert torch.equal(marginal[:, kind < 0], logp[:, kind < 0])
    sure = torch.full((1, text_tok.vocab_size), -1e4).index_fill(1, torch.tensor([one]), 0.0)  # all on "one"
    assert torch.isfinite(kind_log_probs(sure, kind)).all()  # the colours' kind is ruled out, not -inf

    # Set by the stage from its mixture's questions (Mixture.question_answers), saved with the model.
    llm = toy_llm(text_tok, LLMConfig(answer_prior=True), num_codebooks=N, codebook_size=S, seed=0).eval()
    records = [{"key": f"r{i}", "caption": "", "prompt": "", "qa": [{"q": "What colour is the star?", "a": c},
                                                                     {"q": "How many objects are there?", "a": n}]}
               for i, (c, n) in enumerate((("red", "one"), ("blue", "two")))]
    mixture = Mixture(SequenceBuilder(llm.vocab, text_tok), Split(records, torch.zeros(2, P, N, dtype=torch.long)),
                      batch_size=2, seed=0, understanding=1.0, generation=0.0)
    llm.answer_prior.set_kinds(mixture.question_answers(), mixture.builder.encode)
    assert llm.answer_prior.kind[red] == llm.answer_prior.kind[blue] != llm.answer_prior.kind[one] >= 0
    folder = llm.save_pretrained(tmp_path / "m")
    assert torch.equal(type(llm).from_pretrained(folder).answer_prior.kind, llm.answer_prior.kind)
    # A prior sure of "red" still picks a colour, but which colour is the LLM's: the scores of the colours
    # differ by the LLM's log-probabilities alone.
    with torch.no_grad():
        llm.answer_prior.out.bias[red] = 1e4
        out = torch.randn(2, llm.lm.lm_head.weight.shape[1])
        scores = answer_scores(llm, out, [text_tok.encode("What colour is the star?")] * 2)
        own = llm.logits(out, 0, llm.vocab.text_size).log_softmax(-1)
    cols = (llm.answer_prior.kind[: llm.vocab.text_size] == llm.answer_prior.kind[red]).nonzero().squeeze(1)
    assert torch.allclose(scores[:, cols] - own[:, cols], scores[:, red:red + 1] - own[:, red:red + 1])
    assert torch.equal(scores.argmax(-1), cols[own[:, cols].argmax(-1)])
    # A model saved before kinds existed reads the whole prior, as it was trained to.
    state = load_file(folder / WEIGHTS_NAME)
    del state["answer_prior.kind"]
    save_file(state, folder / WEIGHTS_NAME)
    assert (type(llm).from_pretrained(folder).answer_prior.kind == -1).all()


@pytest.mark.parametrize("question_first", [False, True])
def test_question_text_is_the_answer_priors_bag_at_the_first_answer_token(text_tok, question_first):
    from kelix.llm.answer_prior import question_bags
    from kelix.llm.sequences import TEXT, collate

    llm = toy_llm(text_tok, num_codebooks=N, codebook_size=S, seed=0)
    builder = SequenceBuilder(llm.vocab, text_tok, question_first=question_first)
    qa = [("What colour is the star?", "blue"), ("How many objects are there?", "two")]
    batch = collate([builder.understanding(torch.zeros(P, N, dtype=torch.long), qa)], llm.vocab)
    text_at = (batch.kinds == TEXT).nonzero(as_tuple=True)
    for group, (q, a) in enumerate(qa, start=1):
        # The group's first text target is the answer's first token (questions are context, not targets).
        first = (batch.groups[text_at] == group).nonzero(as_tuple=True)[0][0]
        tokens, mask = question_bags(batch.blocks, batch.groups, batch.image_pos, batch.attention_mask,
                                     text_at[0][first][None], text_at[1][first][None])
        assert tokens[0][mask[0]].tolist() == builder.question_text(q)
