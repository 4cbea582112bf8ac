"""Importing the optional ``ultralytics`` package (AGPL-3.0, the extra ``advdet[ultralytics]``) without its
side effects: at import ultralytics probes DNS to decide whether it is online, writes a ``settings.json``
under ``~/.config/Ultralytics``, replaces ``torch.save`` and ``PIL.Image.open`` with its own wrappers (the
latter pip-installs ``pi-heif`` when Pillow cannot identify a file) and changes print options, warning
filters and thread variables. :func:`import_ultralytics` sets ``YOLO_OFFLINE=1`` (no probe, no hub calls, no
event reporting) and ``YOLO_CONFIG_DIR=$ADVDET_HOME/ultralytics`` unless the user set them, and puts back
what the import changed."""

from __future__ import annotations

import importlib.util
import os

import torch

from advdet.data.errors import AdvdetError

__all__ = ["UltralyticsMissing", "available", "import_ultralytics"]


class UltralyticsMissing(AdvdetError):
    """The ``ultralytics`` extra is not installed."""


def available() -> bool:
    """True when the ``ultralytics`` package can be imported (without importing it)."""
    return importlib.util.find_spec("ultralytics") is not None


#: environment variables ultralytics sets at import (threads, log levels), restored by :func:`import_ultralytics`
_ENV_SET_BY_ULTRALYTICS = ("OMP_NUM_THREADS", "NUMEXPR_MAX_THREADS", "TF_CPP_MIN_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL",
                           "KINETO_LOG_LEVEL")


def import_ultralytics():
    """Import ultralytics offline and without writing outside ``$ADVDET_HOME``; returns the package.

    Sets ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR=$ADVDET_HOME/ultralytics`` where the user has not set them
    (before the first import, when ultralytics reads them), and undoes what its import changes for the whole
    process: ``torch.save`` and ``PIL.Image.open`` (replaced by its wrappers), torch's and numpy's print
    options, the warning filters and the thread / log-level variables of :data:`_ENV_SET_BY_ULTRALYTICS`."""
    if not available():
        raise UltralyticsMissing("the ultralytics adapter needs the optional extra: pip install 'advdet[ultralytics]' "
                                 "(ultralytics is AGPL-3.0, so advdet does not install it by default)")
    import sys

    if "ultralytics" not in sys.modules:
        from advdet.data.shapes import advdet_home

        os.environ.setdefault("YOLO_OFFLINE", "1")
        os.environ.setdefault("YOLO_CONFIG_DIR", str(advdet_home() / "ultralytics"))
        os.environ.setdefault("YOLO_VERBOSE", "False")
        import warnings

        import numpy as np

        # what ultralytics changes for the whole process at import, put back afterwards: torch.save, the
        # print options, warning filters and a few thread / log-level environment variables
        from PIL import Image

        save, np_print, filters = torch.save, np.get_printoptions(), list(warnings.filters)
        pil_open = Image.open
        env = {k: os.environ.get(k) for k in _ENV_SET_BY_ULTRALYTICS}
        try:
            import ultralytics
            import ultralytics.nn.tasks  # noqa: F401  (the model classes; imports ultralytics.utils.patches)
        finally:
            torch.save = save
            # ultralytics.utils.patches replaces PIL.Image.open with a wrapper that, on an unreadable image,
            # pip-installs pi-heif: advdet's readers must keep their own errors (and never install anything)
            Image.open = pil_open
            torch.set_printoptions(profile="default")
            np.set_printoptions(**np_print)
            warnings.filters[:] = filters
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import ultralytics

    return ultralytics
