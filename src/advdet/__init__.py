"""advdet: adversarial robustness of object detectors (RAD and RobustDet) on PyTorch."""

__version__ = "0.1.0"
