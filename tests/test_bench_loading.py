"""The one model loader of the benchmarks (advdet.bench.loading)."""

import pytest

from advdet.bench.loading import UntrainedModelError, load_detector, load_model
from advdet.models.zoo import zoo_entry


def test_load_detector_refuses_a_classifier_before_building_it():
    with pytest.raises(ValueError, match="'classifier' is a zoo classifier, not a detector"):
        load_detector("classifier", allow_untrained=True)


def test_origin_names_the_weights_or_untrained(tmp_path):
    entry = zoo_entry("ssd_vgg")
    assert entry.trained, "the zoo's ssd_vgg weights are missing"
    model, origin = load_detector("ssd_vgg")
    assert origin == str(entry.weights_path) and not model.training
    loaded = load_model("ssd_vgg", weights=entry.weights_path)
    assert loaded.origin == str(entry.weights_path) and loaded.trained
    # the result records the sha256 of the file it loaded, the one the card states for the shipped file
    assert loaded.info()["weights_sha256"] == entry.card["sha256"]
    assert load_model("ssd_vgg").info()["weights_sha256"] == entry.card["sha256"]


def test_a_zoo_model_without_weights_is_refused_unless_allowed(tmp_path, monkeypatch):
    import advdet.models.zoo as zoo

    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path / "empty_zoo")  # every entry without its file
    with pytest.raises(UntrainedModelError, match="zoo model 'fcos' has no trained weights.*--allow-untrained"):
        load_model("fcos")
    loaded = load_model("fcos", allow_untrained=True)
    assert loaded.origin == "untrained" and not loaded.trained and loaded.kind == "detector"
    assert loaded.info()["weights_sha256"] is None


def test_a_module_passed_in_is_used_as_given():
    from torch import nn

    class Tiny(nn.Module):
        input_size = 32

    loaded = load_model("my-model", model=Tiny())
    assert (loaded.kind, loaded.input_size, loaded.trained, loaded.origin) == ("classifier", 32, True, "given")
