"""Kelix-DiT, the diffusion detokenizer: a SANA transformer trained with flow matching (model.py, flow.py),
its training through the shared loop (trainer.py), the aedit / dit-1 / dit-2 stages (stages.py) and the
text-to-image and reconstruction pipelines (pipeline.py)."""
