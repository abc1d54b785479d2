"""HDEE: homogeneous vs size- and step-heterogeneous domain-expert ensembles at equal compute.

    python experiments/hdee/run.py                # full grid (3 seeds) -> README table, plots
    python experiments/hdee/run.py --grid=quick   # one seed, short runs -> results/quick*

A sweep over ``configs/hdee.py`` (every run is a ``python -m decjax.train`` config run). Per
seed: one seed run (``ensemble=seed``: a seed model per width S, M, L trained on the mixture
of all training domains); then, branched from it (``run.init_from``), each of HDEE's three
ensembles (M_Ho-I_Ho, M_He-I_Ho, M_Ho-I_He: one expert per difficulty group, branched from the
seed of its width and trained on its group's domains, all experts in one vmapped program) and
a dense model of the medium width trained on all training domains with an ensemble's compute.
Every run scores each domain on its *test* rows, the ensembles with the BTM prior estimated on
*validation* rows. Finished runs whose stored config is unchanged are reused
(:func:`decjax.train.sweep.sweep`), so an interrupted grid resumes where it stopped; tables and
plots are written once every run of the grid has finished.
"""

import gzip
import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402

from configs import hdee as hdee_config  # noqa: E402
from decjax import ensemble  # noqa: E402
from decjax.data import default_cache_dir  # noqa: E402
from decjax.data.sources import load_pystdlib  # noqa: E402
from decjax.models.llama import LlamaConfig  # noqa: E402
from decjax.train import experts  # noqa: E402
from decjax.train.records import (  # noqa: E402
    read_jsonl,
    replace_results_block,
    write_atomically,
)
from decjax.train.sweep import sweep_or_exit  # noqa: E402

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which grid to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")

# The domains, models and step budgets are those of configs/hdee.py (size=small; quick: the
# same with short step counts); the grid adds the training seeds.
GRIDS = {"full": dict(size="small", seeds=(0, 1, 2)), "quick": dict(size="quick", seeds=(0,))}
ENSEMBLES = ensemble.ENSEMBLE_NAMES  # ("M_Ho-I_Ho", "M_He-I_Ho", "M_Ho-I_He")
HETEROGENEOUS = ENSEMBLES[1:]
LABELS = {"M_Ho-I_Ho": "M_Ho-I_Ho (homogeneous)", "M_He-I_Ho": "M_He-I_Ho (sizes S/M/L)",
          "M_Ho-I_He": "M_Ho-I_He (steps T-Δ/T/T+Δ)", "dense": "dense (same compute)",
          "seed": "seed M (before expert training)"}
COLORS = {"M_Ho-I_Ho": "tab:gray", "M_He-I_Ho": "tab:blue", "M_Ho-I_He": "tab:red",
          "dense": "black", "seed": "tab:olive"}
MODES = {"uniform_posterior": "uniform-prior posterior",
         "cached_prior": "BTM cached prior (val)",
         "top1": "top-1 by cached prior",
         "logprob_average_not_mixture": "log-prob average (not a mixture)"}
HEADLINE = "cached_prior"
ONE_MODEL = {"dense": "dense", "seed": "seed_M"}  # runs scored as one model: which one


# -- the grid -----------------------------------------------------------------------------------


def grid_configs(out: pathlib.Path, grid: dict) -> tuple[dict, dict]:
    """``({seed run name: config}, {branched run name: config})`` of the grid."""
    seeds, branched = {}, {}
    for seed in grid["seeds"]:
        seeds[f"seed-s{seed}"] = hdee_config.get_config(
            f"ensemble=seed,seed={seed},size={grid['size']}")
        for name in (*ENSEMBLES, "dense"):
            config = hdee_config.get_config(f"ensemble={name},seed={seed},size={grid['size']}")
            config.run.init_from = str(out / "runs" / f"seed-s{seed}")
            branched[f"{name}-s{seed}"] = config
    return seeds, branched


