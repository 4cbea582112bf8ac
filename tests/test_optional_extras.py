"""The optional extras (issue 22) seen from an install without them: no zoo entry, a one-line user error naming
the extra, and advdet's own modules import without ultralytics or transformers. Runs with and without the
extras installed (their absence is simulated)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from advdet.data.errors import AdvdetError
from advdet.models import hf_rtdetr, ultralytics_adapter as ula, ultralytics_import, zoo


@pytest.fixture
def without_extras(monkeypatch):
    monkeypatch.setattr(ula, "available", lambda: False)
    monkeypatch.setattr(ultralytics_import, "available", lambda: False)
    monkeypatch.setattr(hf_rtdetr, "available", lambda: False)
    monkeypatch.setattr(zoo, "ZOO", {})  # registered again on first use, without the extras' entries


def test_no_zoo_entries_without_the_extras(without_extras):
    names = [e.name for e in zoo.zoo_entries()]
    assert "yolov8" not in names and "rtdetr" not in names and "yolov3" in names
    with pytest.raises(KeyError, match="unknown zoo model 'yolov8'"):
        zoo.zoo_entry("yolov8")


def test_hub_names_say_which_extra_to_install(without_extras):
    with pytest.raises(ula.UltralyticsMissing, match=r"pip install 'advdet\[ultralytics\]'.*AGPL"):
        zoo.build_model("ultralytics:yolov8n.yaml")
    with pytest.raises(hf_rtdetr.TransformersMissing, match=r"pip install 'advdet\[hf\]'"):
        zoo.build_model("hf:rtdetr_tiny")
    assert issubclass(ula.UltralyticsMissing, AdvdetError) and issubclass(hf_rtdetr.TransformersMissing, AdvdetError)
    assert zoo.is_external("ultralytics:best.pt") and zoo.is_external("hf:rtdetr_r18")


def test_advdet_imports_neither_ultralytics_nor_transformers():
    """The CLI, the zoo registry and the adapters' modules import neither package (AGPL code stays out of a
    process that does not build such a model)."""
    code = ("import sys, advdet.cli, advdet.models.zoo as z, advdet.models.ultralytics_adapter, "
            "advdet.models.hf_rtdetr; z.zoo_entries(); "
            "print(sorted(m for m in ('ultralytics', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
