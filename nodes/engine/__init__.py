"""The engine under the built-in nodes: recipes and the reconciler, live pipelines, checkpoints, LoRA files,
LoRA scale schedules, sampling mathematics, value types and the demo models. No node classes live here."""
