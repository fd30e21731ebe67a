"""Packed-document offsets are read on the host once per tensor (``lsp.kernels.offsets``): the
layers of a step share one ``cu_seqlens``, and on a GPU every read waits for the device."""

from __future__ import annotations

import gc

import pytest
import torch

import lsp
from lsp.kernels import offsets
from lsp.kernels.common.utils import Varlen
from lsp.testing import make_inputs, op_args


@pytest.fixture
def reads(monkeypatch):
    """Counts ``tolist()`` calls per tensor object."""
    seen: dict[int, int] = {}
    orig = torch.Tensor.tolist

    def counting(self):
        seen[id(self)] = seen.get(id(self), 0) + 1
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return seen


def test_offsets_are_read_once_per_tensor_and_again_after_an_in_place_change(reads):
    cu = torch.tensor([0, 3, 7, 12])
    assert offsets.host_offsets(cu) == (0, 3, 7, 12)
    assert offsets.host_offsets(cu) == (0, 3, 7, 12)
    assert reads[id(cu)] == 1
    cu[2] = 8  # in place: the version counter moves, the copy is stale
    assert offsets.host_offsets(cu) == (0, 3, 8, 12)
    assert reads[id(cu)] == 2
    other = cu.clone()  # same values, another tensor: its own read
    assert offsets.host_offsets(other) == (0, 3, 8, 12)
    assert reads[id(other)] == 1


def test_an_entry_goes_with_its_tensor():
    before = len(offsets._CACHE)
    cu = torch.tensor([0, 5, 9])
    offsets.host_offsets(cu)
    assert len(offsets._CACHE) == before + 1
    del cu
    gc.collect()
    assert len(offsets._CACHE) == before


def test_inference_tensors_are_read_every_time(reads):
    with torch.inference_mode():
        cu = torch.tensor([0, 2, 6])
    assert offsets.host_offsets(cu) == (0, 2, 6)
    assert offsets.host_offsets(cu) == (0, 2, 6)
    assert reads[id(cu)] == 2


def test_chunk_tables_are_built_once_per_tensor_and_chunk_size():
    cu = torch.tensor([0, 1, 33, 103, 104])
    a, b = Varlen.of(cu, 32), Varlen.of(cu, 32)
    assert a is b
    assert a.chunk_indices.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [3, 0]]
    c = Varlen.of(cu, 16)
    assert c is not a and c.NT == 1 + 2 + 5 + 1


def test_layers_sharing_offsets_read_them_once(reads):
    """Two op calls with one ``cu_seqlens`` (two layers of a step) read it on the host once."""
    args = make_inputs("delta_rule", "head", 1, 20, 2, 4, 3, with_state=False)
    cu = torch.tensor([0, 7, 8, 20])
    for _ in range(2):
        o, _ = lsp.ops.delta_rule(*op_args(args), cu_seqlens=cu, backend="torch")
    assert reads[id(cu)] == 1


def test_a_device_copy_is_made_once_and_knows_its_values(reads):
    cu = torch.tensor([0, 4, 9])
    moved = offsets.on_device(cu, torch.device("meta"))  # any other device: the copy is cached
    assert moved.device.type == "meta" and offsets.on_device(cu, torch.device("meta")) is moved
    assert offsets.host_offsets(moved) == (0, 4, 9)  # from the source: never read back
    assert id(moved) not in reads and reads[id(cu)] == 1
    assert offsets.on_device(cu, cu.device) is cu