def run_all(out: pathlib.Path, grid: dict) -> dict:
    """Every run of the grid, trained or reused: ``{(kind, seed): result.json}`` and more."""
    seed_configs, branched_configs = grid_configs(out, grid)
    run = experts.run_config(next(iter(seed_configs.values())))
    corpus, vocab_size, rates = experts.load_corpus(run)
    facts = domain_facts(run, corpus, rates)
    ensembles, dense = make_ensembles(run, vocab_size)
    budget = budget_report(ensembles, dense, run.tokens_per_step)
    print(budget, flush=True)
    workdirs = sweep_or_exit(seed_configs, out / "runs")
    workdirs.update(sweep_or_exit(branched_configs, out / "runs"))
    runs = {}
    for name, workdir in workdirs.items():
        kind, _, seed = name.rpartition("-s")
        result = json.loads((workdir / "result.json").read_text())
        result["curves"] = [r for r in read_jsonl(workdir / "metrics.jsonl")
                            if r["split"] == "val"]
        runs[(kind, int(seed))] = result
    return {"runs": runs, "facts": facts, "budget": budget, "dense": dense, "run": run}


def domain_facts(run: experts.ExpertsConfig, corpus, rates: dict) -> dict:
    """Per domain: its group, row counts, and the Markov entropy rate or the code's gzip ratio."""
    stdlib = [d for d in corpus.domains if not experts.is_synthetic(d)]
    texts = load_pystdlib(stdlib, run.stdlib_bytes)
    groups = {d: difficulty for ds, difficulty in run.groups for d in ds}
    facts = {"domains": {}}
    for d in corpus.domains:
        info = {f"{split}_rows": len(corpus.rows[split][d]) for split in ensemble.SPLITS}
        info["group"] = groups.get(d, "held-out")
        if d in rates:
            info["entropy_rate"] = rates[d]
        else:
            raw = "".join(texts[d]).encode()
            info["gzip_ratio"] = len(gzip.compress(raw, 9)) / len(raw)
        facts["domains"][d] = info
    return facts


def make_ensembles(run: experts.ExpertsConfig, vocab_size: int):
    """HDEE's three ensembles and the dense reference of ``run``'s setup."""
    base = LlamaConfig(vocab_size=vocab_size, d_model=run.d_model, n_heads=run.n_heads,
                       n_layers=run.n_layers)
    ensembles = ensemble.hdee_ensembles(base, run.groups, d_ff=run.d_ff, steps=run.steps)
    dense = ensemble.dense_reference(base, d_ff=run.d_ff[1], domains=run.training_domains,
                                     ensemble=ensembles["M_Ho-I_Ho"])
    return ensembles, dense


def budget_report(ensembles, dense, tokens_per_step: int) -> str:
    """check_budget's table (it raises if the ensembles' budgets differ) and the dense line."""
    table = ensemble.check_budget(ensembles, tokens_per_step=tokens_per_step)
    budgets = {name: ensemble.ensemble_budget(specs) for name, specs in ensembles.items()}
    dense_budget = ensemble.ensemble_budget([dense])
    ref = next(iter(budgets.values()))
    return (table + f"\n{'dense':12s} {dense.name:24s} {dense.d_ff:6d} "
            f"{ensemble.non_embedding_params(dense.config):10,d} {dense.steps:7d} "
            f"{dense_budget:14,d} {6 * dense_budget * tokens_per_step:10.3e} "
            f"{dense_budget / ref - 1:+9.3%}")


# -- tables -------------------------------------------------------------------------------------


def ppl(runs, name, seeds, domain, mode=HEADLINE) -> np.ndarray:
    """Test perplexity per seed of an ensemble (in ``mode``), the dense model or the seed."""
    if name in ONE_MODEL:
        return np.array([runs[(name, s)]["test"][domain]["experts"][ONE_MODEL[name]]
                         for s in seeds])
    return np.array([runs[(name, s)]["test"][domain]["modes"][mode] for s in seeds])


