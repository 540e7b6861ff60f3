"""flexlora: federated fine-tuning with heterogeneous LoRA ranks (FlexLoRA, Bai et al., NeurIPS 2024)."""

__version__ = "0.1.0"
