"""distill_: healing a converted model against its dense teacher, without labels."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
import torch.nn as nn

from factorized_layers import SVDLinear, distill_, factorize_
from factorized_layers.distill import distillation_loss


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(
        nn.Linear(16, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
        nn.Linear(64, 8),
    )  # fmt: skip
    teacher(torch.randn(64, 16))  # non-trivial running statistics
    teacher.eval()
    student = copy.deepcopy(teacher)
    factorize_(student, 4, exclude=["5"])
    return student, teacher


def _data(count: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(count)]


def test_loss_falls_and_teacher_is_untouched():
    student, teacher = _pair()
    teacher.train()
    state = copy.deepcopy(teacher.state_dict())
    data = _data()
    report = distill_(student, teacher, data, steps=40, lr=1e-2, held_out=_data(2, seed=9))
    assert report.steps == 40 and len(report.losses) == 40
    assert report.held_out_after < 0.7 * report.held_out_before
    assert teacher.training  # mode restored
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert all(p.grad is None for p in teacher.parameters())


def test_only_factorized_layers_train_by_default_and_frozen_stay_frozen():
    student, teacher = _pair()
    student[0].input_factor.requires_grad_(False)
    before = copy.deepcopy(student.state_dict())
    distill_(student, teacher, _data(), steps=10, lr=1e-2)
    after = student.state_dict()
    assert torch.equal(after["0.input_factor"], before["0.input_factor"])
    assert not student[0].input_factor.requires_grad
    assert torch.equal(after["5.weight"], before["5.weight"])  # dense layer: not trained
    assert student[5].weight.requires_grad  # its flag is restored
    assert not torch.equal(after["3.input_factor"], before["3.input_factor"])
    distill_(student, teacher, _data(), steps=10, lr=1e-2, trainable="all")
    assert not torch.equal(student.state_dict()["5.weight"], before["5.weight"])


def test_same_seed_same_student():
    results = []
    for seed in (0, 0, 1):
        student, teacher = _pair()
        distill_(student, teacher, _data(), steps=8, lr=1e-2, seed=seed)
        results.append(torch.cat([p.detach().flatten() for p in student.parameters()]))
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


class _Slow(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        time.sleep(0.05)
        return self.inner(x)


def test_time_budget_is_honoured_within_one_step():
    student, teacher = _pair()
    student, teacher = _Slow(student), _Slow(teacher)
    start = time.perf_counter()
    report = distill_(student, teacher, _data(), time_budget=0.5, lr=1e-2)
    elapsed = time.perf_counter() - start
    step = report.seconds / report.steps
    assert report.seconds < 0.5 + 1.5 * step
    assert elapsed < 0.5 + 4 * step + 0.5  # plus the setup outside the loop
    assert 2 <= report.steps <= 6


def test_mismatched_outputs_name_both_shapes():
    student, _ = _pair()
    teacher = nn.Sequential(nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"student \(32, 8\), teacher \(32, 5\)"):
        distill_(student, teacher, _data(), steps=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "steps=, time_budget="),
        ({"steps": 0}, "steps must be a positive int"),
        ({"time_budget": -1.0}, "time_budget must be"),
        ({"steps": 1, "mode": "nope"}, "mode must be"),
        ({"steps": 1, "trainable": "some"}, "trainable must be"),
        ({"steps": 1, "lr": 0.0}, "lr must be positive"),
        ({"steps": 1, "features": ["nope"]}, r"features \['nope'\]"),
    ],
)
def test_bad_arguments(kwargs, message):
    student, teacher = _pair()
    with pytest.raises(ValueError, match=message):
        distill_(student, teacher, _data(), **kwargs)


def test_dense_student_and_same_module_are_refused():
    _, teacher = _pair()
    with pytest.raises(ValueError, match="no trainable factorized layer"):
        distill_(copy.deepcopy(teacher), teacher, _data(), steps=1)
    student, _ = _pair()
    with pytest.raises(ValueError, match="same module"):
        distill_(student, student, _data(), steps=1)


def test_feature_matching_adds_named_module_terms():
    student, teacher = _pair()
    data = _data()
    plain = distill_(copy.deepcopy(student), teacher, data[:1], steps=1, lr=1e-12)
    with_features = distill_(
        copy.deepcopy(student), teacher, data[:1], steps=1, lr=1e-12, features=["3"]
    )
    assert with_features.losses[0] > plain.losses[0]


def test_logit_kl_is_zero_for_equal_outputs_and_positive_otherwise():
    class Out(dict):
        pass

    logits = torch.randn(2, 5, 11)
    assert float(distillation_loss(Out(logits=logits), Out(logits=logits))) < 1e-6
    assert float(distillation_loss(Out(logits=logits), Out(logits=logits * 2), 2.0)) > 0


def test_teacher_on_another_dtype():
    student, teacher = _pair()
    teacher = teacher.double()
    report = distill_(student, teacher, _data(), steps=5, lr=1e-2, held_out=_data(1))
    assert report.held_out_after < report.held_out_before
    assert next(student.parameters()).dtype == torch.float32


@pytest.mark.parametrize("mode", ["global", "local"])
def test_transformer_heals_globally_and_block_by_block(mode, tiny_llama):
    teacher = tiny_llama
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 64, (2, 16), generator=g), "use_cache": False}
        for _ in range(6)
    ]
    factorize_(student, 0.3, exclude=["lm_head"], calibration=data, progress=False)
    assert isinstance(student.model.layers[0].mlp.up_proj, SVDLinear)
    calls = []

    def evaluate(model):
        calls.append(model is student)
        return float(len(calls))

    report = distill_(
        student, teacher, data, steps=15, lr=1e-3, mode=mode, held_out=data[:2],
        evaluate=evaluate, eval_every=1e9,
    )  # fmt: skip
    assert report.mode == mode
    assert report.held_out_after < report.held_out_before
    # A long eval_every: only the start and the end are evaluated, in either mode.
    assert calls == [True, True]
    assert [point[1] for point in report.curve] == [0, report.steps]


def test_local_mode_needs_blocks():
    student, teacher = _pair()
    with pytest.raises(ValueError, match="mode='global'"):
        distill_(student, teacher, _data(), steps=1, mode="local")


def test_ddp_two_gloo_processes_match_one_process_on_the_whole_batches(tmp_path):
    from .gloo_tasks import distill_pair, distill_task, run_on_two_processes

    ranks = run_on_two_processes("distill", tmp_path / "distilled.pt")
    single = distill_task()
    initial = dict(distill_pair()[0].named_parameters())
    for name, value in single.items():
        torch.testing.assert_close(ranks[1][name], ranks[0][name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-9, atol=1e-9, msg=name)
        if name.endswith("_factor"):
            assert not torch.equal(value, initial[name].detach()), f"{name} did not train"


def test_hidden_state_loss_ignores_padding_and_compares_pooled_states():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    student = teacher + 0.1 * torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss = distillation_loss(student, teacher, mask=mask)
    garbage = student.clone()
    garbage[0, 3:] = 100.0  # padding positions
    assert torch.equal(distillation_loss(garbage, teacher, mask=mask), loss)
    keep = mask.bool()
    mse = (student - teacher)[keep].square().sum() / teacher[keep].square().sum()
    weights = mask.unsqueeze(-1).float()
    pooled_s = (student * weights).sum(1) / weights.sum(1)
    pooled_t = (teacher * weights).sum(1) / weights.sum(1)
    cosine = torch.nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1).mean()
    torch.testing.assert_close(loss, mse + 1 - cosine)


def test_cosine_schedule_decays_the_learning_rate_over_the_steps(monkeypatch):
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    student, teacher = _pair()
    data = _data()
    distill_(student, teacher, data, steps=4, lr=1e-2)
    expected = [1e-2 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert seen == pytest.approx(expected)
    seen.clear()
    distill_(student, teacher, data, steps=3, lr=1e-2, schedule="constant")
    assert seen == pytest.approx([1e-2] * 3)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant', got 'linear'"):
        distill_(student, teacher, data, steps=1, schedule="linear")
