"""The unified LLM (Kelix report): Qwen3 over blocks with Next-Block Prediction.

vocab.py          extended vocabulary and the block sequence format
block_encoder.py  one LLM input per block (sum of its tokens' embeddings); visual rows from the codebooks
block_decoder.py  the small transformer that decodes a block's tokens from h_i (and the parallel ablation)
model.py          KelixLLM: Qwen3ForCausalLM + encoder + decoder; save/load
sequences.py      understanding / generation / interleaved sequences and padded batches
loss.py           the NBP training loss
inference.py      KV-cached batched decoding: answer, generate_codes (CFG), image_hidden_states; flat baseline
corpus.py         codes of every image (tokenizer frozen) and the stages' task mixtures
evaluate.py       VQA accuracy and teacher-forced losses
stages.py         llm-1 align, llm-2 unify, llm-3 anneal, llm-4 sft
toy.py            a random model and text tokenizer for tests and speed benchmarks
"""
