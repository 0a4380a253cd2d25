"""GPT-2 language models: training (train_model) and evaluation of finished models."""

from model_trainer.lm.evaluate import evaluate_model, evaluate_run_dir
from model_trainer.lm.train import TrainResult, train_model

__all__ = ["TrainResult", "evaluate_model", "evaluate_run_dir", "train_model"]
