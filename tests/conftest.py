"""Shared test settings: one torch thread (tiny tensors run far faster on a busy 2-core machine), and a
private $ADVDET_HOME so tests never touch the user's cache; ``block_network`` for tests that must run offline."""

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _advdet_home(tmp_path_factory):
    if "ADVDET_HOME" not in os.environ:
        os.environ["ADVDET_HOME"] = str(tmp_path_factory.mktemp("advdet_home"))
    yield


def random_batchnorm(channels: int) -> torch.nn.BatchNorm2d:
    """A BatchNorm2d with random running statistics and affine parameters (eval mode is not an identity)."""
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


def _no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[:2]}")


def block_network(mp: pytest.MonkeyPatch) -> None:
    """Make every socket connection, send and name lookup fail the test (the adapters must build offline)."""
    import socket

    for name in ("connect", "connect_ex", "sendto"):
        mp.setattr(socket.socket, name, _no_network)
    mp.setattr(socket, "getaddrinfo", _no_network)
    mp.setattr(socket, "create_connection", _no_network)
