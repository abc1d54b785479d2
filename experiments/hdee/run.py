"""HDEE: homogeneous vs size- and step-heterogeneous domain-expert ensembles at equal compute.

    python experiments/hdee/run.py                # full grid (3 seeds) -> README table, plots
    python experiments/hdee/run.py --grid=quick   # one seed, short runs -> results/quick*

Per seed: one seed model per width (S, M, L) trained on the mixture of all training domains;
then, for each of HDEE's three ensembles (M_Ho-I_Ho, M_He-I_Ho, M_Ho-I_He), one expert per
difficulty group branched from the seed of its width and trained on its group's domains, all
experts of one ensemble in one vmapped program; and a dense model of the same width as the
medium expert, branched from the medium seed and trained on all training domains with the
ensemble's expert-phase compute. Every model is scored on each domain's *test* rows; the BTM
prior is estimated on the *validation* rows. Finished runs (keyed by their full config) are
reused, so an interrupted grid resumes where it stopped; tables and plots are written once every
run of the grid has finished.
"""

import dataclasses
import gzip
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import serialization
from tqdm.auto import tqdm

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt  # noqa: E402

from decjax import ensemble, tree  # noqa: E402
from decjax.data import default_cache_dir, default_data_config, load_data  # noqa: E402
from decjax.data.sources import load_pystdlib  # noqa: E402
from decjax.ensemble import mixture  # noqa: E402
from decjax.models.llama import LlamaConfig  # noqa: E402
from decjax.models.staged import StagedLlama  # noqa: E402
from decjax.train.records import replace_results_block, write_atomically  # noqa: E402

plt.switch_backend("Agg")  # files only
FLAGS = flags.FLAGS
flags.DEFINE_enum("grid", "full", ["full", "quick"], "Which grid to run.")
flags.DEFINE_string("out", str(pathlib.Path(__file__).parent / "results"), "Output folder.")

# -- the experiment, named in advance -----------------------------------------------------------

CONFIG = dict(
    # Training domains by difficulty group: one expert per group. Each group pairs a synthetic
    # Markov domain (entropy rate known exactly) with a package of the Python standard library.
    # Difficulty is fixed here, before training, from the entropy rate of the chain (nats/byte:
    # 0.58, 1.51, 2.10) and the gzip ratio of the code (0.149, 0.228, 0.246).
    groups={
        "easy": ("markov3_v4_a0.2", "encodings"),
        "moderate": ("markov2_v8", "asyncio"),
        "hard": ("markov2_v16", "distutils"),
    },
    # Never trained on: three more stdlib packages and one Markov chain of its own.
    held_out=("xml", "multiprocessing", "unittest", "markov1_v8"),
    # Files are documents; the cap keeps the first files of a package up to 160 kB.
    stdlib=dict(max_bytes_per_domain=160_000, val_fraction=0.25),
    synthetic=dict(docs_per_domain=32, doc_len=4096, val_fraction=0.25),
    data_seed=0,  # the split and the chains; training seeds vary init and data order only
    seq_len=64,
    model=dict(d_model=64, n_heads=4, n_layers=2),
    d_ff=(128, 192, 256),  # S, M, L: 128 + 256 = 2 * 192, so the budgets match exactly
    # One schedule shape for every phase (linear warmup, cosine to 0.1x at each model's own
    # budget); the peak is a per-model learning-rate scale, so equal shapes share one program.
    warmup_steps=20,
    seed_lr=3e-3,
    expert_lr=1e-3,
    prior=dict(decay=0.3, max_sequences=100),  # BTM's cached prior, on validation rows
)
GRIDS = {
    "full": dict(seeds=(0, 1, 2), seed_steps=600, steps=(320, 480, 640), batch_size=8,
                 eval_every=80, eval_rows=32, test_rows=256),
    "quick": dict(seeds=(0,), seed_steps=60, steps=(30, 45, 60), batch_size=8, eval_every=15,
                  eval_rows=16, test_rows=64),
}
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
SIZES = ("S", "M", "L")


# -- data ---------------------------------------------------------------------------------------


def training_domains(cfg=CONFIG) -> tuple[str, ...]:
    return tuple(d for ds in cfg["groups"].values() for d in ds)


def all_domains(cfg=CONFIG) -> tuple[str, ...]:
    return training_domains(cfg) + tuple(cfg["held_out"])


