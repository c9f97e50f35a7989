"""mmbalance: balanced multimodal training in PyTorch."""

from mmbalance import data, methods, models  # noqa: F401  (register the built-ins)

__version__ = "0.1.0"
