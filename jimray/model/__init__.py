"""Jim-Net in 3D (pure torch): feature extractor, correlation layers, coarse-to-fine alignment branch,
cluster-prediction branch, and the training loss."""

from jimray.model.correlation import cosine_correlation, global_correlation, local_correlation
from jimray.model.decoders import ProcrustesDecoder
from jimray.model.jimnet import JimNet, JimNetOutput, parameter_count
from jimray.model.losses import jimnet_loss, rigid_regularizer

__all__ = [
    "JimNet",
    "JimNetOutput",
    "ProcrustesDecoder",
    "cosine_correlation",
    "global_correlation",
    "jimnet_loss",
    "local_correlation",
    "parameter_count",
    "rigid_regularizer",
]
