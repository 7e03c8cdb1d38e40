"""save_factorized / load_factorized: self-describing checkpoints of converted models."""

from __future__ import annotations

import copy
import functools
import json
import pathlib

import pytest
import torch
import torch.nn as nn

import factorized_layers.decompose as decompose
from factorized_layers import (
    CPConv2d,
    SVDLinear,
    TuckerLinear,
    factorize_,
    load_factorized,
    save_factorized,
)
from factorized_layers.checkpoint import factorization_plan

FORMATS = pytest.mark.parametrize("suffix", [".pt", ".safetensors"])


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1, padding_mode="reflect"),
        nn.ReLU(),
        nn.Conv2d(12, 16, (5, 3), stride=2, padding="valid", bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 2 * 4, 48),
        nn.ReLU(),
        nn.Linear(48, 40),
        nn.Linear(40, 5),
    )


@functools.cache
def _converted_once() -> nn.Module:
    model = _cnn(0)
    factorize_(
        model,
        rank=0.5,
        layers={nn.Linear: SVDLinear, nn.Conv2d: CPConv2d},
        exclude=["7"],
        layer_options={CPConv2d: {"n_iter": 10}},
        seed=0,
        allow_larger=True,
    )
    factorize_(model, rank=0.5, layers={nn.Linear: TuckerLinear}, include=["7"])
    return model


def _converted() -> nn.Module:
    """A converted copy of ``_cnn(0)`` (CP convolutions, SVD and Tucker linears)."""
    return copy.deepcopy(_converted_once())


def _input() -> torch.Tensor:
    return torch.randn(4, 3, 8, 9, generator=torch.Generator().manual_seed(3))


def _snapshot(model: nn.Module):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snapshot) -> bool:
    types, state = snapshot
    now = model.state_dict()
    return [type(m) for m in model.modules()] == types and all(
        torch.equal(now[k], v) for k, v in state.items()
    )


def _suffix_available(suffix: str) -> None:
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed")


@FORMATS
def test_round_trip_into_fresh_dense_model(tmp_path, suffix):
    _suffix_available(suffix)
    model = _converted().eval()
    for module in model.modules():
        if isinstance(module, (SVDLinear, TuckerLinear, CPConv2d)):
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.01 * torch.randn_like(p))  # as after fine-tuning
    path = tmp_path / f"model{suffix}"
    save_factorized(model, path)
    fresh = _cnn(seed=1).eval()
    loaded = load_factorized(fresh, path)
    assert loaded is fresh
    assert [type(m) for m in fresh.modules()] == [type(m) for m in model.modules()]
    assert isinstance(fresh[7], TuckerLinear) and fresh[7].rank == model[7].rank
    x = _input()
    assert torch.equal(fresh(x), model(x))


def test_loads_into_a_model_converted_the_same_way(tmp_path):
    model = _converted()
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    target = _converted()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    load_factorized(target, path)
    x = _input()
    assert torch.equal(target(x), model(x))


def test_torch_file_loads_with_weights_only_and_plan_is_json(tmp_path):
    model = _converted()
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    payload = torch.load(path, weights_only=True)
    plan = json.loads(payload["plan"])
    entries = {e["name"]: e for e in plan["layers"]}
    assert set(entries) == {"0", "2", "5", "7", "8"}
    assert entries["2"]["class"] == "CPConv2d"
    assert entries["2"]["config"]["stride"] == [2, 2]
    assert entries["2"]["config"]["padding"] == "valid"
    assert entries["7"]["config"]["rank"] == list(model[7].rank)
    assert plan == factorization_plan(model)


def test_loading_computes_no_decomposition(tmp_path, monkeypatch):
    model = _converted()
    path = tmp_path / "model.pt"
    save_factorized(model, path)

    def forbidden(*args, **kwargs):
        raise AssertionError("load_factorized must not decompose")

    for name in ("truncated_svd", "low_rank_factors", "cp_als", "cp_factors", "hooi", "hosvd"):
        monkeypatch.setattr(decompose, name, forbidden)
    fresh = load_factorized(_cnn(1), path)
    x = _input()
    assert torch.equal(fresh(x), model(x))


