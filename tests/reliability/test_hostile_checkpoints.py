"""Hostile checkpoints are refused cleanly (#20).

Valid ``save_factorized`` files of a model holding every registered family are mutated
by hypothesis -- wrong types, huge or negative sizes, unknown classes, duplicate names,
ranks that disagree with the saved shapes, extra and missing keys, non-finite values,
very long strings, deep nesting, truncated and garbage plans -- and loaded into a fresh
dense model. Every load either succeeds with a model that runs to a finite output, or
raises ``ValueError``/``TypeError`` with a message of bounded length, leaving the model
bit-identical; nothing is allocated in proportion to a claimed size (peak memory is
watched) and nothing is unpickled as code.
"""

import copy
import json
import resource
from typing import Any, List, Tuple

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factorized_layers import (
    CPConv2d,
    SVDConv2d,
    SVDEmbedding,
    SVDLinear,
    TTLinear,
    TuckerConv2d,
    TuckerLinear,
    factorize_,
    load_factorized,
    save_factorized,
)

from .snapshot import snapshot, unchanged
from .tally import record

FAMILIES = {
    "emb": SVDEmbedding,
    "c1": CPConv2d,
    "c2": TuckerConv2d,
    "c3": SVDConv2d,
    "l1": SVDLinear,
    "l2": TuckerLinear,
    "l3": TTLinear,
}
MAX_MESSAGE = 2000


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.l1 = nn.Linear(16, 32)
        self.l2 = nn.Linear(32, 32)
        self.l3 = nn.Linear(32, 16)

    def forward(self, tokens, image):
        features = self.c3(self.c2(self.c1(image))).mean(dim=(2, 3))
        hidden = self.l3(self.l2(self.l1(self.emb(tokens).mean(dim=1))))
        return hidden.sum() + features.sum()


def _fresh() -> Zoo:
    torch.manual_seed(1)
    return Zoo()


def _inputs():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (2, 5), generator=generator), torch.randn(
        2, 3, 6, 6, generator=generator
    )


@pytest.fixture(scope="module")
def valid():
    """(plan as JSON-compatible data, state_dict) of a model with every family."""
    torch.manual_seed(0)
    model = Zoo()
    for name, cls in FAMILIES.items():
        dense_type = type(getattr(model, name))
        factorize_(model, 0.5, include=[name], layers={dense_type: cls}, progress=False)
    state = model.state_dict()
    from factorized_layers import factorization_plan

    return factorization_plan(model), {k: v.clone() for k, v in state.items()}


# -- hostile values and mutations ------------------------------------------------------

HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, -(2**40), 2**31, 2**63, 10**12, 10**30]),
    st.sampled_from([0.5, -0.0, float("nan"), float("inf"), -float("inf"), 1e308]),
    st.sampled_from(["", "x" * 100_000, "SVDLinear", "../../etc/passwd", "\x00", "é" * 1000]),
    st.sampled_from([[], {}, [1] * 10_000, [[[[[]]]]], {"a": {"b": {"c": {}}}}]),
    st.lists(st.integers(-5, 40), min_size=1, max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
).map(copy.deepcopy)  # fresh containers: later mutations must not edit the strategy's own


