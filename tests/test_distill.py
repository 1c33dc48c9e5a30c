"""The distill pass and its training loop, on the digits VGG (trained once, cached)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import DataError, DistillError, OptionError, PassFailure
from graphopt.passes.distill.features import auto_pairs, parse_pairs
from graphopt.passes.distill.loop import CHECKPOINT, DistillOptions, distill
from graphopt.zoo.datasets import load_data
from graphopt.zoo.digits import evaluate
from graphopt.zoo.models import load_model


@pytest.fixture(scope="module")
def digits():
    model, _ = load_model("digits:vgg")
    return model, load_data("digits")


def _inputs(data):
    return (data.train[0][0][:8],)


def _pruned(model, data, ratio=0.5):
    return graphopt.compress(model, f"fold-bn,prune(ratio={ratio})", example_inputs=_inputs(data))


def _state(g):
    return {k: v.clone() for k, v in g.module.state_dict().items()}


def test_distill_recovers_most_of_the_accuracy(digits):
    model, data = digits
    teacher_top1 = evaluate(model, data.test)
    pruned = _pruned(model, data).graph
    before = evaluate(pruned.module, data.test)
    result = graphopt.compress(
        model,
        "fold-bn,prune(ratio=0.5),distill(epochs=5)",
        example_inputs=_inputs(data),
        data=data.train,
    )
    after = evaluate(result.graph.module, data.test)
    assert before < 0.5 < teacher_top1
    assert after > 0.95, (before, after, teacher_top1)
    report = result.reports[-1]
    assert not report.exact and report.modified
    assert report.details["labelled"] and report.details["world_size"] == 1
    assert report.details["loss_last"] < report.details["loss_first"]
    assert not result.graph.module.training


def test_unlabelled_batches_train_on_kd_alone(digits):
    model, data = digits
    unlabelled = [x for x, _ in data.train]
    result = graphopt.compress(
        model,
        "fold-bn,prune(ratio=0.5),distill(epochs=4)",
        example_inputs=_inputs(data),
        data=unlabelled,
    )
    assert result.reports[-1].details["labelled"] is False
    assert evaluate(result.graph.module, data.test) > 0.9


def test_same_seed_gives_identical_weights(digits):
    model, data = digits
    text = "fold-bn,prune(ratio=0.5),distill(epochs=2,features=auto,mixup=0.2)"
    a = graphopt.compress(model, text, example_inputs=_inputs(data), data=data.train).graph
    b = graphopt.compress(model, text, example_inputs=_inputs(data), data=data.train).graph
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_callers_model_is_not_touched(digits):
    model, data = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.compress(
        model,
        "fold-bn,prune(ratio=0.5),distill(epochs=1)",
        example_inputs=_inputs(data),
        data=data.train,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_alpha_zero_is_fine_tuning_with_labels(digits):
    model, data = digits
    result = graphopt.compress(
        model,
        "fold-bn,prune(ratio=0.5),distill(epochs=3,alpha=0)",
        example_inputs=_inputs(data),
        data=data.train,
    )
    assert evaluate(result.graph.module, data.test) > 0.9
    with pytest.raises(PassFailure, match="alpha=0 trains on labels only"):
        graphopt.compress(
            model, "distill(alpha=0)", example_inputs=_inputs(data), data=[x for x, _ in data.train]
        )


def test_no_data_is_a_clear_error(digits):
    model, data = digits
    with pytest.raises(DataError, match="'distill' needs data: pass data=batches"):
        graphopt.compress(model, "fold-bn,distill", example_inputs=_inputs(data))


def test_bad_options_name_the_option():
    for text, word in [
        ("distill(alpha=2)", "alpha"),
        ("distill(temperature=0)", "temperature"),
        ("distill(holdout=0.7)", "holdout"),
        ("distill(feature-loss=cosine)", "unknown loss 'cosine'"),
        ("distill(features=[auto,a:b])", "auto"),
    ]:
        with pytest.raises(OptionError, match=word):
            graphopt.Pipeline.parse(text)


def test_teacher_with_other_output_shape_is_refused(digits, tmp_path):
    model, data = digits
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    path = tmp_path / "teacher.pt"
    torch.save(other, path)  # a pickle: loads only with trust-pickle
    with pytest.raises(
        PassFailure, match=r"student output \(\d+, 10\) and teacher output \(\d+, 7\)"
    ):
        graphopt.compress(
            model,
            f'distill(teacher="{path}",trust-pickle=true,epochs=1)',
            example_inputs=_inputs(data),
            data=data.train,
        )


def test_a_teacher_from_a_file_is_used(digits, tmp_path):
    model, data = digits
    path = tmp_path / "teacher.pt2"  # a torch.export program: no pickle
    torch.export.save(torch.export.export(model, _inputs(data)), path)
    result = graphopt.compress(
        model,
        f'fold-bn,prune(ratio=0.5),distill(teacher="{path}",epochs=3)',
        example_inputs=_inputs(data),
        data=data.train,
    )
    assert evaluate(result.graph.module, data.test) > 0.9


def test_unknown_feature_lists_nearest_names(digits):
    model, data = digits
    with pytest.raises(PassFailure, match=r"'features\.55'.*nearest: .*features\.5"):
        graphopt.compress(
            model,
            "distill(features=[features.55],epochs=1)",
            example_inputs=_inputs(data),
            data=data.train,
        )


def test_provenance_pairs_a_folded_conv_with_the_teachers_batchnorm(digits):
    """Ground truth: after fold-bn the conv computes exactly what conv+BN computed, so the
    pair found through provenance has zero feature loss before any training."""
    model, data = digits
    teacher = graphopt.trace(model, _inputs(data))
    student = graphopt.compress(model, "fold-bn", example_inputs=_inputs(data)).graph
    (pair,) = parse_pairs(student, teacher, ["features.4"])
    assert pair.student == "features_3" and pair.teacher == "features_4"
    x = data.test[0][0]
    from graphopt.passes.distill.features import tapped_module

    with torch.no_grad():
        _, (fs,) = tapped_module(student.module, [pair.student])(x)
        _, (ft,) = tapped_module(teacher.module, [pair.teacher])(x)
    torch.testing.assert_close(fs, ft, rtol=1e-4, atol=1e-5)


def test_auto_pairs_survive_pruning_and_get_adapters(digits):
    model, data = digits
    teacher = graphopt.trace(model, _inputs(data))
    student = _pruned(model, data).graph
    pairs = auto_pairs(student, teacher)
    assert [p.teacher for p in pairs] == [p.student for p in pairs]  # same paths, same names
    assert len(pairs) == 3  # last node at 8x8, at 4x4 and at 2x2
    report = distill(student, teacher, data.train, DistillOptions(epochs=1, features=("auto",)))
    assert all(f["adapter"] for f in report["features"])  # channel counts differ after pruning
    assert not any("adapter" in k for k in student.module.state_dict())  # dropped afterwards


def test_checkpoint_resume_equals_an_uninterrupted_run(digits, tmp_path):
    model, data = digits
    teacher = graphopt.trace(model, _inputs(data))
    start = _pruned(model, data).graph
    opts = DistillOptions(epochs=4, checkpoint_dir=str(tmp_path / "ck"), mixup=0.2)

    straight = start.copy()
    distill(straight, teacher, data.train, DistillOptions(epochs=4, mixup=0.2))

    class Stop(Exception):
        pass

    def stop_after_two(stats):
        if stats.epoch == 2:
            raise Stop

    interrupted = start.copy()
    with pytest.raises(Stop):
        distill(interrupted, teacher, data.train, opts, on_epoch=stop_after_two)
    assert (tmp_path / "ck" / CHECKPOINT).exists()
    resumed = start.copy()
    report = distill(
        resumed, teacher, data.train, DistillOptions(**{**opts.__dict__, "resume": True})
    )
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4]
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_diverging_loss_stops_with_epoch_and_batch_and_keeps_the_checkpoint(digits, tmp_path):
    model, data = digits
    teacher = graphopt.trace(model, _inputs(data))
    student = _pruned(model, data).graph
    ck = tmp_path / "ck"

    def poison(stats):
        with torch.no_grad():
            next(student.module.parameters()).fill_(float("nan"))

    before_poison = {}

    def remember_then_poison(stats):
        before_poison.update(_state(student))
        poison(stats)

    with pytest.raises(
        DistillError, match=r"loss became nan at epoch 2, batch 1.*last good checkpoint"
    ):
        distill(
            student,
            teacher,
            data.train,
            DistillOptions(epochs=3, checkpoint_dir=str(ck)),
            on_epoch=remember_then_poison,
        )
    saved = torch.load(ck / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == 1
    restored = _state(student)
    assert all(torch.equal(restored[k], before_poison[k]) for k in restored)


def test_early_stopping_restores_the_best_epoch(digits):
    model, data = digits
    teacher = graphopt.trace(model, _inputs(data))
    student = _pruned(model, data).graph
    seen = []
    report = distill(
        student,
        teacher,
        data.train,
        DistillOptions(epochs=40, patience=1, lr=0.05),
        on_epoch=seen.append,
    )
    kd = [s.holdout["kd"] for s in seen]
    best = min(range(len(kd)), key=kd.__getitem__)
    assert report["best_epoch"] == best + 1
    assert report["epochs_run"] == len(seen) <= 40
    if len(seen) < 40:  # stopped early: the last epoch was no better than the best
        assert kd[-1] >= kd[best]
