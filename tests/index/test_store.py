"""The index folder's storage (clara.index.store): quantized memory vectors and what they cost."""

from __future__ import annotations

import pytest
import torch

from clara.index.store import QUANTIZED_RANGE, STORAGE_DTYPES, bytes_per_document, from_storage, to_storage


@pytest.mark.parametrize("storage_dtype", list(STORAGE_DTYPES))
def test_stored_vectors_read_back_within_their_dtype_precision(storage_dtype):
    memory = (
        torch.randn(6, 4, 64, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.01, 1, 30, 500])[:, None]
    )
    tensors = to_storage(memory, storage_dtype)
    assert tensors["memory"].dtype == STORAGE_DTYPES[storage_dtype]
    back = from_storage(tensors)
    # Relative to each memory vector's largest value: the scale per vector keeps small vectors as exact as large.
    error = ((back - memory).abs().amax(-1) / memory.abs().amax(-1)).max().item()
    bound = {"float32": 0, "float16": 1e-3, "bfloat16": 4e-3, "int8": 0.5 / 127 + 1e-6, "fp8": 0.07}[storage_dtype]
    assert error <= bound
    assert ("scale" in tensors) == (storage_dtype in QUANTIZED_RANGE)


def test_bytes_per_document_count_the_scales():
    assert bytes_per_document(8, 64, "float32") == 2048
    assert bytes_per_document(8, 64, "bfloat16") == 1024
    assert bytes_per_document(8, 64, "int8") == 512 + 8 * 4
    assert bytes_per_document(8, 64, "fp8") == 512 + 8 * 4
