"""Evaluation: understanding (VQA), GenEval-style generation, reconstruction and tokenizer metrics.

metrics.py  pure metric functions over produced outputs     samples.py  what is asked of the model (test split)
run.py      evaluate_bundle: run a model, score, report     report.py   eval.json, eval.md, grid.png
stage.py    the `eval` stage (assembles the bundle)         cli.py      `kelix eval MODEL_URI`
"""