def mean_std(values, digits=2) -> str:
    values = np.asarray(values)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def compare(runs, seeds, domain, mode=HEADLINE) -> dict:
    """Best ensemble by mean perplexity, and whether its edge over homogeneous is seed noise.

    A tie: the paired per-seed difference to M_Ho-I_Ho has ``|mean| <= 2 * std / sqrt(n)``
    (its 2-standard-error interval contains zero); undecidable with one seed.
    """
    means = {n: ppl(runs, n, seeds, domain, mode).mean() for n in ENSEMBLES}
    best = min(means, key=means.get)
    out = {"best": best, "heterogeneous": best in HETEROGENEOUS, "tie": None}
    if best != "M_Ho-I_Ho" and len(seeds) > 1:
        diff = ppl(runs, best, seeds, domain, mode) - ppl(runs, "M_Ho-I_Ho", seeds, domain, mode)
        out["tie"] = bool(abs(diff.mean()) <= 2 * diff.std(ddof=1) / np.sqrt(len(seeds)))
    return out


def beats(runs, seeds, name, domain, mode=HEADLINE) -> tuple[bool, bool]:
    """``(lower mean perplexity than M_Ho-I_Ho, beyond 2 standard errors)``."""
    diff = ppl(runs, name, seeds, domain, mode) - ppl(runs, "M_Ho-I_Ho", seeds, domain, mode)
    clear = len(seeds) > 1 and abs(diff.mean()) >= 2 * diff.std(ddof=1) / np.sqrt(len(seeds))
    return bool(diff.mean() < 0), bool(clear and diff.mean() < 0)


def domain_table(runs, facts, seeds) -> str:
    lines = ["| domain | group | floor | seed M | dense | M_Ho-I_Ho | M_He-I_Ho | M_Ho-I_He "
             "| best | top-1 expert (M_Ho-I_Ho, seed 0) |", "|---" * 10 + "|"]
    for d, info in facts["domains"].items():
        floor = (f"{np.exp(info['entropy_rate']):.2f}" if "entropy_rate" in info
                 else f"gzip {info['gzip_ratio']:.3f}")
        cells = {n: ppl(runs, n, seeds, d) for n in ENSEMBLES}
        best = compare(runs, seeds, d)
        marks = {n: (f"**{mean_std(v)}**" if n == best["best"] else mean_std(v))
                 for n, v in cells.items()}
        tie = {None: "", True: " (tie)", False: ""}[best["tie"]]
        top1 = runs[("M_Ho-I_Ho", seeds[0])]["test"][d]["top1"]
        lines.append(f"| {d} | {info['group']} | {floor} | {mean_std(ppl(runs, 'seed', seeds, d))} "
                     f"| {mean_std(ppl(runs, 'dense', seeds, d))} | {marks['M_Ho-I_Ho']} "
                     f"| {marks['M_He-I_Ho']} | {marks['M_Ho-I_He']} | {best['best']}{tie} "
                     f"| {top1} |")
    return "\n".join(lines)


def geomean_ppl(runs, name, seeds, domains, mode) -> np.ndarray:
    """Per seed, exp of the mean log perplexity over ``domains``."""
    return np.exp(np.mean([np.log(ppl(runs, name, seeds, d, mode)) for d in domains], axis=0))


