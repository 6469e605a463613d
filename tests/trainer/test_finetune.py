"""Fine-tuning the embedding on real crops: deterministic under a seed, resumable, cancellable; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trapline.embedder.server import DEFAULT_VERSION
from trapline.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from trapline.trainer.engine import FineTuneConfig, Stopped, check_labels, finetune
from trapline.trainer.finetune import FineTuneParams, submit_finetune
from trapline.trainer.jobs import JobRunner
from trapline.trainer.models import ModelSpec, build, load_weights

from .conftest import few_crops


def _model(store):
    v = store.get(DEFAULT_VERSION)
    return build(ModelSpec.from_dict(v.manifest["architecture"]).arch, weights=load_weights(v.weights_path))


def _tiny(real_crops):
    crops = few_crops(real_crops, classes=3, per_class=2)
    return [c.pixels for c in crops], [c.label for c in crops]


CFG = dict(epochs=2, classes_per_batch=3, crops_per_class=2, train_blocks=1, seed=7)


def test_finetune_is_deterministic_and_changes_only_trainable_stages(store, real_crops):
    pixels, labels = _tiny(real_crops)
    a, b = _model(store), _model(store)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    sa = finetune(a, pixels, labels, FineTuneConfig(**CFG))
    finetune(b, pixels, labels, FineTuneConfig(**CFG))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), f"{k} differs between two runs with the same seed"
    changed = {k.split(".")[0] for k, v in a.state_dict().items() if not torch.equal(v, before[k])}
    assert "head" in changed
    assert not torch.equal(a.backbone.net._conv_head.weight, before["backbone.net._conv_head.weight"])
    assert torch.equal(a.backbone.net._conv_stem.weight, before["backbone.net._conv_stem.weight"])
    assert np.isfinite(sa["final_loss"]) and sa["steps"] == 2


def test_a_run_resumed_from_its_checkpoint_ends_where_an_uninterrupted_one_does(store, real_crops, tmp_path):
    pixels, labels = _tiny(real_crops)
    straight = _model(store)
    finetune(straight, pixels, labels, FineTuneConfig(**CFG))
    ckpt = tmp_path / "ckpt.pt"
    crashed = _model(store)
    calls = {"n": 0}

    def stop_in_second_epoch():
        calls["n"] += 1
        return calls["n"] > 1  # epoch 1 (one step) completes and is checkpointed; epoch 2 is cut

    with pytest.raises(Stopped):
        finetune(crashed, pixels, labels, FineTuneConfig(**CFG), should_stop=stop_in_second_epoch, checkpoint=ckpt)
    assert ckpt.is_file()
    resumed = _model(store)
    stats = finetune(resumed, pixels, labels, FineTuneConfig(**CFG), checkpoint=ckpt)
    assert stats["resumed_from_epoch"] == 1
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(v, resumed.state_dict()[k], msg=f"{k} differs after resume")


def test_cross_entropy_is_available_as_the_comparison(store, real_crops):
    pixels, labels = _tiny(real_crops)
    m = _model(store)
    stats = finetune(m, pixels, labels, FineTuneConfig(**{**CFG, "epochs": 1, "loss": "cross_entropy"}))
    assert np.isfinite(stats["final_loss"])


def test_label_checks():
    with pytest.raises(ValueError, match="two classes"):
        check_labels(["a", "a", "a"])
    with pytest.raises(ValueError, match="two crops each"):
        check_labels(["a", "b", "c", "c"])


@pytest.fixture
def runner(tmp_path):
    r = JobRunner(tmp_path / "jobs", {"fine_tune": lambda ctx: {}})
    yield r
    r.close()


@pytest.mark.parametrize("labels, text", [
    (["zebra"] * 4, "at least two classes"),
    (["zebra", "lion", "gazelle", "eland"], "at least two crops each"),
    (["zebra", "zebra", "lion", ""], "needs a label"),
])
def test_submit_rejects_too_few_classes_or_crops(runner, store, real_crops, labels, text):
    jpegs = [c.jpeg() for c in real_crops[:4]]
    with pytest.raises(InvalidArgument, match=text):
        submit_finetune(runner, store, FineTuneParams(), jpegs, labels)
    assert runner.jobs() == [], "a rejected request must not leave a job behind"


def test_submit_rejects_bad_crops_versions_and_parameters(runner, store, real_crops):
    jpegs = [c.jpeg() for c in real_crops[:4]]
    labels = ["a", "a", "b", "b"]
    with pytest.raises(InvalidArgument) as err:
        submit_finetune(runner, store, FineTuneParams(base_version=DEFAULT_VERSION), jpegs[:3] + [b"junk"], labels)
    assert err.value.field == "crops[3]"
    with pytest.raises(NotFound):
        submit_finetune(runner, store, FineTuneParams(base_version="v404"), jpegs, labels)
    with pytest.raises(FailedPrecondition, match="no base version"):
        submit_finetune(runner, store, FineTuneParams(), jpegs, labels)
    for bad in (dict(epochs=0), dict(margin=3.0), dict(loss="hinge"), dict(crops_per_class=1)):
        with pytest.raises(InvalidArgument):
            submit_finetune(runner, store, FineTuneParams(base_version=DEFAULT_VERSION, **bad), jpegs, labels)
    job = submit_finetune(runner, store, FineTuneParams(base_version=DEFAULT_VERSION), jpegs, labels)
    assert job.state == "QUEUED" and job.params["base_version"] == DEFAULT_VERSION
