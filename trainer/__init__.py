"""The learner: trains the student (`agent.student`) on recorded episodes (docs/trainer.md).

`trainer.data` (episodes to labelled samples, shards, the in-memory dataset),
`trainer.train` (the training script, `python -m trainer`), `trainer.ranks`
(the job's ranks and bounded collectives), `trainer.publish` (validate and
publish versions), `trainer.resume` (optimizer state and step between runs),
`trainer.metrics` (metrics.jsonl, TensorBoard, curves). What the runtime and
the exporter also need of the student (featuriser, configs, the version
format, inference) is `agent.student`'s. Importing this package imports
nothing heavy; `trainer.train` imports torch.
"""