def _paths(node: Any, prefix: Tuple = ()) -> List[Tuple]:
    """Every path (tuple of keys/indices) into a JSON-compatible structure."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, prefix + (index,))
    return found


def _get(node: Any, path: Tuple) -> Any:
    for key in path:
        node = node[key]
    return node


def _mutate_plan(plan: dict, data) -> Any:
    kind = data.draw(st.sampled_from(["replace", "delete", "add", "duplicate", "swap_class"]))
    if kind == "duplicate":
        entries = plan["layers"]
        entries.append(copy.deepcopy(data.draw(st.sampled_from(entries))))
        return plan
    if kind == "swap_class":
        entry = data.draw(st.sampled_from(plan["layers"]))
        entry["class"] = data.draw(st.sampled_from([c.__name__ for c in FAMILIES.values()]))
        return plan
    path = data.draw(st.sampled_from(_paths(plan)))
    if kind == "replace":
        if not path:
            return data.draw(HOSTILE)
        _get(plan, path[:-1])[path[-1]] = data.draw(HOSTILE)
    elif kind == "delete" and path:
        parent = _get(plan, path[:-1])
        del parent[path[-1]]
    else:
        target = _get(plan, path)
        if isinstance(target, dict):
            target[data.draw(st.sampled_from(["extra", "rank", "name", "x" * 5000]))] = data.draw(
                HOSTILE
            )
        elif isinstance(target, list):
            target.append(data.draw(HOSTILE))
    return plan


def _mutate_state(state: dict, data) -> None:
    kind = data.draw(
        st.sampled_from(
            ["delete", "add", "reshape", "non_finite", "dtype", "not_tensor", "claimed_size"]
        )
    )
    key = data.draw(st.sampled_from(sorted(state)))
    value = state[key]
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() > 4096:
        value = torch.ones(3)  # an earlier mutation already made this entry hostile
    if kind == "delete":
        del state[key]
    elif kind == "add":
        state[data.draw(st.sampled_from(["extra.weight", key + "_0", "l1.rank"]))] = torch.ones(3)
    elif kind == "reshape":
        grow = data.draw(st.integers(1, 3))
        state[key] = torch.zeros(*[s + grow for s in value.shape]) if value.dim() else value + 1
    elif kind == "non_finite":
        bad = value.clone().reshape(-1)
        if not bad.numel():
            return
        bad[data.draw(st.integers(0, bad.numel() - 1))] = data.draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")])
        )
        state[key] = bad.reshape(value.shape)
    elif kind == "dtype":
        dtype = data.draw(st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.uint8]))
        state[key] = value.to(dtype)
    elif kind == "not_tensor":
        state[key] = data.draw(st.sampled_from([3, "tensor", None, [1.0, 2.0]]))
    else:  # a huge claimed shape backed by one element (stride 0)
        state[key] = torch.zeros(1).expand(10**12)


RAW_PLANS = st.one_of(
    st.just("[" * 100_000 + "]" * 100_000),
    st.just('{"format": ' * 50_000),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.just("NaN"),
    st.just('{"format": "factorized_layers.plan", "version": 1, "layers": [' + "{}," * 10**5),
)


def _load(tmp_path, plan_text: str, state: dict):
    path = tmp_path / "hostile.pt"
    torch.save({"plan": plan_text, "state_dict": state}, path)
    model = _fresh()
    before = snapshot(model)
    try:
        load_factorized(model, path)
    except (ValueError, TypeError) as error:
        assert len(str(error)) <= MAX_MESSAGE, f"{len(str(error))}-character message"
        assert record("hostile checkpoints refused", unchanged(model, before)), str(error)
        return "refused"
    output = model(*_inputs())
    assert torch.isfinite(output).all(), "a loaded checkpoint computes non-finite outputs"
    record("hostile checkpoints loaded (harmless mutation)")
    return "loaded"


@pytest.fixture(scope="module")
def peak():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024
    assert grown_mib < 400, f"loading hostile checkpoints raised peak memory by {grown_mib} MiB"


def test_the_unmutated_checkpoint_loads(valid, tmp_path):
    plan, state = valid
    assert _load(tmp_path, json.dumps(plan), dict(state)) == "loaded"


HYPOTHESIS = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HYPOTHESIS
@given(data=st.data())
def test_mutated_plans_are_refused_cleanly(valid, peak, tmp_path, data):
    plan, state = valid
    mutated = _mutate_plan(copy.deepcopy(plan), data)
    if data.draw(st.booleans()):
        mutated = _mutate_plan(mutated, data) if isinstance(mutated, dict) else mutated
    _load(tmp_path, json.dumps(mutated), dict(state))


@HYPOTHESIS
@given(data=st.data())
def test_mutated_weights_are_refused_cleanly(valid, peak, tmp_path, data):
    plan, state = valid
    mutated = dict(state)
    for _ in range(data.draw(st.integers(1, 2))):
        if mutated:
            _mutate_state(mutated, data)
    outcome = _load(tmp_path, json.dumps(plan), mutated)
    assert outcome == "refused" or set(mutated) == set(state)


@settings(deadline=None, max_examples=10)
@given(raw=RAW_PLANS)
def test_garbage_plan_text_is_refused_cleanly(valid, peak, tmp_path_factory, raw):
    _, state = valid
    assert _load(tmp_path_factory.mktemp("raw"), raw, dict(state)) == "refused"


def test_a_checkpoint_holding_code_is_never_run(valid, tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled code ran')",))

    path = tmp_path / "evil.pt"
    torch.save({"plan": json.dumps(valid[0]), "state_dict": {"l1.bias": Payload()}}, path)
    model = _fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot be read"):
        load_factorized(model, path)
    assert record("hostile checkpoints refused", unchanged(model, before))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_non_finite_weights_are_refused_in_either_format(valid, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed")
    plan, state = valid
    model = _fresh()
    for name, cls in FAMILIES.items():
        dense_type = type(getattr(model, name))
        factorize_(model, 0.5, include=[name], layers={dense_type: cls}, progress=False)
    with torch.no_grad():
        model.l2.core[0, 0] = float("nan")
    path = tmp_path / f"model{suffix}"
    save_factorized(model, path)
    fresh = _fresh()
    before = snapshot(fresh)
    with pytest.raises(ValueError, match=r"'l2.core' holds NaN or Inf"):
        load_factorized(fresh, path)
    assert record("hostile checkpoints refused", unchanged(fresh, before))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_huge_claimed_rank_is_refused_before_it_is_allocated(valid, peak, tmp_path, name):
    plan, state = valid
    plan = copy.deepcopy(plan)
    entry = next(e for e in plan["layers"] if e["name"] == name)
    rank = entry["config"]["rank"]
    entry["config"]["rank"] = [10**6] * len(rank) if isinstance(rank, list) else 10**6
    path = tmp_path / "huge.pt"
    torch.save({"plan": json.dumps(plan), "state_dict": dict(state)}, path)
    model = _fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"plan entry '{name}'"):
        load_factorized(model, path)
    assert record("hostile checkpoints refused", unchanged(model, before))


def test_layers_claiming_more_elements_than_the_file_holds_are_refused():
    # Registered families bound their ranks by their shapes; the element budget also
    # stops a family (a user's) that does not, before anything real is allocated.
    from factorized_layers.checkpoint import _check_claimed_sizes

    dense = nn.Linear(16, 32)
    checked = {"l1": (dense, SVDLinear, {})}
    saved = {"l1.input_factor": (5, 16), "l1.output_factor": (32, 5), "l1.bias": (32,)}
    _check_claimed_sizes({"l1": 5 * 16 + 32 * 5 + 32}, checked, saved)
    with pytest.raises(ValueError, match=r"'l1' \(SVDLinear\), alone claims 10000000"):
        _check_claimed_sizes({"l1": 10**7}, checked, saved)
