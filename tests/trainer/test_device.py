"""The fine-tune picks its device: CUDA when torch sees a GPU, the CPU otherwise, never silently wrong."""

import pytest
import torch

from trapline.trainer.engine import FineTuneConfig


def test_auto_uses_cuda_exactly_when_torch_sees_a_gpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert FineTuneConfig().torch_device().type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no GPU"):
        FineTuneConfig(device="cuda").torch_device()


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        FineTuneConfig(device="tpu").validate()
