"""What ``probe-atlas attack`` runs: load the model, the probes (``--probe`` folders, a sweep's best per
family
with ``--best-of``, or the ``--train`` recipe), the data and the control set, run the campaign
(:mod:`.campaign`) and draw its figures (:mod:`experiments.viz.attacks`).

The ``--train DATA`` recipe fits, on DATA's train split with the layer and ``C`` chosen on its validation
split (validation AUROC): a logistic probe, a difference-of-means probe and a shrinkage-LDA probe (each at
the best of ``layers``, mean pooling over the prompt tokens), a multi-layer logistic probe reading all of
``layers`` at once, the z-scored ensemble of the logistic and LDA probes (μ, σ on validation), and TF-IDF on
the text (the surface baseline; a transfer target only). The four activation families are refit in each
adversarial-training round (the ensemble from its refit members)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from activations.data import PromptDataset, load_dataset
from experiments.analysis.attacks.adapters import ProbeTarget, TextTarget, load_target
from experiments.analysis.attacks.campaign import (
    CampaignConfig,
    Refitter,
    check_campaign_inputs,
    ensemble_target,
    fit_affine_target,
    run_campaign,
)
from experiments.analysis.attacks.objective import AttackError

__all__ = ["best_per_family", "recipe_targets", "run_cli_campaign"]

Target = ProbeTarget | TextTarget
RECIPE_FAMILIES = ("logistic", "diffmeans", "lda", "multilayer")


def _resolve(ref: str) -> str:
    """``shared:datasets/...`` paths as in sweep specs (:func:`experiments.sweep.spec.shared_root`)."""
    from experiments.sweep.spec import shared_root

    return str(shared_root() / ref[len("shared:") :].lstrip("/")) if ref.startswith("shared:") else ref


def best_per_family(sweep_dir: str | Path) -> list[Path]:
    """A sweep's saved probe chosen on validation per probe kind (the selection rule of
    :mod:`experiments.analysis.selection`), surface baselines included."""
    from experiments.analysis.selection import pick

    res = Path(sweep_dir) / "results.parquet"
    if not res.is_file():
        raise AttackError(f"{sweep_dir}: no results.parquet (not a sweep folder)")
    df = pd.read_parquet(res).drop_duplicates("run_id")
    df = df[df["probe_path"].astype(str) != ""]
    if df.empty:
        raise AttackError(f"{res}: no saved probes to choose from")
    chosen = pick(df, ["probe"])
    out = []
    for _, best in chosen.sort_values("probe").iterrows():
        path = Path(str(best["probe_path"]))
        if not path.exists() and (Path(sweep_dir) / "probes" / path.name).exists():
            path = Path(sweep_dir) / "probes" / path.name
        out.append(path)
    return out


def recipe_targets(
    model: Any, train_ref: str, layers: Sequence[int], log: Callable[[str], None] = print
) -> tuple[list[Target], dict[str, Refitter]]:
    """The ``--train`` recipe's probes (module docstring) and a refitter for each activation family."""
    from probes.text import example_text
    from probes.tfidf import TfidfClassifier

    ds = load_dataset(_resolve(train_ref))
    train, val = ds.filter(split="train"), ds.filter(split="val")
    if len(train) == 0 or len(val) == 0:
        raise AttackError(f"{train_ref}: the recipe needs train and val splits")
    cache: dict[str, Any] = {}
    targets: list[Target] = []
    refitters: dict[str, Refitter] = {}
    members: dict[str, ProbeTarget] = {}
    for kind in RECIPE_FAMILIES:
        t, info = fit_affine_target(model, kind, train, val, layers, name=kind, cache=cache)
        log(f"fitted {kind}: {info}")
        targets.append(t)
        members[kind] = t

        def refit(extra: PromptDataset | None, kind: str = kind) -> ProbeTarget:
            t2, info2 = fit_affine_target(
                model, kind, train, val, layers, name=kind, extra=extra, cache=cache
            )
            log(f"refit {kind}: {info2}")
            members[kind] = t2
            return t2

        refitters[kind] = Refitter(refit, train, val)
    ens = ensemble_target([members["logistic"], members["lda"]], list(val), model, name="ensemble")
    targets.append(ens)

    def refit_ens(extra: PromptDataset | None) -> ProbeTarget:
        # the members are refit in the same round (they come first); z-scored again on validation
        return ensemble_target([members["logistic"], members["lda"]], list(val), model, name="ensemble")

    refitters["ensemble"] = Refitter(refit_ens, train, val, attack_train=False)
    tfidf = TfidfClassifier().fit(
        [example_text(e) for e in train], train.labels, val=[example_text(e) for e in val], val_y=val.labels
    )
    targets.append(TextTarget("tfidf", tfidf, family="tfidf"))
    return targets, refitters


def run_cli_campaign(
    *,
    out: Path,
    probes: Sequence[Path],
    best_of: Path | None,
    train: str | None,
    data: str,
    control: str,
    n: int,
    cfg: CampaignConfig,
    n_control: int | None = None,
    refit: Sequence[str] | None = None,
    layers: Sequence[int],
    model_name: str,
    device: str,
    png: bool = False,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Everything ``probe-atlas attack`` does (module docstring); nothing is written before the inputs are
    checked."""
    from activations.models import load_model
    from experiments.viz.attacks import write_attack_figures

    cfg.check()
    if n < 1:
        raise AttackError(f"--n must be >= 1, got {n}")
    ds = load_dataset(_resolve(data))
    if len(ds) == 0:
        raise AttackError(f"{data}: the attack data is empty")
    harmful = [e for e in ds if e.label >= 0.5]
    if not harmful:
        raise AttackError(f"{data}: the labels are all harmless, there is nothing to attack")
    examples = harmful[:n]
    cds = load_dataset(_resolve(control))
    if n_control is not None and n_control < len(cds):
        cds = cds.subsample(n_control, seed=cfg.seed)
    ctrl = list(cds)
    model = load_model(model_name, device=device)
    targets: list[Target] = []
    refitters: dict[str, Refitter] = {}
    dirs = list(probes) + (best_per_family(best_of) if best_of is not None else [])
    for d in dirs:
        targets.append(load_target(d, model))
    if train is not None:
        t, r = recipe_targets(model, train, layers, log=log)
        targets += t
        if refit is not None:
            unknown = sorted(set(refit) - set(r))
            if unknown:
                raise AttackError(f"--refit: unknown recipe families {unknown}; choose from {sorted(r)}")
            if "ensemble" in refit and not {"logistic", "lda"} <= set(refit):
                raise AttackError("--refit ensemble needs its members: add --refit logistic --refit lda")
            r = {k: v for k, v in r.items() if k in refit}
        refitters.update(r)
    if cfg.rounds and not refitters:
        warnings.warn(
            "adversarial training refits only the --train recipe's probes; no probe will be refit",
            stacklevel=2,
        )
    check_campaign_inputs(model, targets, examples, cfg)
    df = run_campaign(model, targets, examples, ctrl, out, cfg, refitters=refitters, log=log)
    write_attack_figures(out, png=png)
    return df