def mode_table(runs, facts, seeds, run: experts.ExpertsConfig) -> str:
    splits = {"training domains": run.training_domains, "held-out domains": run.held_out}
    lines = ["| model | prediction | " + " | ".join(splits) + " |",
             "|---|---|" + "---|" * len(splits)]
    for name in ENSEMBLES:
        for mode, label in MODES.items():
            cells = [mean_std(geomean_ppl(runs, name, seeds, ds, mode), 3)
                     for ds in splits.values()]
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    for name in ("dense", "seed"):
        cells = [mean_std(geomean_ppl(runs, name, seeds, ds, None), 3) for ds in splits.values()]
        lines.append(f"| {LABELS[name]} | one model | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins_table(runs, facts, seeds) -> tuple[str, dict]:
    domains = list(facts["domains"])
    lines = ["| mode | heterogeneous lowest (of which ties) | M_He-I_Ho < M_Ho-I_Ho (clear) "
             "| M_Ho-I_He < M_Ho-I_Ho (clear) | dense < every ensemble |",
             "|---|---|---|---|---|"]
    summary = {}
    for mode in MODES:
        results = [compare(runs, seeds, d, mode) for d in domains]
        wins = sum(r["heterogeneous"] for r in results)
        ties = sum(bool(r["tie"]) for r in results if r["heterogeneous"])
        tie_text = f"{ties}" if len(seeds) > 1 else "n/a, one seed"
        cells = []
        for name in HETEROGENEOUS:
            b = [beats(runs, seeds, name, d, mode) for d in domains]
            cells.append(f"{sum(x for x, _ in b)} ({sum(y for _, y in b)})")
        dense = sum(ppl(runs, "dense", seeds, d).mean()
                    < min(ppl(runs, n, seeds, d, mode).mean() for n in ENSEMBLES) for d in domains)
        lines.append(f"| {MODES[mode]} | {wins} of {len(domains)} ({tie_text}) | {cells[0]} "
                     f"| {cells[1]} | {dense} of {len(domains)} |")
        summary[mode] = {"wins": wins, "ties": ties, "domains": len(domains)}
    return "\n".join(lines), summary


def results_text(everything, grid, grid_name) -> tuple[str, dict]:
    runs, facts, seeds = everything["runs"], everything["facts"], list(grid["seeds"])
    wins, summary = wins_table(runs, facts, seeds)
    head = summary[HEADLINE]
    run = everything["run"]
    wall = sum(r["wall_seconds"] for r in runs.values())
    steps, d_ff = run.steps, run.d_ff
    text = [
        f"Test perplexity per byte, mean ± std over seeds {', '.join(map(str, seeds))} "
        f"({len(seeds)} seed{'s' * (len(seeds) > 1)}). Ensembles: d_ff S/M/L = "
        f"{'/'.join(map(str, d_ff))}, steps T−Δ/T/T+Δ = {'/'.join(map(str, steps))}, "
        f"{run.batch_size} × {run.seq_len} tokens per step per model; seed models "
        f"{run.seed_steps} steps; dense = d_ff {d_ff[1]}, "
        f"{everything['dense'].steps} steps from the M seed. Ensemble columns use the BTM "
        "cached prior estimated on validation rows; **bold** = lowest of the three ensembles; "
        "\"(tie)\" = its edge over M_Ho-I_Ho is within 2 standard errors of the per-seed paired "
        "difference. Floor = exp(entropy rate) for Markov domains (the best achievable "
        "perplexity); for code, the gzip -9 compression ratio instead.",
        "", domain_table(runs, facts, seeds), "",
        f"**Heterogeneous ensemble lowest on {head['wins']} of {head['domains']} domains** "
        f"(cached prior; {head['ties'] if len(seeds) > 1 else 'n/a'} of these within seed "
        "noise). Per mode, counting domains by mean perplexity; \"clear\" = beyond 2 standard "
        "errors of the paired per-seed difference:", "", wins, "",
        "Geometric mean over domains of the test perplexity, per prediction mode:", "",
        mode_table(runs, facts, seeds, run), "",
        "Compute (check_budget; N = non-embedding parameters, T = steps; seed models not "
        "counted, as in HDEE):", "", "```", everything["budget"], "```", "",
        f"Sum of the runs' wall times (training + evaluation, compilation included): "
        f"{wall / 60:.1f} min. Produced by `python experiments/hdee/run.py --grid={grid_name}`.",
    ]
    return "\n".join(text), summary


# -- plots --------------------------------------------------------------------------------------


def plot_perplexity(runs, facts, seeds, path) -> None:
    domains = list(facts["domains"])
    names = (*ENSEMBLES, "dense")
    fig, axes = plt.subplots(2, 1, figsize=(13, 7.5), dpi=110, sharex=True)
    x = np.arange(len(domains))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [ppl(runs, name, seeds, d) for d in domains]
        axes[0].bar(x + k * width, [v.mean() for v in values], width,
                    yerr=[v.std() for v in values], color=COLORS[name], label=LABELS[name])
        if name in HETEROGENEOUS:
            rel = [100 * (ppl(runs, name, seeds, d) / ppl(runs, "M_Ho-I_Ho", seeds, d) - 1)
                   for d in domains]
            axes[1].bar(x + k * width, [r.mean() for r in rel], width,
                        yerr=[r.std() for r in rel], color=COLORS[name], label=LABELS[name])
    floors = [i for i, d in enumerate(domains) if "entropy_rate" in facts["domains"][d]]
    for i in floors:
        axes[0].hlines(np.exp(facts["domains"][domains[i]]["entropy_rate"]), i - 0.1, i + 0.9,
                       color="green", linestyle="--",
                       label="entropy-rate floor" if i == floors[0] else None)
    split = sum(info["group"] != "held-out" for info in facts["domains"].values()) - 0.1
    for ax in axes:
        ax.axvline(split, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("test perplexity per byte")
    axes[0].set_title("Per-domain test perplexity (ensembles: BTM cached prior from validation "
                      f"rows), mean ± std over {len(seeds)} seed(s); held-out domains right of "
                      "the line", fontsize=10)
    axes[0].legend(fontsize=8, ncol=3)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[1].set_ylabel("vs M_Ho-I_Ho (%)\n(below 0: heterogeneous better)")
    axes[1].legend(fontsize=8)
    labels = [f"{d}\n({facts['domains'][d]['group']})" for d in domains]
    axes[1].set_xticks(x + width * (len(names) - 1) / 2, labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(runs, seeds, run: experts.ExpertsConfig, path) -> None:
    """Validation loss of each expert on its own domains (mean over them and over seeds)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110, sharey=True)
    colors = {"easy": "tab:green", "moderate": "tab:orange", "hard": "tab:purple"}
    for ax, name in zip(axes, ENSEMBLES, strict=True):
        for domains, difficulty in run.groups:
            expert = "+".join(domains)
            per_seed = []
            for s in seeds:
                result = runs[(name, s)]
                budget = result["experts"][expert]["budget_steps"]
                rows = [r for r in result["curves"] if r["step"] <= budget]
                steps = [r["step"] for r in rows]
                per_seed.append([np.mean([r["loss_experts"][expert][d] for d in domains])
                                 for r in rows])
            ax.plot(steps, np.mean(per_seed, axis=0), marker=".", color=colors[difficulty],
                    label=f"{difficulty}: {expert}")
        ax.set_title(LABELS[name], fontsize=10)
        ax.set_xlabel("expert step (after branching from the seed)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss on own domains (nats/byte)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    del argv
    jax.config.update("jax_compilation_cache_dir", str(default_cache_dir() / "xla"))
    start = time.time()
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[FLAGS.grid]
    everything = run_all(out, grid)
    prefix = "" if FLAGS.grid == "full" else f"{FLAGS.grid}_"
    text, summary = results_text(everything, grid, FLAGS.grid)
    seeds = list(grid["seeds"])
    plot_perplexity(everything["runs"], everything["facts"], seeds, out / f"{prefix}perplexity.png")
    plot_curves(everything["runs"], seeds, everything["run"], out / f"{prefix}val_curves.png")
    records = {f"{k}|seed{s}": {key: v for key, v in r.items() if key != "curves"}
               for (k, s), r in everything["runs"].items()}
    write_atomically(out / f"{prefix}runs.json",
                     json.dumps({"facts": everything["facts"], "wins": summary, "runs": records}))
    write_atomically(out / ("results.md" if FLAGS.grid == "full" else f"{FLAGS.grid}.md"),
                     text + "\n")
    if FLAGS.grid == "full" and out == pathlib.Path(__file__).parent / "results":
        replace_results_block(out.parent / "README.md", text)
    plots = ", ".join(str(p) for p in sorted(out.glob(f"{prefix}*.png")))
    print(text + f"\n\nplots: {plots}\nper-run records: {out / 'runs'}\n"
          f"this invocation: {time.time() - start:.0f} s")


if __name__ == "__main__":
    app.run(main)