def is_synthetic(domain: str) -> bool:
    return domain.startswith(("markov", "iid_"))


def load_corpus(cfg=CONFIG) -> tuple[ensemble.DomainCorpus, dict]:
    """The multi-domain corpus (byte tokenizer) and per-domain facts: entropy rate, gzip ratio."""
    names = all_domains(cfg)
    stdlib = [d for d in names if not is_synthetic(d)]
    chains = [d for d in names if is_synthetic(d)]
    code = default_data_config()
    code.update(source="pystdlib", domains=tuple(stdlib), seed=cfg["data_seed"], **cfg["stdlib"])
    synth = default_data_config()
    synth.update(source="synthetic", synthetic_domains=tuple(chains), seed=cfg["data_seed"],
                 val_fraction=cfg["synthetic"]["val_fraction"],
                 synthetic_docs_per_domain=cfg["synthetic"]["docs_per_domain"],
                 synthetic_doc_len=cfg["synthetic"]["doc_len"])
    parts = [load_data(c, seq_len=cfg["seq_len"]) for c in (code, synth)]
    if parts[0].tokenizer.vocab_size != parts[1].tokenizer.vocab_size:
        raise ValueError("both sources must use the same (byte) tokenizer")
    corpora = [ensemble.domain_corpus(p) for p in parts]
    rows = {s: {d: c.rows[s][d] for c in corpora for d in c.domains} for s in ensemble.SPLITS}
    corpus = ensemble.DomainCorpus(domains=names,
                                   rows={s: {d: rows[s][d] for d in names} for s in rows})
    texts = load_pystdlib(stdlib, cfg["stdlib"]["max_bytes_per_domain"])
    facts = {"vocab_size": parts[0].tokenizer.vocab_size, "domains": {}}
    for d in names:
        info = {"train_rows": len(corpus.rows["train"][d]), "val_rows": len(corpus.rows["val"][d]),
                "test_rows": len(corpus.rows["test"][d]),
                "group": next((g for g, ds in cfg["groups"].items() if d in ds), "held-out")}
        if is_synthetic(d):
            info["entropy_rate"] = parts[1].entropy_rate[d]
        else:
            raw = "".join(texts[d]).encode()
            info["gzip_ratio"] = len(gzip.compress(raw, 9)) / len(raw)
        facts["domains"][d] = info
    ensemble.assign_domains(corpus, {g: ds for g, ds in cfg["groups"].items()},
                            held_out=cfg["held_out"])
    return corpus, facts


# -- models, budgets ----------------------------------------------------------------------------


def base_config(vocab_size: int, cfg=CONFIG) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, **cfg["model"])


def make_ensembles(base: LlamaConfig, grid: dict, cfg=CONFIG):
    """HDEE's three ensembles and the dense reference; the budgets are checked equal."""
    groups = [(domains, difficulty) for difficulty, domains in cfg["groups"].items()]
    ensembles = ensemble.hdee_ensembles(base, groups, d_ff=cfg["d_ff"], steps=grid["steps"])
    dense = ensemble.dense_reference(base, d_ff=cfg["d_ff"][1], domains=training_domains(cfg),
                                     ensemble=ensembles["M_Ho-I_Ho"])
    return ensembles, dense


def budget_report(ensembles, dense, tokens_per_step: int) -> str:
    """check_budget's table (it raises if the ensembles' budgets differ) and the dense line."""
    table = ensemble.check_budget(ensembles, tokens_per_step=tokens_per_step)
    budgets = {name: ensemble.ensemble_budget(specs) for name, specs in ensembles.items()}
    assert len(set(budgets.values())) == 1, budgets
    dense_budget = ensemble.ensemble_budget([dense])
    ref = next(iter(budgets.values()))
    return (table + f"\n{'dense':12s} {dense.name:24s} {dense.d_ff:6d} "
            f"{ensemble.non_embedding_params(dense.config):10,d} {dense.steps:7d} "
            f"{dense_budget:14,d} {6 * dense_budget * tokens_per_step:10.3e} "
            f"{dense_budget / ref - 1:+9.3%}")


def seed_specs(base: LlamaConfig, grid: dict, cfg=CONFIG) -> list[ensemble.ExpertSpec]:
    return [ensemble.ExpertSpec(f"seed_{size}", training_domains(cfg), d_ff, grid["seed_steps"],
                                base) for size, d_ff in zip(SIZES, cfg["d_ff"], strict=True)]


