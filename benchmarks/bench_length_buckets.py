"""Stage-2 LLM step time with the batch run as length buckets (`llm.length_buckets`) against one padded piece,
with the extra questions of `llm.extra_spatial_questions` / `extra_attribute_questions` (`--extra-questions`)
and `llm.extra_position_questions` (`--position-questions`), with the answer prior of `llm.answer_prior`
trained beside the LLM (`--answer-prior`), and with CPU number formats (`--precision`: `fp32`, `bf16` = bf16
autocast as on a GPU, `flush` = fp32 with denormals flushed to zero).

One tiny LLM (the preset's shapes, random init) trains on stage 2's mixture of the dataset's records with random
codes (sequence lengths, which are what padding costs, do not depend on the code values). The settings run
alternately in rounds of `--steps` steps so drift on a shared machine hits them alike; each reports the median
step time over its rounds and the loss of the first step (the same batch, so the same loss).

    .venv/bin/python benchmarks/bench_length_buckets.py --data data/shapes --steps 20 --rounds 3 --extra-questions 0
    .venv/bin/python benchmarks/bench_length_buckets.py --data data/shapes --buckets 4 --extra-questions 0,5
    .venv/bin/python benchmarks/bench_length_buckets.py --data data/shapes --buckets 4 --answer-prior 0,1 \
        --position-questions 0,3
    .venv/bin/python benchmarks/bench_length_buckets.py --data data/shapes --buckets 4 --answer-prior 1 \
        --position-questions 6 --precision fp32,bf16,flush --steps 10 --rounds 4
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelix.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

from kelix.config import load_config  # noqa: E402
from kelix.data.reader import iter_records  # noqa: E402
from kelix.llm.corpus import Mixture, Split  # noqa: E402
from kelix.llm.loss import bucketed_nbp_loss  # noqa: E402
from kelix.llm.model import KelixLLM  # noqa: E402
from kelix.llm.sequences import SequenceBuilder  # noqa: E402
from kelix.text import dataset_texts, train_text_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/shapes")
    parser.add_argument("--buckets", default="1,2,4", help="comma-separated settings to compare")
    parser.add_argument("--steps", type=int, default=20, help="steps per setting per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra-questions", default="5",
                        help="comma-separated counts of extra spatial and of extra attribute questions to compare")
    parser.add_argument("--position-questions", default="0", help="comma-separated counts to compare")
    parser.add_argument("--answer-prior", default="0", help="comma-separated 0 (off) / 1 (on) to compare")
    parser.add_argument("--precision", default="fp32", help="comma-separated fp32 / bf16 / flush to compare")
    parser.add_argument("--records", type=int, default=2000, help="training records to draw batches from")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config("tiny")
    lcfg, tcfg = cfg.llm, cfg.tokenizer
    records = list(iter_records(args.data, "train"))[: args.records]
    text_tok = train_text_tokenizer(dataset_texts(records), tcfg.text_vocab_size)
    n, s, p = tcfg.num_codebooks, tcfg.codebook_size, tcfg.num_positions
    g = torch.Generator().manual_seed(0)
    split = Split(records, torch.randint(0, s, (len(records), p, n), generator=g))
    torch.manual_seed(0)
    lcfg.answer_prior = True  # built once; the off setting hides it from the loss
    llm = KelixLLM.from_config(lcfg, n, s, text_tok.vocab_size, torch.randn(n, s, tcfg.code_dim), num_positions=p)
    llm.block_encoder.fold(llm.lm.get_input_embeddings())  # stage 2: one embedding table, everything trains
    opt = torch.optim.AdamW(llm.parameters(), lr=1e-4)
    inter = lcfg.interleaved_fraction
    cap = (1.0 - lcfg.generation_fraction - inter) * lcfg.caption_fraction
    mixtures = {(k, w): Mixture(SequenceBuilder(llm.vocab, text_tok), split, lcfg.train2.batch_size, 0,
                           understanding=1.0 - lcfg.generation_fraction - inter - cap, captioning=cap,
                           generation=lcfg.generation_fraction, interleaved=inter, max_blocks=lcfg.max_blocks,
                           extra_spatial=k, extra_attributes=k, extra_positions=w)
                for k in (int(x) for x in args.extra_questions.split(","))
                for w in (int(x) for x in args.position_questions.split(","))}
    prior = llm.answer_prior
    settings = [(b, k, a, p) for p in args.precision.split(",") for a in (int(x) for x in args.answer_prior.split(","))
                for k in mixtures for b in (int(x) for x in args.buckets.split(","))]

    def loss_of(b: int, k: tuple[int, int], a: int, p: str, step: int) -> torch.Tensor:
        llm.answer_prior = prior if a else None
        torch.set_flush_denormal(p == "flush")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p == "bf16"):
            return bucketed_nbp_loss(llm, mixtures[k](step), b)[0]

    times: dict[tuple[int, tuple[int, int], int, str], list[float]] = {x: [] for x in settings}
    with torch.no_grad():
        first_loss = {x: float(loss_of(*x, 0)) for x in settings}
    real = {k: sum(int(m(i).attention_mask.sum()) for i in range(args.steps)) for k, m in mixtures.items()}
    padded = {(b, k): sum(sum(x.attention_mask.numel() for x in mixtures[k](i).buckets(b)) for i in range(args.steps))
              for b, k, _, _ in settings}
    for _ in range(args.rounds):
        for x in settings:
            t0 = time.perf_counter()
            for i in range(args.steps):
                loss = loss_of(*x, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[x].append((time.perf_counter() - t0) / args.steps)
    torch.set_flush_denormal(False)
    base = statistics.median(times[settings[0]])
    print(f"| length_buckets | extra questions | position questions | answer prior | precision | s / step (median "
          f"of {args.rounds} rounds of {args.steps}) | vs the first | real blocks / step | padded / real blocks | "
          "first-step loss |")
    print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for b, k, a, p in settings:
        t = statistics.median(times[(b, k, a, p)])
        print(f"| {b} | {k[0]} | {k[1]} | {'on' if a else 'off'} | {p} | {t:.3f} | {base / t:.2f}x | "
              f"{real[k] / args.steps:.0f} | {padded[(b, k)] / real[k]:.2f} | {first_loss[(b, k, a, p)]:.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
