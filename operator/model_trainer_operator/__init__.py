"""The kopf operator of model-trainer: one trainer pod per TokenizerJob or TrainingRun, status
mirrored from Redis, cancellation both ways. Only `handlers` imports kopf's decorators; the rest
are plain functions that tests call without kopf."""
