"""Model Trainer: train byte-level BPE tokenizers and small GPT-2 models, locally or in pods."""

__version__ = "0.1.0"