def one_group(specs) -> ensemble.ExpertGroup:
    """All experts of one ensemble in one vmapped group (narrower ones zero-padded)."""
    groups = ensemble.group_by_shape(list(specs), max_pad_ratio=4.0)
    assert len(groups) == 1, [g.names for g in groups]
    return groups[0]


def spec_dict(spec: ensemble.ExpertSpec) -> dict:
    return {"name": spec.name, "domains": list(spec.domains), "d_ff": spec.d_ff,
            "steps": spec.steps}


def train(specs, corpus, grid, cfg, *, seed: int, lr: float, seeds=None):
    """Trains ``specs`` together (one vmapped program): ``(group, padded params_E, history)``."""
    group = one_group(specs)
    params_E, history = ensemble.train_experts(
        group, corpus, lr_schedule=ensemble.cosine_lr(1.0, warmup_steps=cfg["warmup_steps"]),
        lr_scale=[lr] * len(group.specs), batch_size=grid["batch_size"], seed=seed,
        seeds=seeds, eval_every=grid["eval_every"], eval_domains=training_domains(cfg),
        eval_rows=grid["eval_rows"])
    return group, params_E, history


def curves(history) -> list[dict]:
    return [{"expert": r["expert"], "expert_step": int(r["expert_step"]), "domain": r["domain"],
             "loss": float(r["loss"])} for r in history.evals]


# -- evaluation ---------------------------------------------------------------------------------


_LOGPROB_FNS: dict = {}


