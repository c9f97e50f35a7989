"""Search the offline audio-visual data for a setting where modality competition happens.

Each candidate is a dataset setting with its encoders and training recipe. For every seed it
trains four runs that involve no balancing method: ``unimodal`` on each modality, ``joint`` and
``ensemble`` (independently trained unimodal models, logits averaged); on the ensemble's encoders
it then fits a *stacked probe*, a logistic regression on both encoders' concatenated latents
(fitted on the training split, scored on test). The criteria, fixed before any candidate was run
and never looking at a balancing method, are the library's (:mod:`mmbalance.report.regime`,
which ``mmbalance diagnose`` uses too):

1. ``gap``: joint training is below the ensemble by >= 2 points on test accuracy, and the mean
   paired difference (ensemble - joint, same seed) exceeds twice its standard error;
2. ``unimodal``: each modality alone reaches a test accuracy in [0.45, 0.85];
3. ``probe``: the *weak* modality's linear-probe accuracy inside the jointly trained model is
   >= 3 points below that of the same encoder trained alone (``unimodal``), as in the OGM-GE
   paper's Fig. 1. The weak modality is the one with the smaller Shapley contribution to the
   joint model's accuracy (mean over seeds), so it is named by the joint model, not by the probe;
4. ``complementary``: a good fusion beats both modalities: the fused upper estimate, the better
   of the ensemble and the stacked probe, is >= 3 points above the best modality alone.

Screening uses 2 seeds (the standard error of criterion 1 is then shown but not trusted);
finalists run 5 seeds. Wall-clock time is noisy on shared cores, so the cost of a run is the
process CPU time with one torch thread (``cpu_s``), which approximates the wall time of one
idle core. Results go to ``benchmarks/results/av_regime_search.{json,md}``; the JSON is written
after every (candidate, seed), and finished pairs are reused, so a killed search continues::

    nice -n 10 python3 benchmarks/find_av_regime.py --candidates c1,c2 --seeds 2   # screening
    nice -n 10 python3 benchmarks/find_av_regime.py --candidates c1 --seeds 5      # finalist
    python3 benchmarks/find_av_regime.py --table                                   # rewrite .md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``mmbalance`` importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from mmbalance.build import build_components, build_dataset, resolve_config  # noqa: E402
from mmbalance.eval.probe import latents_of, stacked_probe_accuracy  # noqa: E402
from mmbalance.report.regime import SeedNumbers, regime_evidence  # noqa: E402
from mmbalance.train.checkpoint import load_checkpoint  # noqa: E402
from mmbalance.train.runner import fit  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "av_regime_search.json"
MD_PATH = RESULTS / "av_regime_search.md"

#: Finalists run this many seeds; a candidate meets the criteria only on that many.
FINAL_SEEDS = 5

QUIET = {"train.progress": False, "train.tensorboard": False}


@dataclass(frozen=True)
class Candidate:
    """A dataset setting, its encoders and training recipe, as ``resolve_config`` overrides."""

    overrides: Mapping[str, Any]
    note: str = ""


def _fashion(
    snr: float | None = -12.0,
    n_train: int = 3000,
    width: int = 8,
    encoder: str = "resnet18",
    **extra: Any,
) -> dict[str, Any]:
    """AV-Fashion with conv (or MLP) encoders; ``extra`` adds or replaces overrides."""
    out: dict[str, Any] = {
        "dataset": "av-fashion",
        "dataset.audio_snr_db": snr,
        "dataset.n_train": n_train,
        "dataset.n_val": 600,
        "dataset.n_test": 2000,
        "train.optimizer": "adam",
        "train.lr": 1e-3,
        "train.epochs": 10,
        "train.batch_size": 128,
    }
    if encoder == "resnet18":
        for m in ("audio", "image"):
            out[f"encoder.{m}"] = "resnet18"
            out[f"encoder.{m}.width"] = width
    return out | extra


SGD = {"train.optimizer": "sgd", "train.lr": 0.05, "train.momentum": 0.9}

CANDIDATES: dict[str, Candidate] = {
    "fa_r8_adam": Candidate(_fashion(), "base: -12 dB speech, ResNet-18 width 8, Adam 1e-3"),
    "fa_mlp_adam": Candidate(_fashion(encoder="mlp"), "control: the same data, MLP encoders"),
    "fa_r8_sgd": Candidate(_fashion(**SGD), "SGD 0.05 momentum 0.9"),
    "fa_r8_adam_snr-15": Candidate(_fashion(snr=-15.0), "noisier speech"),
    "fa_r8_adam_snr-9": Candidate(_fashion(snr=-9.0), "cleaner speech"),
    "fa_r8_adam_n2000": Candidate(_fashion(n_train=2000), "fewer training samples"),
    "fa_r16_adam": Candidate(_fashion(width=16), "wider encoders"),
    "fa_r8_adam_ep6": Candidate(_fashion(**{"train.epochs": 6}), "fewer epochs"),
    "fa_r8_adam_imgnoise": Candidate(
        _fashion(**{"dataset.image_noise": 0.3}), "pixel noise 0.3 on the images"
    ),
    # second round (after the first): SGD variants and a small, longer-trained training set
    "fa_r8_sgd_lr0.01": Candidate(_fashion(**(SGD | {"train.lr": 0.01})), "SGD 0.01 momentum 0.9"),
    "fa_r8_sgd_snr-15": Candidate(_fashion(snr=-15.0, **SGD), "SGD 0.05, noisier speech"),
    "fa_r8_sgd_imgnoise": Candidate(
        _fashion(**SGD, **{"dataset.image_noise": 0.3}), "SGD 0.05, pixel noise 0.3"
    ),
    "fa_r8_sgd_n1500_ep20": Candidate(
        _fashion(n_train=1500, **SGD, **{"train.epochs": 20}), "SGD 0.05, 1500 samples, 20 epochs"
    ),
    "fa_r8_adam_ep6_lr2e-3": Candidate(
        _fashion(**{"train.epochs": 6, "train.lr": 2e-3}), "6 epochs, Adam 2e-3"
    ),
    "fa_r8_adam_ep6_lr4e-3": Candidate(
        _fashion(**{"train.epochs": 6, "train.lr": 4e-3}), "6 epochs, Adam 4e-3"
    ),
    "fa_r8_adam_ep6_lr5e-4": Candidate(
        _fashion(**{"train.epochs": 6, "train.lr": 5e-4}), "6 epochs, Adam 5e-4"
    ),
    "fa_r8_adam_n1500_ep20": Candidate(
        _fashion(n_train=1500, **{"train.epochs": 20}), "Adam, 1500 samples, 20 epochs"
    ),
}

#: The candidate registered as the ``av-fashion-cnn`` dataset (its defaults; tests check this).
CHOSEN = "fa_r8_adam_ep6_lr2e-3"


# --- runs -----------------------------------------------------------------------------------------
def roles(modalities: list[str]) -> dict[str, dict[str, Any]]:
    """The runs of one seed: each modality alone, joint and ensemble (no balancing method)."""
    out = {f"unimodal_{m}": {"method": "unimodal", "method.modality": m} for m in modalities}
    return out | {"joint": {"method": "joint"}, "ensemble": {"method": "ensemble"}}


def stacked_probe(cfg: Any, run_dir: Path) -> float:
    """Test accuracy of a logistic regression on the concatenated latents of a run's selected
    encoders (fitted on the training split), i.e. what a linear fusion of them can reach."""
    data = build_dataset(cfg)
    _, model, _ = build_components(cfg, data)
    model.load_state_dict(load_checkpoint(run_dir / "best.ckpt")["model"])
    z_train, y_train = latents_of(model, data.splits["train"])
    z_test, y_test = latents_of(model, data.splits["test"])
    return stacked_probe_accuracy(z_train, y_train, z_test, y_test)


def run_seed(candidate: Candidate, seed: int, work: Path) -> dict[str, Any]:
    """Train every role on one seed; test metrics and CPU seconds per role, the stacked probe."""
    base = {**candidate.overrides, **QUIET, "train.seed": seed}
    modalities = list(build_dataset(resolve_config(base)).modalities)
    out: dict[str, Any] = {"modalities": modalities, "runs": {}}
    for role, method in roles(modalities).items():
        cfg = resolve_config({**base, **method})
        run_dir = work / f"{role}_seed{seed}"
        start = time.process_time()
        result = fit(cfg, run_dir)
        cpu = time.process_time() - start
        test = result.metrics["test"]
        out["runs"][role] = {
            "accuracy": test["accuracy"],
            "val_accuracy": result.metrics["val"]["accuracy"],
            "best_epoch": result.best_epoch,
            "cpu_s": round(cpu, 2),
            **{k: v for k, v in test.items() if k.startswith(("probe_accuracy_", "shapley_"))},
        }
        if role == "ensemble":
            out["stacked_probe"] = stacked_probe(cfg, run_dir)
    return out


# --- criteria -------------------------------------------------------------------------------------
def seed_numbers(row: Mapping[str, Any]) -> SeedNumbers:
    """One seed of the saved search as the criteria's numbers."""
    runs, mods = row["runs"], row["modalities"]
    return SeedNumbers(
        joint=runs["joint"]["accuracy"],
        ensemble=runs["ensemble"]["accuracy"],
        alone={m: runs[f"unimodal_{m}"]["accuracy"] for m in mods},
        probe_alone={m: runs[f"unimodal_{m}"][f"probe_accuracy_{m}"] for m in mods},
        probe_joint={m: runs["joint"][f"probe_accuracy_{m}"] for m in mods},
        shapley_joint={m: runs["joint"][f"shapley_{m}"] for m in mods},
        stacked_probe=row["stacked_probe"],
    )


