"""Self-describing checkpoints of factorized models: weights plus the factorization plan.

A converted model's ``state_dict`` alone cannot be loaded into the dense model
definition users build from code (the factor keys do not exist there).
:func:`save_factorized` stores the *plan* -- which layers were replaced, by which
registered class, with which constructor arguments (ranks, shapes, options) -- next
to the weights; :func:`load_factorized` takes a freshly built dense model, checks
the plan against it completely, swaps in layers built from the plan (no
decomposition is computed) and loads the weights. Loading never unpickles code:
torch files are read with ``weights_only=True``, ``.safetensors`` files with
``safetensors``, and only classes registered with
:func:`~factorized_layers.registry.register_layer` can be named by a plan.
Layers quantized by :func:`~factorized_layers.quantize.quantize_` are saved under
their float class and configuration with a ``"quantization"`` mode, and rebuilt
quantized.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple, Union

import torch
import torch.nn as nn

from .convert.ties import tied_groups
from .convert.walk import _parents, _swapping
from .decompose._common import all_finite
from .quantize import QUANTIZATION_MODES, apply_quantization, quantization_of
from .registry import registered_layers
from .sources import source_for

__all__ = ["save_factorized", "load_factorized", "factorization_plan"]

FORMAT = "factorized_layers.plan"
VERSION = 1
_PLAN_KEY = "factorized_layers.plan"
_SAFETENSORS_SUFFIX = ".safetensors"
# A plan entry takes ~300 characters; this admits ~30,000 layers and refuses abuse.
_MAX_PLAN_CHARACTERS = 10_000_000

PathLike = Union[str, os.PathLike]


def factorization_plan(model: nn.Module) -> Dict[str, Any]:
    """The plan of ``model``: every factorized layer's name, class and configuration.

    Args:
        model: A model converted by :func:`~factorized_layers.convert.factorize_` (or
            built with factorized layers).

    Returns:
        ``{"format", "version", "layers": [{"name", "class", "source", "config"}]}``,
        JSON-serialisable; a quantized layer's entry also has ``"quantization"``
        (``"int8_weight"`` or ``"int8_dynamic"``). A layer shared by several parents
        appears once, under its first name.

    Raises:
        TypeError: A factorized layer has no ``get_config``.

    Examples:
        >>> from factorized_layers import factorize_
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> _ = factorize_(model, rank=4, allow_larger=True)
        >>> plan = factorization_plan(model)
        >>> [(e["name"], e["class"], e["config"]["rank"]) for e in plan["layers"]]
        [('0', 'SVDLinear', 4), ('2', 'SVDLinear', 4)]
    """
    classes = registered_layers()
    layers = []
    for name, module in model.named_modules():
        quantization, cls = quantization_of(module)
        if cls not in classes:
            continue
        if not name:
            raise TypeError(
                f"the model itself is a {cls.__name__}; save a factorized layer with "
                "torch.save(layer.state_dict()) and rebuild it with from_config"
            )
        if not hasattr(module, "get_config"):
            raise TypeError(f"{cls.__name__} has no get_config(); it cannot be saved in a plan")
        entry = {
            "name": name,
            "class": cls.__name__,
            "source": [t.__name__ for t in classes[cls]],
            "config": module.get_config(),
        }
        if quantization is not None:
            entry["quantization"] = quantization
        layers.append(entry)
    return {"format": FORMAT, "version": VERSION, "layers": layers}


def save_factorized(model: nn.Module, path: PathLike) -> None:
    """Write ``model``'s weights and factorization plan to one file.

    A path ending in ``.safetensors`` is written with ``safetensors`` (the plan as
    JSON in the header metadata; tied weights stored once); any other path with
    ``torch.save`` as ``{"plan": <JSON str>, "state_dict": ...}``, loadable with
    ``torch.load(..., weights_only=True)``. The file is written atomically: to a
    temporary file in the same folder, flushed to disk, then renamed onto ``path``,
    so a failure part-way (an exception, a full disk, an interrupt) leaves a previous
    checkpoint at ``path`` intact.

    Args:
        model: The (converted) model.
        path: Destination file.

    Raises:
        ImportError: ``.safetensors`` asked for without the package installed.

    Examples:
        >>> import tempfile, os
        >>> from factorized_layers import factorize_
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> _ = factorize_(model, rank=4, allow_larger=True)
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> save_factorized(model, path)
        >>> fresh = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> x = torch.randn(3, 32)
        >>> torch.equal(load_factorized(fresh, path)(x), model(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"save_factorized expects an nn.Module, got {type(model).__name__}")
    plan = json.dumps(factorization_plan(model))
    if os.fspath(path).endswith(_SAFETENSORS_SUFFIX):
        safetensors_torch = _safetensors()
        _atomic_write(
            path, lambda tmp: safetensors_torch.save_model(model, tmp, metadata={_PLAN_KEY: plan})
        )
    else:
        state = {"plan": plan, "state_dict": model.state_dict()}
        _atomic_write(path, lambda tmp: torch.save(state, tmp))


def _atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` next to ``path``, fsync, then ``os.replace`` onto ``path``.

    A crash, a full disk or an exception part-way leaves any previous file at ``path``
    as it was (and no temporary file behind, except after a hard crash).
    """
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(target)}.")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def load_factorized(
    model: nn.Module,
    path: PathLike,
    *,
    strict: bool = True,
    map_location: torch.device | str | None = None,
) -> nn.Module:
    """Re-apply a saved plan to a freshly built dense ``model`` and load the weights.

    A layer that already has the planned class and configuration is kept (so a
    checkpoint also loads into a model converted the same way). Every other plan
    entry is checked before the model is touched: the layer exists and
    is of a type its class is registered for, the class is registered, the
    configuration builds (on the meta device) a layer equivalent to the dense one
    (same features/channels, kernel and convolution options, bias), and every saved
    tensor's name and shape matches the converted model. On any error the model is
    left unchanged. The factorized layers are built on each dense layer's device
    and dtype (no decomposition is computed), keep its ``requires_grad`` flag and
    ``training`` mode, and take over its hooks.

    Args:
        model: A freshly built dense model of the architecture that was saved.
        path: A file written by :func:`save_factorized`.
        strict: As ``nn.Module.load_state_dict``: when ``False``, missing or unexpected
            weight keys are allowed (shapes of the common keys must still match).
        map_location: Passed to ``torch.load`` (ignored for ``.safetensors``, whose
            tensors are copied into the model's devices).

    Returns:
        ``model``, converted and loaded.

    Raises:
        ValueError: Not a factorized-layers checkpoint (a truncated or corrupted file
            included; the message names it), a malformed or mismatched plan, or
            weights that do not fit.
        OSError: The file is missing or cannot be opened.
        TypeError: A plan naming an unregistered class, or bad arguments.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_factorized expects an nn.Module, got {type(model).__name__}")
    with _bounded_messages():
        plan, shapes, state_dict = _read(path, map_location)
        replacements = _build_replacements(model, plan, shapes)
        _check_weights(model, replacements, shapes, strict)
    with _swapping(_parents(model)) as swap:
        for old, new in replacements.values():
            swap(old, new)
        if state_dict is None:
            missing, unexpected = _safetensors().load_model(model, os.fspath(path), strict=strict)
        else:
            missing, unexpected = model.load_state_dict(state_dict, strict=strict)
    if missing or unexpected:
        warnings.warn(
            f"load_factorized(strict=False): missing keys {list(missing)[:10]} keep their "
            f"initial values; unexpected keys {list(unexpected)[:10]} were ignored",
            stacklevel=2,
        )
    return model


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "a .safetensors checkpoint needs the 'safetensors' package "
            "(pip install safetensors); other paths use torch.save"
        ) from error
    return safetensors.torch


def _read(
    path: PathLike, map_location: torch.device | str | None
) -> Tuple[Dict[str, Any], Dict[str, Tuple[int, ...]], Dict[str, torch.Tensor] | None]:
    """(plan, {key: shape}, state_dict or None for safetensors)."""
    if os.fspath(path).endswith(_SAFETENSORS_SUFFIX):
        safetensors_torch = _safetensors()
        with _unreadable_as_value_error(path):
            with safetensors_torch.safe_open(os.fspath(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get(_PLAN_KEY)
                shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
                for key in handle.keys():  # one tensor in memory at a time
                    _check_finite(path, key, handle.get_tensor(key))
        state_dict = None
    else:
        with _unreadable_as_value_error(path):
            payload = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or not {"plan", "state_dict"} <= set(payload):
            raise ValueError(
                f"{os.fspath(path)!r} is not a save_factorized checkpoint "
                "(expected a dict with 'plan' and 'state_dict')"
            )
        raw, state_dict = payload["plan"], payload["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{os.fspath(path)!r}: 'state_dict' is not a mapping")
        for key, value in state_dict.items():
            if (
                not isinstance(key, str)
                or not isinstance(value, torch.Tensor)
                or value.device.type == "meta"
                or value.is_complex()
            ):
                raise ValueError(
                    f"{os.fspath(path)!r}: state_dict entry {key!r} must be a real tensor "
                    f"with values, got {type(value).__name__}"
                    + (f" on {value.device}" if isinstance(value, torch.Tensor) else "")
                )
            held = value.untyped_storage().nbytes() // max(value.element_size(), 1)
            if value.numel() > held:
                raise ValueError(
                    f"{os.fspath(path)!r}: state_dict entry {_short(key)} claims shape "
                    f"{tuple(value.shape)} ({value.numel()} elements) but its storage holds "
                    f"{held}; checkpoints hold no expanded or overlapping tensors"
                )
            _check_finite(path, key, value)
        shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    if not isinstance(raw, str):
        raise ValueError(f"{os.fspath(path)!r} holds no factorization plan")
    if len(raw) > _MAX_PLAN_CHARACTERS:
        raise ValueError(
            f"{os.fspath(path)!r}: the plan has {len(raw)} characters, more than a plan "
            f"of any model holds ({_MAX_PLAN_CHARACTERS})"
        )
    try:
        plan = json.loads(raw, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise ValueError(f"{os.fspath(path)!r}: the plan is not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{os.fspath(path)!r}: the plan is nested too deeply") from None
    _check_plan(plan)
    return plan, shapes, state_dict


def _refuse_constant(name: str) -> None:
    raise ValueError(f"the plan holds the non-finite number {name}; plans hold only finite values")


def _check_finite(path: PathLike, key: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and not all_finite(value):
        raise ValueError(
            f"{os.fspath(path)!r}: saved tensor {_short(key)} holds NaN or Inf values; a "
            "checkpoint of a trained model never does (refusing to load it)"
        )


def _short(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: error messages quote hostile plans."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@contextlib.contextmanager
def _bounded_messages(limit: int = 1000) -> Iterator[None]:
    """A ``ValueError``/``TypeError`` raised while checking a checkpoint keeps its type but
    not an unbounded message (constructors quote the values a hostile plan gives them)."""
    try:
        yield
    except (ValueError, TypeError) as error:
        message = str(error)
        if len(message) <= limit:
            raise
        raise type(error)(f"{message[:limit]}... ({len(message)} characters)") from None


@contextlib.contextmanager
def _unreadable_as_value_error(path: PathLike) -> Iterator[None]:
    """A file that cannot be parsed (truncated, corrupted, not a checkpoint) becomes a
    ``ValueError`` naming it (torch reports a truncated archive as ``OSError(EINVAL)``);
    a missing or forbidden file keeps its ``OSError``."""
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as error:  # noqa: BLE001 - the readers raise many types for bad bytes
        raise ValueError(
            f"{os.fspath(path)!r} cannot be read as a checkpoint (truncated or corrupted?): "
            f"{type(error).__name__}: {str(error)[:200]}"
        ) from error


def _check_plan(plan: Any) -> None:
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise ValueError(f"not a factorization plan (format must be {FORMAT!r})")
    if plan.get("version") != VERSION:
        raise ValueError(
            f"plan version {_short(plan.get('version'))} is not supported "
            f"(this library reads {VERSION})"
        )
    entries = plan.get("layers")
    if not isinstance(entries, list):
        raise ValueError("the plan's 'layers' must be a list")
    names = set()
    for i, entry in enumerate(entries):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("name"), str)
            or not isinstance(entry.get("class"), str)
            or not isinstance(entry.get("config"), dict)
        ):
            raise ValueError(
                f"plan entry {i} must be a dict with str 'name', str 'class' and dict "
                f"'config', got {_short(entry)}"
            )
        if entry.get("quantization", None) not in (None, *QUANTIZATION_MODES):
            raise ValueError(
                f"plan entry {_short(entry['name'])}: quantization must be one of "
                f"{QUANTIZATION_MODES}, got {_short(entry['quantization'])}"
            )
        if entry["name"] in names:
            raise ValueError(f"plan names layer {_short(entry['name'])} twice")
        names.add(entry["name"])


def _build_replacements(
    model: nn.Module, plan: Dict[str, Any], saved: Mapping[str, Tuple[int, ...]]
) -> Dict[str, Tuple[nn.Module, nn.Module]]:
    """name -> (dense module, factorized layer built from the plan), all checked first.

    Layers are built on the meta device first; real memory is allocated only once the
    plan's layers together hold no more elements than the file and the dense layers
    they replace, so a plan claiming huge ranks is refused before anything
    proportional to its claim is allocated.
    """
    sources = registered_layers()
    by_name: Dict[str, type] = {}
    for cls in sources:
        if cls.__name__ in by_name:
            raise ValueError(
                f"two registered layer classes are named {cls.__name__!r} "
                f"({by_name[cls.__name__].__module__} and {cls.__module__}); a plan names "
                "classes by name, so register only one of them"
            )
        by_name[cls.__name__] = cls
    modules = dict(model.named_modules())
    checked: Dict[str, Tuple[nn.Module, type, Dict[str, Any]]] = {}
    claimed: Dict[str, int] = {}
    quantized: Dict[str, str] = {}
    for entry in plan["layers"]:
        name, class_name, config = entry["name"], entry["class"], entry["config"]
        if entry.get("quantization") is not None:
            quantized[name] = entry["quantization"]
        cls = by_name.get(class_name)
        if cls is None:
            raise TypeError(
                f"plan entry {_short(name)} names class {_short(class_name)}, which is not a "
                f"registered factorized layer (registered: {sorted(by_name)}); register it with "
                "factorized_layers.register_layer before loading"
            )
        if not callable(getattr(cls, "from_config", None)):
            raise TypeError(f"{class_name} has no from_config(); it cannot be loaded from a plan")
        module = modules.get(name)
        if module is None or not name:
            raise ValueError(f"plan entry {_short(name)}: the model has no such submodule")
        if type(module) is cls:
            if module.get_config() == config:
                continue  # already converted as planned (e.g. loading into a converted model)
            raise ValueError(
                f"plan entry {_short(name)}: the model already has a {class_name} there with "
                f"config {module.get_config()}, but the plan has {_short(config)}"
            )
        if not isinstance(module, sources[cls]):
            raise ValueError(
                f"plan entry {_short(name)}: {class_name} replaces "
                f"{[t.__name__ for t in sources[cls]]}, but the model has a "
                f"{type(module).__name__} there"
            )
        # On the meta device every failure is one of sizes: a RuntimeError or an
        # OverflowError there means sizes no real layer has.
        try:
            shell = cls.from_config(config, device="meta", dtype=module.weight.dtype)
            _check_equivalent(name, module, shell)
        except (TypeError, RuntimeError, OverflowError) as error:
            raise ValueError(
                f"plan entry {_short(name)}: bad {class_name} config: {error}"
            ) from None
        except ValueError as error:
            if str(error).startswith("plan entry"):
                raise
            raise ValueError(
                f"plan entry {_short(name)}: bad {class_name} config: {error}"
            ) from None
        checked[name] = (module, cls, config)
        claimed[name] = sum(t.numel() for t in shell.state_dict().values())
    _check_claimed_sizes(claimed, checked, saved)
    replacements = {}
    for name, (module, cls, config) in checked.items():
        weight = module.weight
        # The values are overwritten by the checkpoint: keep the caller's RNG stream.
        cuda = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            layer = cls.from_config(config, device=weight.device, dtype=weight.dtype)
        for parameter in layer.parameters():
            parameter.requires_grad_(weight.requires_grad)
        bias = getattr(module, "bias", None)
        if bias is not None and getattr(layer, "bias", None) is not None:
            layer.bias.requires_grad_(bias.requires_grad)
        replacements[name] = (module, layer.train(module.training))
    # Weight-tied layers converted together are rebuilt tied, as factorize_ left them.
    followers, _ = tied_groups(
        model, [(name, module, cls) for name, (module, cls, _) in checked.items()]
    )
    for follower, owner in followers.items():
        module, _, config = checked[follower]
        tied = replacements[owner][1].tie(module)
        if tied.get_config() != config:
            raise ValueError(
                f"plan entry {_short(follower)}: its weight is tied to {owner!r}, whose layer "
                f"shares factors of config {tied.get_config()}, but the plan has {_short(config)}"
            )
        replacements[follower] = (module, tied.train(module.training))
    for name, mode in quantized.items():
        if name in replacements:
            module, layer = replacements[name]
            try:
                replacements[name] = (module, apply_quantization(layer, mode))
            except ValueError as error:
                raise ValueError(f"plan entry {_short(name)}: {error}") from None
    return replacements


def _check_claimed_sizes(
    claimed: Mapping[str, int],
    checked: Mapping[str, Tuple[nn.Module, type, Dict[str, Any]]],
    saved: Mapping[str, Tuple[int, ...]],
) -> None:
    """The planned layers may not hold more elements than the file (see the caller)."""
    # Slack of the dense weights replaced: a plan a little off (a missing bias, a
    # strict=False load) gets the precise message of the weight check instead.
    held = sum(math.prod(shape) for shape in saved.values())
    held += sum(module.weight.numel() for module, _, _ in checked.values())
    if sum(claimed.values()) > held:
        largest = max(claimed, key=claimed.__getitem__)
        raise ValueError(
            f"the plan's layers would hold {sum(claimed.values())} elements but the "
            f"checkpoint holds {held}; the largest, {_short(largest)} "
            f"({checked[largest][1].__name__}), alone claims {claimed[largest]}: its ranks "
            "do not match the saved weights"
        )


def _check_equivalent(name: str, module: nn.Module, shell: nn.Module) -> None:
    """The plan's layer must compute a function of the dense module's type and options."""
    dense = shell.to_dense()
    adapter = source_for(module)
    expected, got = adapter.describe(module), adapter.describe(dense)
    if expected != got or dense.weight.shape != module.weight.shape:
        raise ValueError(
            f"plan entry {name!r}: the saved {type(shell).__name__} is a {got} "
            f"but the model has {expected}"
        )


def _check_weights(
    model: nn.Module,
    replacements: Mapping[str, Tuple[nn.Module, nn.Module]],
    saved: Mapping[str, Tuple[int, ...]],
    strict: bool,
) -> None:
    """Every saved weight must fit the converted model (checked before converting).

    ``safetensors`` stores a tied tensor once, so with ``strict`` a key may be
    missing when the same tensor is reachable under an earlier key.
    """
    replaced = {id(old): new for old, new in replacements.values()}
    expected: Dict[str, Tuple[int, ...]] = {}
    # Keys naming the same tensor form one group (a shared module, a tied weight);
    # safetensors stores one name per group, so strict needs one saved key per group.
    group_of: Dict[str, Tuple[Any, ...]] = {}
    prefixes = []
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in replaced and name:
            prefixes.append(name + ".")
            for key, value in replaced[id(module)].state_dict(keep_vars=True).items():
                expected[name + "." + key] = tuple(value.shape)
                group_of[name + "." + key] = ("replaced", id(value))
    for key, value in model.state_dict(keep_vars=True).items():
        if any(key.startswith(prefix) for prefix in prefixes):
            continue
        expected[key] = tuple(value.shape)
        group_of[key] = ("kept", id(value))
    mismatched = [
        f"{key}: saved {saved[key]}, model {shape}"
        for key, shape in expected.items()
        if key in saved and saved[key] != shape
    ]
    if mismatched:
        raise ValueError(f"saved weights do not fit the model: {mismatched[:10]}")
    if strict:
        present = {group_of[k] for k in expected if k in saved}
        missing = sorted(k for k in expected if group_of[k] not in present)
        unexpected = sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"saved weights do not match the converted model: missing {missing[:10]}, "
                f"unexpected {unexpected[:10]} (pass strict=False to allow)"
            )
