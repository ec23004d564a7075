"""nanoPALM: the simplest, fastest repository for training and finetuning small-to-medium PaLM models."""

__version__ = "0.1.0"
