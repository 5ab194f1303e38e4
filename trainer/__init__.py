"""The learner: a compact student policy trained on recorded episodes (docs/trainer.md).

`trainer.features` (torch-free featuriser), `trainer.model` (the student),
`trainer.data` (episodes to labelled samples), `trainer.checkpoint` (the one
checkpoint format), `trainer.train` (the training script, `python -m trainer`),
`trainer.student` (the student as a rollout-loop policy), `trainer.metrics`.
Importing this package imports nothing heavy.
"""