def token_logprobs(config: LlamaConfig, params_E, rows: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``float32[E, N, T]`` target log-probs of every stacked expert on ``rows`` (fixed chunks)."""
    n_experts = jax.tree.leaves(params_E)[0].shape[0]
    key = (config, n_experts)
    if key not in _LOGPROB_FNS:
        fn = mixture.staged_logprob_fn(StagedLlama(config, n_stages=1))
        _LOGPROB_FNS[key] = jax.jit(lambda p, r: mixture.expert_token_logprobs(
            fn, p, r, experts_per_chunk=n_experts))
    out = []
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        padded = np.concatenate([part, np.repeat(part[:1], chunk - len(part), axis=0)])
        out.append(np.asarray(_LOGPROB_FNS[key](params_E, jnp.asarray(padded)))[:, :len(part)])
    return np.concatenate(out, axis=1)


def evaluate_ensemble(group, params_E, corpus, grid, cfg) -> dict:
    """Per domain: each mixture mode's test perplexity, each expert's, and the cached prior.

    The padded parameters are scored with the padded model: zero SwiGLU units change nothing.
    """
    out = {}
    for d in all_domains(cfg):
        val = np.asarray(corpus.get("val", d)[:cfg["prior"]["max_sequences"]])
        test = np.asarray(corpus.get("test", d)[:grid["test_rows"]])
        prior = mixture.estimate_prior(token_logprobs(group.config, params_E, val), rows=val,
                                       split="val", **cfg["prior"])
        lp_test = token_logprobs(group.config, params_E, test)
        modes = mixture.evaluate_modes(jnp.asarray(lp_test), prior=prior, eval_rows=test,
                                       eval_split="test")
        out[d] = {"modes": modes,
                  "experts": {name: float(np.exp(-lp_test[i].mean()))
                              for i, name in enumerate(group.names)},
                  "prior": np.exp(prior.log_weights).tolist(),
                  "top1": group.names[mixture.top1_expert(prior)],
                  "test_rows": len(test), "prior_rows": prior.n_sequences}
    return out


def evaluate_single(config, params, corpus, grid, cfg) -> dict:
    params_E = tree.stack([params])
    return {d: float(np.exp(-token_logprobs(
        config, params_E, np.asarray(corpus.get("test", d)[:grid["test_rows"]])).mean()))
        for d in all_domains(cfg)}


# -- finished runs, keyed by config --------------------------------------------------------------


def load_finished(workdir: pathlib.Path, config: dict) -> dict | None:
    """The stored result of ``workdir`` if it was made with ``config`` (JSON-normalised)."""
    config = json.loads(json.dumps(config))
    path = workdir / "result.json"
    if path.exists():
        stored = json.loads(path.read_text())
        if stored["config"] == config:
            return stored
        print(f"{workdir.name}: config changed, retraining", flush=True)
    return None


def save_result(workdir: pathlib.Path, result: dict, params=None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    if params is not None:  # written first: a result.json always has its params next to it
        tmp = workdir / "params.msgpack.tmp"
        tmp.write_bytes(serialization.msgpack_serialize(jax.device_get(params)))
        os.replace(tmp, workdir / "params.msgpack")
    write_atomically(workdir / "result.json", json.dumps(result))


def run_seed_models(out, seed, base, corpus, grid, cfg) -> tuple[dict, dict]:
    """The S/M/L seed models on the general mixture: ``(result, {d_ff: params})``."""
    specs = seed_specs(base, grid, cfg)
    config = {"kind": "seed", "seed": seed, "base": dataclasses.asdict(base),
              "specs": [spec_dict(s) for s in specs], "lr": cfg["seed_lr"],
              "warmup_steps": cfg["warmup_steps"], "batch_size": grid["batch_size"],
              "data": data_key(cfg), "eval": [grid["eval_every"], grid["eval_rows"],
                                              grid["test_rows"]]}
    workdir = out / "runs" / f"seed-s{seed}"
    result = load_finished(workdir, config)
    if result is not None and (workdir / "params.msgpack").exists():
        stored = serialization.msgpack_restore((workdir / "params.msgpack").read_bytes())
        return result, {int(k): v for k, v in stored.items()}
    start = time.time()
    group, params_E, history = train(specs, corpus, grid, cfg, seed=seed, lr=cfg["seed_lr"])
    singles = ensemble.unstack_experts(group, params_E)
    params = {s.d_ff: singles[s.name] for s in specs}
    medium = specs[1]
    result = {"config": config, "curves": curves(history),
              "test_ppl_M": evaluate_single(medium.config, params[medium.d_ff], corpus, grid,
                                            cfg),
              "wall_s": time.time() - start}
    save_result(workdir, result, {str(k): v for k, v in params.items()})
    print(f"done seed-s{seed}: {result['wall_s']:.0f} s", flush=True)
    return result, params


def data_key(cfg) -> dict:
    keys = ("groups", "held_out", "stdlib", "synthetic", "data_seed", "seq_len")
    return json.loads(json.dumps({k: cfg[k] for k in keys}))


def run_all(out: pathlib.Path, grid: dict, cfg=CONFIG) -> dict:
    """Every run of the grid, trained or reused: ``{(kind, seed): result}`` and the facts."""
    corpus, facts = load_corpus(cfg)
    base = base_config(facts["vocab_size"], cfg)
    ensembles, dense = make_ensembles(base, grid, cfg)
    budget = budget_report(ensembles, dense, grid["batch_size"] * cfg["seq_len"])
    print(budget, flush=True)
    runs = {}
    jobs = [(name, seed) for seed in grid["seeds"] for name in (*ENSEMBLES, "dense")]
    seed_cache = {}
    for name, seed in tqdm(jobs, desc="runs", unit="run", dynamic_ncols=True):
        specs = [dense] if name == "dense" else ensembles[name]
        lr = cfg["expert_lr"]
        config = {"kind": name, "seed": seed, "base": dataclasses.asdict(base),
                  "specs": [spec_dict(s) for s in specs], "lr": lr,
                  "warmup_steps": cfg["warmup_steps"], "batch_size": grid["batch_size"],
                  "data": data_key(cfg), "prior": cfg["prior"],
                  "seed_models": {"specs": [spec_dict(s) for s in seed_specs(base, grid, cfg)],
                                  "lr": cfg["seed_lr"]},
                  "eval": [grid["eval_every"], grid["eval_rows"], grid["test_rows"]]}
        workdir = out / "runs" / f"{name}-s{seed}"
        result = load_finished(workdir, config)
        if result is None:
            if seed not in seed_cache:
                seed_cache[seed] = run_seed_models(out, seed, base, corpus, grid, cfg)
            seed_params = seed_cache[seed][1]
            start = time.time()
            group, params_E, history = train(specs, corpus, grid, cfg, seed=seed, lr=lr,
                                             seeds=seed_params)
            if name == "dense":
                evaluation = evaluate_single(group.config, tree.index(params_E, 0), corpus,
                                             grid, cfg)
            else:
                evaluation = evaluate_ensemble(group, params_E, corpus, grid, cfg)
            result = {"config": config, "names": list(group.names),
                      "padded_d_ff": group.config.hidden_dim, "curves": curves(history),
                      "eval": evaluation, "wall_s": time.time() - start}
            save_result(workdir, result)
            print(f"done {workdir.name}: {result['wall_s']:.0f} s", flush=True)
        runs[(name, seed)] = result
    for seed in grid["seeds"]:
        if seed not in seed_cache:
            stored = json.loads((out / "runs" / f"seed-s{seed}" / "result.json").read_text())
            seed_cache[seed] = (stored, None)
        runs[("seed", seed)] = seed_cache[seed][0]
    return {"runs": runs, "facts": facts, "budget": budget, "ensembles": ensembles,
            "dense": dense}


# -- tables -------------------------------------------------------------------------------------


def ppl(runs, name, seeds, domain, mode=HEADLINE) -> np.ndarray:
    """Test perplexity per seed of an ensemble (in ``mode``), the dense model or the seed."""
    if name == "dense":
        return np.array([runs[(name, s)]["eval"][domain] for s in seeds])
    if name == "seed":
        return np.array([runs[(name, s)]["test_ppl_M"][domain] for s in seeds])
    return np.array([runs[(name, s)]["eval"][domain]["modes"][mode] for s in seeds])


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
        top1 = runs[("M_Ho-I_Ho", seeds[0])]["eval"][d]["top1"]
        lines.append(f"| {d} | {info['group']} | {floor} | {mean_std(ppl(runs, 'seed', seeds, d))} "
                     f"| {mean_std(ppl(runs, 'dense', seeds, d))} | {marks['M_Ho-I_Ho']} "
                     f"| {marks['M_He-I_Ho']} | {marks['M_Ho-I_He']} | {best['best']}{tie} "
                     f"| {top1} |")
    return "\n".join(lines)


def geomean_ppl(runs, name, seeds, domains, mode) -> np.ndarray:
    """Per seed, exp of the mean log perplexity over ``domains``."""
    return np.exp(np.mean([np.log(ppl(runs, name, seeds, d, mode)) for d in domains], axis=0))


def mode_table(runs, facts, seeds, cfg=CONFIG) -> str:
    splits = {"training domains": training_domains(cfg), "held-out domains": cfg["held_out"]}
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


def results_text(everything, grid, grid_name, cfg=CONFIG) -> tuple[str, dict]:
    runs, facts, seeds = everything["runs"], everything["facts"], list(grid["seeds"])
    wins, summary = wins_table(runs, facts, seeds)
    head = summary[HEADLINE]
    wall = sum(r["wall_s"] for r in runs.values())
    steps, d_ff = grid["steps"], cfg["d_ff"]
    text = [
        f"Test perplexity per byte, mean ± std over seeds {', '.join(map(str, seeds))} "
        f"({len(seeds)} seed{'s' * (len(seeds) > 1)}). Ensembles: d_ff S/M/L = "
        f"{'/'.join(map(str, d_ff))}, steps T−Δ/T/T+Δ = {'/'.join(map(str, steps))}, "
        f"{grid['batch_size']} × {cfg['seq_len']} tokens per step per model; seed models "
        f"{grid['seed_steps']} steps; dense = d_ff {d_ff[1]}, "
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
        mode_table(runs, facts, seeds, cfg), "",
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
    split = len(training_domains()) - 0.1
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


def plot_curves(runs, seeds, cfg, path) -> None:
    """Validation loss of each expert on its own domains (mean over them and over seeds)."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110, sharey=True)
    colors = {"easy": "tab:green", "moderate": "tab:orange", "hard": "tab:purple"}
    for ax, name in zip(axes, ENSEMBLES, strict=True):
        for difficulty, domains in cfg["groups"].items():
            expert = "+".join(domains)
            per_seed = []
            for s in seeds:
                rows = [r for r in runs[(name, s)]["curves"]
                        if r["expert"] == expert and r["domain"] in domains]
                steps = sorted({r["expert_step"] for r in rows})
                per_seed.append([np.mean([r["loss"] for r in rows if r["expert_step"] == t])
                                 for t in steps])
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
    plot_curves(everything["runs"], seeds, CONFIG, out / f"{prefix}val_curves.png")
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
