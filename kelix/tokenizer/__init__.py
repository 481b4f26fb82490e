"""Kelix-Tok, the discrete image tokenizer (arXiv 2602.09843, section on Kelix-Tok).

config.py      TokenizerConfig and presets (tiny / small / paper)
encoder.py     SigLIP tower + 2x2 patch merge + adapter MLP
simvq.py       SimVQ sub-codebooks: multi (Kelix-Tok), shared, single; LayerNorm-ed matching, straight-through
kmeans.py      seeded, batched K-means initialisation of the frozen base codebooks
model.py       KelixTokenizer: encode / embed / codebook_vectors / save_pretrained / from_pretrained
aux_decoder.py the auxiliary Qwen3 decoder that reads quantized images as a prefix (discarded after training)
text_rows.py   caption and QA segments packed per image for the aux decoder
grounding.py   stage 1's grounded ViT warm-up: per-position object labels from boxes, a throwaway head
objective.py   what each stage trains (parameter groups) and its loss
evaluate.py    validation metrics: codebook use, perplexity, aux losses, VQA exact match
stages.py      the three training stages: align, pretrain, anneal
"""
