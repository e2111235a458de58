"""Turn bench_kl.py / bench_regularizer.py / bench_family.py JSON results into markdown and a PNG.

python benchmarks/report.py results/*.json --png benchmarks/kl_benchmark.png
"""

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

BASELINES = {"kl_keras logits": "keras softmax+KLD", "kl_keras probs": "keras KLD probs"}


PEERS = ("torch kl_div", "optax kl_divergence")


def _ratio(value):
    return "" if value is None else f"{value:.2f}"


def kl_table(result):
    lines = [
        f"**{result['backend']}** ({result['mode']}), Keras {result['keras']}",
        "",
        "| size | contender | median ms | × memory floor | × what it replaces | × native peer "
        "| peak memory × one input | XLA temp × one input |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for size, entry in result["sizes"].items():
        rows = entry["rows"]
        floor = rows["memory floor"]["median_ms"]
        peer = next((rows[name]["median_ms"] for name in PEERS if name in rows), None)
        for name, row in rows.items():
            versus = ""
            if name in BASELINES:
                versus = f"{row['median_ms'] / rows[BASELINES[name]]['median_ms']:.2f}"
            versus_peer = ""
            if peer is not None and name == "kl_keras logits":
                versus_peer = f"{row['median_ms'] / peer:.2f}"
            lines.append(
                f"| {size} {tuple(entry['shape'])} | {name} | {row['median_ms']:.2f} "
                f"| {row['median_ms'] / floor:.2f} | {versus} | {versus_peer} "
                f"| {_ratio(row.get('peak_over_input'))} | {_ratio(row['temp_over_input'])} |"
            )
    return "\n".join(lines)


def regularizer_table(result):
    lines = [
        f"**{result['backend']}**, Keras {result['keras']}: one training step of "
        f"{result['model']}, batch {result['batch_size']}",
        "",
        "| activity regularizer | median ms | × L1 step | × no regularizer |",
        "|---|---:|---:|---:|",
    ]
    rows = result["rows"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['median_ms']:.2f} | {row['median_ms'] / rows['L1']['median_ms']:.2f} "
            f"| {row['median_ms'] / rows['none']['median_ms']:.2f} |"
        )
    return "\n".join(lines)


def family_table(result):
    lines = [
        f"**{result['backend']}** ({result['mode']}), Keras {result['keras']}: from logits, "
        "fwd+bwd, ratio to the naive `keras.ops` form",
        "",
        "| size | divergence | contender | median ms | × naive |",
        "|---|---|---|---:|---:|",
    ]
    for size, entry in result["family"].items():
        for divergence, timings in entry["rows"].items():
            for name, ms in timings.items():
                lines.append(
                    f"| {size} {tuple(entry['shape'])} | {divergence} | {name} | {ms:.2f} "
                    f"| {ms / timings['naive']:.2f} |"
                )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+")
    parser.add_argument("--png", help="write a chart of the KL results here")
    args = parser.parse_args()
    results = [json.load(open(path)) for path in args.results]
    kl_results = [r for r in results if "sizes" in r]
    for result in results:
        if "sizes" in result:
            print(kl_table(result))
        elif "family" in result:
            print(family_table(result))
        else:
            print(regularizer_table(result))
        print()
    if args.png and kl_results:
        names = ["kl_keras logits", "keras softmax+KLD", "kl_keras probs", "keras KLD probs"]
        figure, axes = plt.subplots(
            1, len(kl_results), figsize=(5 * len(kl_results), 4), squeeze=False
        )
        for axis, result in zip(axes[0], kl_results, strict=True):
            sizes = list(result["sizes"])
            width = 0.8 / len(names)
            for i, name in enumerate(names):
                ratios = [
                    result["sizes"][s]["rows"][name]["median_ms"]
                    / result["sizes"][s]["rows"]["memory floor"]["median_ms"]
                    for s in sizes
                ]
                axis.bar([j + i * width for j in range(len(sizes))], ratios, width, label=name)
            axis.axhline(1.0, color="black", linewidth=0.8)
            axis.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
            axis.set_ylabel("fwd+bwd time / memory floor")
            axis.set_title(f"{result['backend']} ({result['mode']})")
        axes[0][0].legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
