"""A training run, one module per step (read :mod:`visiontune.pipeline.run` first):

prepare.py    data, split, task, backbone, profiles and the plan (before any caching)
inputs.py     trunk activations cached or read; leakage reported
selection.py  training images carved out for the automatic choices
choices.py    the automatic choices, made once; plan.json written (decide_plan)
run.py        train_run: the recipe, top to bottom, and its steps (train, evaluate, save)
finish.py     what training leaves (Trained), logit adjustment, prior, target-domain evaluation
folds.py      --folds K: K runs and their ensemble

Nothing is imported here, so `import visiontune.pipeline.prepare` loads only what it needs.
"""
