"""The algorithm core: LoRA math, SVD routes, rank distributions and aggregators.

Pure torch (plus safetensors for adapter I/O): nothing here imports transformers, PEFT or Flower.
"""

from flexlora.core.errors import AdapterError, AggregationError
from flexlora.core.lora import LoraFactors, LoraUpdate, LowRank, lora_scale

__all__ = ["AdapterError", "AggregationError", "LoraFactors", "LoraUpdate", "LowRank", "lora_scale"]
