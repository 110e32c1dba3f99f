"""raysnet: the residual networks of He et al. 2015, trained on Ray, fed by FFCV, recorded in MLflow."""

__version__ = "0.1.0"