def test_keeps_device_dtype_mode_frozen_flags_and_hooks(tmp_path):
    model = _converted().double()
    path = tmp_path / "model.pt"
    save_factorized(model, path)
    fresh = _cnn(1).double().eval()
    fresh[0].requires_grad_(False)
    calls = []
    fresh[5].register_forward_hook(lambda *args: calls.append(1))
    load_factorized(fresh, path)
    assert fresh[5].input_factor.dtype == torch.float64
    assert not fresh[0].training and not fresh[5].training
    assert not any(p.requires_grad for p in fresh[0].parameters())
    assert all(p.requires_grad for p in fresh[5].parameters())
    fresh(_input().double())
    assert calls == [1]


def test_shared_layer_stays_shared(tmp_path):
    def build():
        torch.manual_seed(0)
        shared = nn.Linear(32, 32)
        return nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(32, 4))

    model = build()
    factorize_(model, rank=4)
    path = tmp_path / "model.safetensors"
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    save_factorized(model, path)
    fresh = load_factorized(build(), path)
    assert fresh[0] is fresh[2] and isinstance(fresh[0], SVDLinear)
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x))


def _tamper(path, edit):
    payload = torch.load(path, weights_only=True)
    plan = json.loads(payload["plan"])
    edit(plan, payload["state_dict"])
    payload["plan"] = json.dumps(plan)
    torch.save(payload, path)


def _set_class(plan, state):
    plan["layers"][0]["class"] = "os.system"


def _bad_rank(plan, state):
    plan["layers"][0]["config"]["rank"] = 10_000


def _other_in_features(plan, state):
    entry = next(e for e in plan["layers"] if e["name"] == "5")
    entry["config"]["in_features"] = 24


def _other_stride(plan, state):
    entry = next(e for e in plan["layers"] if e["name"] == "2")
    entry["config"]["stride"] = [1, 1]


def _missing_layer(plan, state):
    plan["layers"][0]["name"] = "classifier"


def _class_for_other_type(plan, state):
    entry = next(e for e in plan["layers"] if e["name"] == "5")
    entry["class"] = "CPConv2d"


def _unknown_argument(plan, state):
    plan["layers"][0]["config"]["activation"] = "relu"


def _weight_shape(plan, state):
    key = "5.input_factor"
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])


def _bad_version(plan, state):
    plan["version"] = 99


def _unexpected_weight(plan, state):
    state["extra.weight"] = torch.zeros(3)


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (_set_class, TypeError, "not a registered"),
        (_bad_rank, ValueError, "rank"),
        (_other_in_features, ValueError, "in_features"),
        (_other_stride, ValueError, "stride"),
        (_missing_layer, ValueError, "no such submodule"),
        (_class_for_other_type, ValueError, "replaces"),
        (_unknown_argument, ValueError, "activation"),
        (_weight_shape, ValueError, "5.input_factor"),
        (_bad_version, ValueError, "version"),
        (_unexpected_weight, ValueError, "extra.weight"),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_tampered_or_mismatched_plan_raises_and_leaves_model_unchanged(
    tmp_path, edit, error, words
):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    _tamper(path, edit)
    fresh = _cnn(1)
    snapshot = _snapshot(fresh)
    with pytest.raises(error, match=words):
        load_factorized(fresh, path)
    assert _unchanged(fresh, snapshot)


def test_other_architecture_raises_and_leaves_model_unchanged(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    other = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Linear(8, 8))
    snapshot = _snapshot(other)
    with pytest.raises(ValueError):
        load_factorized(other, path)
    assert _unchanged(other, snapshot)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_cnn().state_dict(), path)
    with pytest.raises(ValueError, match="not a save_factorized checkpoint"):
        load_factorized(_cnn(), path)
    with pytest.raises(TypeError, match="nn.Module"):
        load_factorized("model", path)
    with pytest.raises(TypeError, match="nn.Module"):
        save_factorized(42, path)