def evaluate(seeds: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The criteria (:func:`mmbalance.report.regime.regime_evidence`) on the seeds run so far."""
    rows = [seeds[k] for k in sorted(seeds, key=int)]
    ev = regime_evidence([seed_numbers(r) for r in rows])
    joint = [r["runs"]["joint"]["accuracy"] for r in rows]
    return {
        "seeds": ev.seeds,
        "joint": ev.joint.mean,
        "joint_sd": statistics.stdev(joint) if len(rows) > 1 else float("nan"),
        "ensemble": ev.ensemble.mean,
        "gap": ev.gap.mean,
        "gap_se": ev.gap_se,
        "unimodal": {m: s.mean for m, s in ev.alone.items()},
        "weak": ev.weak,
        "shapley_joint": {m: s.mean for m, s in ev.shapley_joint.items()},
        "probe_alone": {m: s.mean for m, s in ev.probe_alone.items()},
        "probe_joint": {m: s.mean for m, s in ev.probe_joint.items()},
        "probe_deficit": {m: s.mean for m, s in ev.probe_deficit.items()},
        "stacked_probe": ev.stacked_probe,
        "fused_estimate": ev.fused_estimate,
        "fusion_gain": ev.fusion_gain,
        "cpu_s": {
            role: statistics.fmean(r["runs"][role]["cpu_s"] for r in rows)
            for role in rows[0]["runs"]
        },
        "met": ev.met,
        "all_met": all(ev.met.values()) and len(rows) >= FINAL_SEEDS,
    }


# --- files ----------------------------------------------------------------------------------------
def load_results() -> dict[str, Any]:
    return json.loads(JSON_PATH.read_text()) if JSON_PATH.is_file() else {}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def markdown(results: Mapping[str, Any]) -> str:
    """The search table: every candidate tried, its numbers and the criteria it meets."""
    lines = [
        "# AV regime search",
        "",
        "Generated by `benchmarks/find_av_regime.py` (criteria in its docstring, fixed before the "
        "search). Test accuracies, means over the seeds shown; `gap` = ensemble - joint "
        "(paired, ± standard error); `probe deficit` = the weak modality's linear-probe accuracy "
        "alone minus inside joint (weak = the smaller Shapley contribution in joint); `fused` = "
        "the better of the ensemble and the stacked probe on the unimodally trained encoders; "
        "`cpu s` = CPU seconds of one joint run with one torch thread. Criteria: G gap >= 0.02 "
        "and > 2 SE, U each modality alone in [0.45, 0.85], P probe deficit >= 0.03, C fused >= "
        "best modality + 0.03; candidates with fewer than 5 seeds are screening results.",
        "",
        "| candidate | seeds | audio | image | joint | ensemble | gap | weak | probe alone / joint "
        "(deficit) | stacked | fused gain | cpu s | G | U | P | C | what |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        s = evaluate(entry["seeds"])
        w = s["weak"]
        uni = s["unimodal"]
        mark = {k: "yes" if v else "no" for k, v in s["met"].items()}
        lines.append(
            f"| {name} | {s['seeds']} | {uni.get('audio', float('nan')):.3f} | "
            f"{uni.get('image', float('nan')):.3f} | {s['joint']:.3f} | {s['ensemble']:.3f} | "
            f"{s['gap']:+.3f} ± {s['gap_se']:.3f} | {w} | {s['probe_alone'][w]:.3f} / "
            f"{s['probe_joint'][w]:.3f} ({s['probe_deficit'][w]:+.3f}) | "
            f"{s['stacked_probe']:.3f} | {s['fusion_gain']:+.3f} | {s['cpu_s']['joint']:.1f} | "
            f"{mark['gap']} | {mark['unimodal']} | {mark['probe']} | {mark['complementary']} | "
            f"{entry['note']} |"
        )
    if CHOSEN in results:
        s = evaluate(results[CHOSEN]["seeds"])
        lines += [
            "",
            f"Chosen: `{CHOSEN}` ({s['seeds']} seeds, all criteria met: {s['all_met']}), "
            "registered as the dataset `av-fashion-cnn` with these settings as its defaults. "
            "The finalists were the screened settings that met every criterion on 2 seeds at "
            "the lowest cost (6 epochs, about 11 CPU s a joint run): `fa_r8_adam_ep6` and "
            "`fa_r8_adam_ep6_lr2e-3`. Both met every criterion on 5 seeds; the second was kept "
            "because the speech alone varies less between its seeds (sd 0.03 against 0.09, one "
            "seed of the first at 0.43). `fa_r8_adam_ep6_lr4e-3` was screened afterwards, as "
            "the 2x point of a learning-rate search around the choice. Per-seed numbers are in "
            "`av_regime_search.json`.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="", help="comma list (default: none)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--table", action="store_true", help="only rewrite the Markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # sklearn's OpenMP loops spin-wait on busy shared cores (a 3000 x 64 logistic probe took 60x
    # longer with the default thread count), so the probes get the same thread budget.
    with threadpool_limits(limits=args.threads):
        search(args.candidates, args.seeds, args.table, parser)


def search(candidates: str, seeds: int, table_only: bool, parser: argparse.ArgumentParser) -> None:
    results = load_results()
    names = [c for c in candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    for name in [] if table_only else names:
        cand = CANDIDATES[name]
        entry = results.setdefault(name, {"seeds": {}})
        entry |= {"overrides": dict(cand.overrides), "note": cand.note}
        for seed in range(seeds):
            if str(seed) in entry["seeds"]:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                entry["seeds"][str(seed)] = run_seed(cand, seed, Path(tmp))
            write_atomic(JSON_PATH, json.dumps(results, indent=1))
            s = evaluate(entry["seeds"])
            print(
                f"{name} seed {seed}: joint {s['joint']:.3f} ensemble {s['ensemble']:.3f} "
                f"uni {json.dumps({k: round(v, 3) for k, v in s['unimodal'].items()})} "
                f"weak {s['weak']} deficit {s['probe_deficit'][s['weak']]:+.3f} "
                f"stacked {s['stacked_probe']:.3f} met {s['met']} "
                f"cpu {json.dumps({k: round(v, 1) for k, v in s['cpu_s'].items()})}",
                flush=True,
            )
    if results:
        write_atomic(MD_PATH, markdown(results))


if __name__ == "__main__":
    main()
