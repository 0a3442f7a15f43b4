"""jimray: joint unsupervised alignment and clustering of cryo-ET subtomograms with a 3D Jim-Net, on Ray."""

__version__ = "0.1.0"
