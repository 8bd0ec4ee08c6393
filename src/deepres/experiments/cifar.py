"""The paper's CIFAR-10 experiments (section 4.2): Table 6, Fig. 6, Table 3's shortcut options, Fig. 7."""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

from ..config import load_config
from ..data import load_dataset
from ..runs import load_checkpoint, load_for_inference
from ..evaluation import layer_responses
from ..models import count_parameters, create_model
from .base import (Experiment, Options, RunResult, RunSpec, cifar_data_overrides, register_experiment, scale_overrides,
                   shortened_schedule)

# Table 6: depth -> (parameters in millions, test error %). ResNet-110: best of 5 runs; their mean is
# PAPER_110_MEAN (mean +/- std).
PAPER_TABLE6 = {20: (0.27, 8.75), 32: (0.46, 7.51), 44: (0.66, 7.17), 56: (0.85, 6.97), 110: (1.7, 6.43),
                1202: (19.4, 7.93)}
PAPER_110_MEAN = (6.61, 0.16)
DEPTHS = [20, 32, 44, 56, 110]


# At laptop scale (an hour of two CPU cores) Fig. 6 and Fig. 7 run at depths 20 and 56, Table 6 up to 56.
LAPTOP_DEPTHS = [20, 56]


def _depths(options: Options, depths: list[int], laptop: list[int] | None = None) -> list[int]:
    """``depths`` restricted to ``options.depths`` when given (a depth the experiment does not train is an error),
    else at laptop scale to ``laptop``."""
    if options.depths is None:
        return [d for d in depths if d in laptop] if laptop and options.scale == "laptop" else depths
    unknown = sorted(set(options.depths) - set(depths))
    if unknown:
        raise ValueError(f"--depths {unknown} not in this experiment's depths {depths}")
    return [d for d in depths if d in options.depths]


def _runs(options: Options, families: list[str], depths: list[int], extra: list[str] = (), tag: str = "",
          laptop: list[int] | None = None) -> list[RunSpec]:
    data, _ = cifar_data_overrides(options.data_dir)
    specs = []
    for family in families:
        for depth in _depths(options, depths, laptop):
            for seed in range(options.seeds):
                name = f"cifar10-{family}{depth}{tag}-s{seed}"
                schedule = shortened_schedule(options.iterations) if options.iterations else []
                overrides = data + scale_overrides(options) + schedule + [f"train.seed={seed}", *extra]
                specs.append(RunSpec(name, f"paper/cifar10_{family}{depth}", overrides,
                                     {"family": family, "depth": depth, "seed": seed}))
    return specs


