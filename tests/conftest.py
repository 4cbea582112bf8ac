"""Shared test settings: one torch thread (tiny tensors run far faster on a busy 2-core machine), and a
private $ADVDET_HOME so tests never touch the user's cache."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _advdet_home(tmp_path_factory):
    if "ADVDET_HOME" not in os.environ:
        os.environ["ADVDET_HOME"] = str(tmp_path_factory.mktemp("advdet_home"))
    yield