def test_non_strict_allows_missing_keys_but_not_wrong_shapes(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    _tamper(path, lambda plan, state: state.pop("8.bias"))
    with pytest.raises(ValueError, match="8.bias"):
        load_factorized(_cnn(1), path)
    with pytest.warns(UserWarning):
        fresh = load_factorized(_cnn(1), path, strict=False)
    assert isinstance(fresh[8], SVDLinear)


def test_transformers_bert_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )

    def build():
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()

    model = build()
    factorize_(model, rank=0.5, include=["re:.*(query|key|value|dense)"], allow_larger=True)
    path = tmp_path / "bert.pt"
    save_factorized(model, path)
    fresh = load_factorized(build(), path)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        fresh(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0
    )


@FORMATS
def test_shared_and_tied_weights_whose_names_sort_differently(tmp_path, suffix):
    # safetensors keeps the name that sorts first ("10..." before "2..."), not the
    # first in module order; strict loading must accept either.
    _suffix_available(suffix)

    def build():
        torch.manual_seed(0)
        shared = nn.Linear(16, 16)
        tied = nn.Linear(16, 16)
        layers = [nn.Linear(16, 16), nn.ReLU(), shared] + [nn.ReLU()] * 7 + [shared]
        layers += [tied, nn.Linear(16, 16)]
        model = nn.Sequential(*layers)
        model[12].weight = tied.weight
        return model

    model = build()
    factorize_(model, rank=4, include=["2"])
    path = tmp_path / f"model{suffix}"
    save_factorized(model, path)
    fresh = load_factorized(build(), path)
    assert fresh[2] is fresh[10] and isinstance(fresh[2], SVDLinear)
    assert fresh[11].weight is fresh[12].weight
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize(
    "value, words",
    [(3, "int"), ({"nested": torch.zeros(2)}, "dict"), (torch.empty(40, device="meta"), "meta")],
    ids=["int", "dict", "meta"],
)
def test_non_tensor_weights_raise_before_anything_is_copied(tmp_path, value, words):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)

    def edit(plan, state):
        state["0.bias"] = torch.full_like(state["0.bias"], 7.0)
        state["8.bias"] = value

    _tamper(path, edit)
    fresh = _cnn(1)
    snapshot = _snapshot(fresh)
    with pytest.raises(ValueError, match=words):
        load_factorized(fresh, path)
    assert _unchanged(fresh, snapshot)


def test_loading_leaves_the_random_state_alone(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    fresh = _cnn(1)
    before = torch.get_rng_state()
    load_factorized(fresh, path)
    assert torch.equal(torch.get_rng_state(), before)


def test_non_strict_warns_about_what_it_skipped(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    _tamper(path, lambda plan, state: state.pop("8.bias"))
    with pytest.warns(UserWarning, match="8.bias"):
        load_factorized(_cnn(1), path, strict=False)


def test_model_converted_at_another_rank_is_a_clear_error(tmp_path):
    path = tmp_path / "model.pt"
    save_factorized(_converted(), path)
    other = _cnn(1)
    factorize_(other, rank=2, include=["5"])
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match="already has a SVDLinear"):
        load_factorized(other, path)
    assert _unchanged(other, snapshot)


def _legacy_dense_model():
    """The architecture of tests/data/legacy_v1.*, written before the layer contract."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, (3, 5), stride=2, padding="valid", bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 2, 24), nn.GELU(), nn.Linear(24, 10),
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_written_before_the_layer_contract_still_loads(suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="needs safetensors")
    data = pathlib.Path(__file__).parent / "data"
    model = load_factorized(_legacy_dense_model(), data / f"legacy_v1{suffix}")
    assert [type(m).__name__ for m in model] == [
        "CPConv2d", "ReLU", "CPConv2d", "ReLU", "Flatten", "TuckerLinear", "GELU", "SVDLinear"
    ]  # fmt: skip
    io = torch.load(data / "legacy_v1_io.pt", weights_only=True)
    with torch.no_grad():
        torch.testing.assert_close(model(io["input"]), io["output"], rtol=1e-6, atol=1e-6)