def _mean_std(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "diverged"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +/- {statistics.stdev(values):.2f}"


def _final(result: RunResult, key: str) -> float:
    """The last logged value; NaN for a run that diverged before logging it."""
    _, values = result.series(key)
    return values[-1] if values and not result.summary.get("diverged") else math.nan


def _by(results: list[RunResult], family: str) -> dict[int, list[RunResult]]:
    out: dict[int, list[RunResult]] = {}
    for r in results:
        if r.spec.meta["family"] == family:
            out.setdefault(r.spec.meta["depth"], []).append(r)
    return dict(sorted(out.items()))


def _data_line(options: Options, results: list[RunResult] | None = None) -> str:
    """The data, and which training images the runs used (all of them, as the authors' released code, or the 45k/5k
    split that fixed the schedule)."""
    line = f"Data: {cifar_data_overrides(options.data_dir)[1]}."
    sizes = set()
    for r in results or []:
        config_file = r.run_dir / "config.yaml"
        if config_file.is_file():
            sizes.add(load_config(config_file).data.val_size)
    if sizes == {0}:
        line += (" Training on every training image, no validation split (as the authors' released code; the 45k/5k "
                 "split that fixed the schedule is `--set data.val_size=5000`).")
    elif sizes:
        line += (f" Training images less a validation split of {', '.join(str(v) for v in sorted(sizes))} "
                 "(the paper fixed its schedule on a 45k/5k split).")
    return line + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Table 6


def plan_table6(options: Options) -> list[RunSpec]:
    depths = DEPTHS + ([1202] if options.include_1202 else [])
    return _runs(options, ["resnet"], depths, laptop=[20, 32, 44, 56])


def _warmup_hold(results: list[RunResult]) -> list[str]:
    """How long the paper's ResNet-110 warm-up held lr 0.01 in each run that used it (runs that predate the
    summary's ``error_warmup_iterations`` are left out)."""
    held = [r for r in results if "error_warmup_iterations" in r.summary]
    if not held:
        return []
    parts = []
    for r in held:
        n = r.summary["error_warmup_iterations"]
        parts.append(f"{r.run_dir.name} {'never (the whole run)' if n is None else f'{n:,}'}")
    return ["", "The paper's ResNet-110 warm-up (section 4.2: lr 0.01 until the training error is below 80%, about "
            "400 iterations, then 0.1) held lr 0.01 for these iterations: " + "; ".join(parts) + "."]


def analyze_table6(options: Options, results: list[RunResult], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [_data_line(options, results), "| net | params (ours) | params (paper) | test error % (ours, over seeds) "
             "| test error % (paper) |", "|---|---|---|---|---|"]
    ours_x, ours_y, by_depth = [], [], {}
    for depth, runs in _by(results, "resnet").items():
        errors = by_depth[depth] = [_final(r, "test_top1_error") for r in runs]
        params = count_parameters(create_model(f"resnet{depth}")) / 1e6
        p_params, p_error = PAPER_TABLE6[depth]
        if depth == 110:
            p_error = f"{p_error} (best of 5); {PAPER_110_MEAN[0]} +/- {PAPER_110_MEAN[1]} (mean of 5)"
        lines.append(f"| ResNet-{depth} | {params:.2f}M | {p_params}M | {_mean_std(errors)} (n={len(errors)}) | "
                     f"{p_error} |")
        ours_x.append(depth)
        ours_y.append(statistics.mean(errors))
    lines += _warmup_hold(results)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    several = any(len(errors) > 1 for errors in by_depth.values())
    spread = [statistics.stdev(by_depth[d]) if len(by_depth[d]) > 1 else 0.0 for d in ours_x]
    ax.errorbar(ours_x, ours_y, yerr=spread if several else None, fmt="o-", capsize=3,
                label="ours (mean +/- std, seeds as dots)" if several else "ours")
    if several:
        for depth in ours_x:
            ax.plot([depth] * len(by_depth[depth]), by_depth[depth], ".", color="C0", alpha=0.5)
    ax.plot(ours_x, [PAPER_TABLE6[d][1] for d in ours_x], "s--", label="paper (Table 6)")
    ax.set(xscale="log", xlabel="depth", ylabel="test error (%)", title="CIFAR-10 ResNets")
    ax.set_xticks(ours_x, [str(d) for d in ours_x])
    ax.minorticks_off()  # the log axis' own minor labels (3x10^1, ...) would overlap the depths
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "table6.png", dpi=110)
    plt.close(fig)
    lines += ["", "![test error against depth](plots/table6.png)", "", "## The paper's findings on our runs", "",
              "Table 6: test error falls with depth from 20 to 110 layers (8.75, 7.51, 7.17, 6.97, 6.43).", ""]
    depths = [d for d in DEPTHS if d in by_depth]
    for shallow, deep in zip(depths, depths[1:]):
        lines.append(lower(f"ResNet-{deep} has lower test error than ResNet-{shallow}", by_depth[shallow],
                           by_depth[deep]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Fig. 6: degradation


def plan_degradation(options: Options) -> list[RunSpec]:
    return _runs(options, ["plain", "resnet"], DEPTHS, laptop=LAPTOP_DEPTHS)


def _curves(ax, runs_by_depth: dict[int, list[RunResult]], title: str, name: str) -> None:
    colors = ["tab:orange", "tab:blue", "tab:red", "tab:green", "black"]
    for color, (depth, runs) in zip(colors, runs_by_depth.items()):
        r = runs[0]
        ax.plot(*r.series("train_top1_error"), "--", color=color, lw=0.8)
        ax.plot(*r.series("test_top1_error"), "-", color=color, lw=2, label=f"{name}-{depth}")
    ax.set(xlabel="iteration", ylabel="error (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()


def verdict(claim: str, holds: bool | None) -> str:
    """One line of a report's findings section."""
    return f"- {claim}: " + ("holds" if holds else "does not hold" if holds is not None
                             else "not measured (a run missing or diverged)")


def lower(claim: str, higher: list[float] | None, lower_: list[float] | None, digits: int = 2,
          unit: str = " points") -> str:
    """The findings line of a claim that one net's value (``lower_``, over seeds; an error in points unless ``unit``
    says otherwise) is below another's (``higher``): holds or not, by how much (to ``digits`` decimals), and whether
    the difference exceeds the seeds' spread (the larger of the two standard deviations) when both have several
    seeds."""
    if not higher or not lower_ or any(math.isnan(v) for v in higher + lower_):
        return verdict(claim, None)
    diff = round(statistics.mean(higher) - statistics.mean(lower_), digits)  # a tie when rounded: equal, not -0.00
    line = verdict(claim, diff > 0) + (f" (by {diff:.{digits}f}{unit}" if diff > 0 else
                                       f" ({-diff:.{digits}f}{unit} the other way" if diff < 0 else " (equal means")
    if min(len(higher), len(lower_)) < 2:
        return line + ", one seed)"
    spread = max(statistics.stdev(higher), statistics.stdev(lower_))
    return line + f"; seed spread {spread:.{digits}f}: {'beyond' if abs(diff) > spread else 'within'} it)"


def analyze_degradation(options: Options, results: list[RunResult], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain, resnet = _by(results, "plain"), _by(results, "resnet")
    top = {"smoke": 100, "laptop": 80}.get(options.scale, 20)  # the paper's Fig. 6 shows 0-20%
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, runs, title, name in ((axes[0], plain, "plain nets", "plain"), (axes[1], resnet, "ResNets", "ResNet")):
        _curves(ax, runs, title, name)
        ax.set_ylim(0, top)
    fig.suptitle("CIFAR-10: training error (dashed), test error (bold)")
    fig.tight_layout()
    fig.savefig(out / "plots" / "degradation.png", dpi=110)
    plt.close(fig)

    lines = [_data_line(options, results),
             "| net | final training error % | final test error % | paper test error % |", "|---|---|---|---|"]
    final: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for family, runs_by_depth in (("plain", plain), ("resnet", resnet)):
        for depth, runs in runs_by_depth.items():
            tr, te = [_final(r, "train_top1_error") for r in runs], [_final(r, "test_top1_error") for r in runs]
            final[(family, depth)] = tr, te
            paper = PAPER_TABLE6[depth][1] if family == "resnet" else "(curves only)"
            net = f"{'Plain' if family == 'plain' else 'ResNet'}-{depth}"
            lines.append(f"| {net} | {_mean_std(tr)} | {_mean_std(te)} | {paper} |")
    lines += _warmup_hold(results)
    lines += ["", "Training error is over the last logged window of augmented training batches.", "",
              "![plain and residual panels](plots/degradation.png)", "", "## The paper's findings on our runs", ""]
    trained = {r.spec.meta["depth"] for r in results}
    for claim, a, b, idx in (("plain-56 has higher training error than plain-20 (degradation)", ("plain", 56),
                              ("plain", 20), 0),
                             ("ResNet-56 has lower training error than plain-56 (residual learning eases optimisation)",
                              ("plain", 56), ("resnet", 56), 0),
                             ("ResNet-56 has lower test error than ResNet-20", ("resnet", 20), ("resnet", 56), 1),
                             ("ResNet-110 has lower test error than ResNet-56", ("resnet", 56), ("resnet", 110), 1)):
        if {a[1], b[1]} <= trained:  # claims about depths this invocation did not train are left out
            lines.append(lower(claim, final.get(a, ([], []))[idx], final.get(b, ([], []))[idx]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Table 3 at CIFAR scale: plain vs shortcut options A, B, C on the same 32-layer net


def plan_shortcuts(options: Options) -> list[RunSpec]:
    # The comparison is on 32-layer nets; --depths picks other depths instead.
    depths = options.depths or [32]
    options = dataclasses.replace(options, depths=None)
    specs = _runs(options, ["plain"], depths)
    for option in "ABC":
        # Option A is the CIFAR nets' own shortcut (section 4.2): that run is Table 6's and Fig. 6's, shared.
        extra, tag = ([], "") if option == "A" else ([f"model.shortcut={option}"], f"-{option}")
        for s in _runs(options, ["resnet"], depths, extra, tag=tag):
            s.meta["shortcut"] = option
            specs.append(s)
    return specs


def analyze_shortcuts(options: Options, results: list[RunResult], out: Path) -> str:
    lines = [_data_line(options, results),
             "Table 3 compares the options on ImageNet ResNet-34 (top-1 10-crop error: plain 28.54, A 25.03, "
             "B 24.52, C 24.19); here the same comparison on CIFAR-10 (32-layer nets unless --depths says "
             "otherwise).", "",
             "| net | shortcut | params | test error % |", "|---|---|---|---|"]
    groups: dict[tuple[int, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.meta["depth"], r.spec.meta.get("shortcut", "plain")), []).append(r)
    errors = {key: [_final(r, "test_top1_error") for r in runs] for key, runs in groups.items()}
    for depth in sorted({d for d, _ in groups}):
        for key in ["plain", "A", "B", "C"]:
            if (depth, key) not in groups:
                continue
            model = create_model(f"plain{depth}") if key == "plain" else create_model(f"resnet{depth}", shortcut=key)
            lines.append(f"| {'plain' if key == 'plain' else 'ResNet'}-{depth} | {key} | "
                         f"{count_parameters(model):,} | {_mean_std(errors[(depth, key)])} |")
    lines += ["", "## The paper's findings on our runs", "",
              "Table 3 (ImageNet): all three options are considerably better than plain; B is slightly better than A "
              "(A's zero-padded dimensions learn no residual); C is marginally better than B.", ""]
    for depth in sorted({d for d, _ in groups}):
        err = {key: errors.get((depth, key), []) for key in ("plain", "A", "B", "C")}
        claims = [(f"option {o} has lower test error than plain-{depth}", "plain", o) for o in "ABC"]
        claims += [(f"option B has lower test error than option A ({depth} layers)", "A", "B"),
                   (f"option C has lower test error than option B ({depth} layers)", "B", "C")]
        lines += [lower(claim, err[a], err[b]) for claim, a, b in claims if err[a] and err[b]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Fig. 7: layer responses of trained nets


RESPONSE_NETS = [("plain", 20), ("plain", 56), ("resnet", 20), ("resnet", 56), ("resnet", 110)]


def plan_responses(options: Options) -> list[RunSpec]:
    chosen = options.depths or (LAPTOP_DEPTHS if options.scale == "laptop" else None)
    wanted = [(f, d) for f, d in RESPONSE_NETS if chosen is None or d in chosen]
    depths = sorted({d for _, d in wanted})
    return [s for s in _runs(options, ["plain", "resnet"], depths) if (s.meta["family"], s.meta["depth"]) in wanted]


def analyze_responses(options: Options, results: list[RunResult], out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[list[float]]] = {}  # net -> each seed's std per layer
    test_images = None
    for r in sorted(results, key=lambda r: r.spec.meta["seed"]):
        ckpt = load_checkpoint(r.run_dir / "checkpoints" / "last.pt")
        model, normalizer, config = load_for_inference(ckpt)
        if test_images is None:
            dataset = load_dataset(config.data)
            test_images = normalizer(dataset.test.images[:1000])
        stds = [row["std"] for row in layer_responses(model, test_images)]
        curves.setdefault(f"{r.spec.meta['family']}-{r.spec.meta['depth']}", []).append(stds)
    seeds = max(len(runs) for runs in curves.values())
    fig, (ax_layer, ax_sorted) = plt.subplots(2, 1, figsize=(8, 7))
    for label, runs in curves.items():
        style = "--" if label.startswith("plain") else "-"
        layer_mean = [statistics.mean(column) for column in zip(*runs)]
        sorted_mean = [statistics.mean(column) for column in zip(*(sorted(stds, reverse=True) for stds in runs))]
        ax_layer.plot(range(1, len(layer_mean) + 1), layer_mean, style, label=label)
        ax_sorted.plot(range(1, len(sorted_mean) + 1), sorted_mean, style, label=label)
    ax_layer.set(xlabel="layer index (original)", ylabel="std" + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    ax_sorted.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (ax_layer, ax_sorted):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "layer_responses.png", dpi=110)
    plt.close(fig)
    means = {label: [statistics.mean(stds) for stds in runs] for label, runs in curves.items()}  # per seed
    lines = [_data_line(options, results), "Standard deviation of each 3x3 layer's response (after BN, before the "
             "addition and ReLU) on 1,000 test images; the paper finds residual responses smaller than plain ones, "
             "and smaller still in deeper ResNets. Mean std: the mean over a net's layers"
             + (", then mean +/- std over seeds; the plot shows the seeds' mean per layer." if seeds > 1 else "."),
             "", "| net | layers | mean std |", "|---|---|---|"]
    for label, runs in curves.items():
        values = means[label]
        shown = (f"{statistics.mean(values):.3f} +/- {statistics.stdev(values):.3f} (n={len(values)})"
                 if len(values) > 1 else f"{values[0]:.3f}")
        lines.append(f"| {label} | {len(runs[0])} | {shown} |")
    lines += ["", "![layer responses](plots/layer_responses.png)", "", "## The paper's findings on our runs", ""]

    def smaller(a: str, b: str) -> str:  # a's responses below b's, over seeds
        name = lambda label: label.replace("resnet", "ResNet")  # noqa: E731
        claim = (f"{name(a)}'s responses are smaller than {name(b)}'s (mean std {statistics.mean(means[a]):.3f} vs "
                 f"{statistics.mean(means[b]):.3f})")
        return lower(claim, means[b], means[a], digits=3, unit="")

    depths = sorted({int(label.split("-")[1]) for label in means})
    for depth in depths:
        if f"plain-{depth}" in means and f"resnet-{depth}" in means:
            lines.append(smaller(f"resnet-{depth}", f"plain-{depth}"))
    resnets = [d for d in depths if f"resnet-{d}" in means]
    for shallow, deep in zip(resnets, resnets[1:]):
        lines.append(smaller(f"resnet-{deep}", f"resnet-{shallow}"))
    return "\n".join(lines)


register_experiment(Experiment("cifar-table6", "CIFAR-10 ResNets against Table 6", plan_table6, analyze_table6,
                               shortens=True, scales=("smoke", "laptop", "full")))
register_experiment(Experiment("cifar-degradation", "Degradation on CIFAR-10 (Fig. 6)", plan_degradation,
                               analyze_degradation, shortens=True, scales=("smoke", "laptop", "full")))
register_experiment(Experiment("shortcuts", "Shortcut options A, B, C (Table 3, at CIFAR scale)", plan_shortcuts,
                               analyze_shortcuts, shortens=True, scales=("smoke", "laptop", "full")))
register_experiment(Experiment("layer-responses", "Layer responses (Fig. 7)", plan_responses, analyze_responses,
                               shortens=True, scales=("smoke", "laptop", "full")))
