"""mmbalance: balanced multimodal training in PyTorch.

Importing the package imports nothing heavy: the registries (``mmbalance.methods.METHODS``,
``mmbalance.data.DATASETS``, ``mmbalance.models.ENCODERS`` / ``FUSION_HEADS``) import a component's
module when it is first asked for.
"""

__version__ = "0.1.0"
