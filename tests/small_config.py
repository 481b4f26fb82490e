"""The tiny preset shrunk to seconds per stage: the config of the end-to-end and distributed tests.

Every architecture choice stays the tiny preset's (SigLIP + SimVQ, Qwen3 + NBP, SANA DiT); only widths, depths,
image sizes, evaluation sizes and step counts shrink.
"""
from __future__ import annotations

TOKENIZER = [
    "tokenizer.image_size=32", "tokenizer.patch_size=4", "tokenizer.vit_hidden_size=32", "tokenizer.vit_num_layers=1",
    "tokenizer.vit_num_heads=2", "tokenizer.vit_intermediate_size=64", "tokenizer.num_codebooks=2",
    "tokenizer.codebook_size=16", "tokenizer.code_dim=8", "tokenizer.base_dim=16", "tokenizer.embed_dim=32",
    "tokenizer.aux_hidden_size=32", "tokenizer.aux_num_layers=1", "tokenizer.aux_num_heads=2",
    "tokenizer.aux_num_kv_heads=1", "tokenizer.aux_intermediate_size=64", "tokenizer.text_vocab_size=320",
    "tokenizer.eval_images=16", "tokenizer.kmeans_images=64", "tokenizer.kmeans_iters=3",
    "tokenizer.aux_warmup.num_steps=2", "tokenizer.aux_warmup.batch_size=8",
    "tokenizer.vit_warmup.num_steps=2", "tokenizer.vit_warmup.batch_size=8",
]

SCHEDULES = ("tokenizer.train1", "tokenizer.train2", "tokenizer.train3", "llm.train1", "llm.train2", "llm.train3",
             "llm.train4", "dit.train1", "dit.train2", "dit.train_ae")


def schedules(*settings: str, sections: tuple[str, ...] = SCHEDULES) -> list[str]:
    """The same `settings` (e.g. "num_steps=3") for every stage schedule in `sections`."""
    return [f"{section}.{kv}" for section in sections for kv in settings]


SMALL = [
    "data.num_train=128", "data.num_val=32", "data.num_test=32",
    *TOKENIZER,
    "llm.hidden_size=32", "llm.num_layers=1", "llm.num_heads=2", "llm.num_kv_heads=1", "llm.head_dim=16",
    "llm.intermediate_size=64", "llm.bd_hidden_size=32", "llm.bd_num_heads=2", "llm.bd_intermediate_size=64",
    "llm.val_questions=16", "llm.val_records=8",
    "dit.image_size=16", "dit.num_layers=1", "dit.head_dim=16", "dit.cross_attention_dim=64", "dit.num_eval_images=4",
    "dit.sample_steps=2",
    "eval.num_vqa=8", "eval.num_generation_prompts=3", "eval.num_reconstructions=2", "eval.num_tokenizer_images=8",
    "eval.sample_steps=2",
    *schedules("num_steps=3", "batch_size=4", "checkpoint_every=2", "warmup_steps=1", "log_every=1"),
]
