"""Stages: the catalogue and the one entry point that runs a stage anywhere.

A stage is data (Marin-executor style): a name, the stages whose outputs it reads, the config section and
train schedule it depends on, and the import path of its function `run(ctx: StageContext) -> metrics`.
Its key hashes its name, that config view, the dataset's content fingerprint and its inputs' keys; outputs
go to `<artifacts>/<stage>/<key>/` with a status marker, so an unchanged stage is skipped, a changed one
reruns with everything downstream, and a crashed one resumes from its checkpoints in the same folder.

  catalogue.py  what each stage is (Stage, STAGES, their order and dependencies) and what it is handed
  keys.py       a stage's key: its config view, the dataset fingerprint and its inputs' keys
  run.py        run_stage: lock the stage's folder, plan (skip, resume, start over), run, mark the outcome
  cli.py        `kelix stage run|list|keys` and `python -m kelix.stages ...` (what processes and pods run)

    python -m kelix.stages run tokenizer-1 --preset tiny --data data/shapes --artifacts artifacts
"""
