"""Probe cards: a saved probe as a folder ready for the Hugging Face Hub.

:func:`make_card` copies a probe folder (``probe.json`` + ``probe.safetensors``, or any saved scorer's
files) and writes ``README.md`` in the Hub's model-card format (YAML front matter: ``library_name``,
``tags``, ``base_model``, ``pipeline_tag``, a ``model-index`` with the test metrics) and ``card.json`` (the
same facts, machine-readable). A probe from a sweep (``SWEEP/probes/<run_id>``) takes its metrics from the
sweep: ``results.parquet`` (every eval set's metrics with bootstrap CIs, thresholds set on the benign
control set, FLOPs and overhead %, whether validation chose this layer), ``splits.json`` (the training,
validation and calibration data by source, with counts) and ``selection.json`` (the selection rule).
Nothing is chosen here: the card reports what the sweep chose on validation.

Loading a card is loading a probe: ``load_probe(CARD_DIR)`` or, once pushed, ``load_probe("hf:OWNER/NAME")``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from activations.models import BUNDLED_MODELS
from experiments.sweep.results import RESULTS, SELECTION_JSON, read_results
from experiments.sweep.spec import SURFACE_KINDS
from probes.io import atomic_dir, read_probe_info

__all__ = ["CARD_JSON", "README", "CardError", "best_runs", "make_card", "sweep_of"]

CARD_JSON = "card.json"
README = "README.md"
_SPLITS = "splits.json"


class CardError(ValueError):
    pass


def sweep_of(probe_dir: Path) -> Path | None:
    """The sweep folder a probe was saved in (``SWEEP/probes/<run_id>``), if it has results."""
    cand = probe_dir.resolve().parent.parent
    return cand if probe_dir.resolve().parent.name == "probes" and (cand / RESULTS).is_file() else None


def best_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The validation-best saved probe of each probe family (of each model): among the ``selected`` runs
    (the layer and C chosen on validation per pooling), the one with the best primary validation metric
    (ties: cheaper); the surface baselines are left out."""
    if "selected" not in df.columns:
        raise CardError("the results have no 'selected' column (an unfinished sweep?)")
    sel = df[
        df["selected"].astype(bool)
        & (df["probe_path"].fillna("").astype(str) != "")
        & ~df["probe"].isin(SURFACE_KINDS)
    ]
    if sel.empty:
        raise CardError("no validation-selected run saved a probe")
    metric = f"val_{sel['select_metric'].iloc[0]}" if "select_metric" in sel else "val_auroc"
    runs = sel.drop_duplicates("run_id").sort_values(
        [metric, "flops_per_token"], ascending=[False, True], kind="stable"
    )
    keys = ["model", "probe"] if "model" in runs.columns else ["probe"]
    return runs.groupby(keys, sort=False).head(1).reset_index(drop=True)


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _fmt(x: Any, digits: int = 3) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(row: Mapping[str, Any], key: str) -> str:
    lo, hi = _num(row.get(f"{key}_lo")), _num(row.get(f"{key}_hi"))
    base = _fmt(row.get(key))
    return f"{base} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else base


def _base_model(ref: str) -> str:
    spec = BUNDLED_MODELS.get(ref)
    return spec.hf_repo if spec is not None else ref


def _by_source(role: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {"source": s, "harmful": int(c.get("harmful", 0)), "harmless": int(c.get("harmless", 0))}
        for s, c in sorted((role.get("by_source") or {}).items())
    ]


def _sweep_facts(sweep: Path, run_id: str) -> dict[str, Any]:
    df = read_results(sweep)
    rows = df[df["run_id"] == run_id]
    if rows.empty:
        raise CardError(f"{sweep / RESULTS} has no rows for run {run_id} (a probe from another sweep?)")
    splits = json.loads((sweep / _SPLITS).read_text()) if (sweep / _SPLITS).is_file() else {}
    selection = json.loads((sweep / SELECTION_JSON).read_text()) if (sweep / SELECTION_JSON).is_file() else {}
    first = rows.iloc[0].to_dict()
    evals = {}
    for _, r in rows.iterrows():
        d = r.to_dict()
        evals[str(d["eval_set"])] = {
            k: (_num(d.get(k)) if k not in ("negatives",) else d.get(k))
            for k in (
                "auroc", "auroc_lo", "auroc_hi", "auprc", "log_auroc", "tpr_at_1pct_fpr",
                "tpr_at_1pct_fpr_lo", "tpr_at_1pct_fpr_hi", "tpr_at_0.1pct_fpr", "realized_fpr_at_1pct",
                "benign_flag_rate_at_1pct_fpr",
                "n_pos", "n_neg", "n_eval", "surface_auroc", "negatives",
            )
        }  # fmt: skip
        evals[str(d["eval_set"])]["confounded"] = bool(d.get("confounded", False))
    roles = splits.get("roles", {})
    return {
        "results": str(sweep / RESULTS),
        "selected": bool(rows["selected"].any()) if "selected" in rows else None,
        "select_metric": first.get("select_metric"),
        "selection_rule": selection.get("tie_rule"),
        "val": {k[4:]: _num(v) for k, v in first.items()
                if k.startswith("val_") and k not in ("val_candidates", "val_ties")},
        "thresholds": {
            "1%": _num(first.get("threshold_at_1pct_fpr")),
            "0.1%": _num(first.get("threshold_at_0.1pct_fpr")),
            "n_benign_control": int(first.get("n_benign_control") or 0),
            "n_benign_heldout": int(_num(first.get("n_benign_heldout")) or 0),
        },
        "cost": {k: _num(first.get(k)) for k in (
            "flops_per_token", "overhead_pct", "standalone_flops_per_token", "standalone_overhead_pct")},
        "C": _num(first.get("C")),
        "model": first.get("model"),
        "n_train": int(first.get("n_train") or 0),
        "data": {
            role: {"n": int(info.get("n", 0)), "by_source": _by_source(info)}
            for role, info in roles.items()
            if role in ("train", "val", "control", "heldout")
        },
        "eval_sets": evals,
    }  # fmt: skip


def _front_matter(meta: Mapping[str, Any], kind: str, facts: Mapping[str, Any] | None, name: str) -> str:
    ref = str(meta.get("model_ref") or meta.get("model_id") or "unknown")
    fm: dict[str, Any] = {
        "library_name": "probe-atlas",
        "pipeline_tag": "text-classification",
        "base_model": _base_model(ref),
        "tags": ["probe-atlas", "activation-probe", "safety", "harmful-request-detection", kind],
    }
    if facts and facts.get("eval_sets"):
        results = []
        for es, m in facts["eval_sets"].items():
            metrics = [
                {"type": "roc_auc", "name": "AUROC", "value": m["auroc"]},
                {"type": "tpr_at_1pct_fpr", "name": "TPR at 1% FPR", "value": m["tpr_at_1pct_fpr"]},
            ]
            metrics = [x for x in metrics if x["value"] is not None]
            if metrics:
                results.append(
                    {
                        "task": {"type": "text-classification", "name": "harmful request detection"},
                        "dataset": {"name": es, "type": es},
                        "metrics": metrics,
                    }
                )
        if results:
            fm["model-index"] = [{"name": name, "results": results}]
    return "---\n" + yaml.safe_dump(fm, sort_keys=False, allow_unicode=True) + "---\n"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _readme(
    meta: Mapping[str, Any], doc: Mapping[str, Any], facts: Mapping[str, Any] | None, name: str
) -> str:
    kind = str(doc.get("kind", "unknown"))
    pooling = meta.get("pooling", {})
    pooling_s = pooling.get("kind", str(pooling)) if isinstance(pooling, dict) else str(pooling)
    extra = {k: v for k, v in pooling.items() if k != "kind"} if isinstance(pooling, dict) else {}
    if extra:
        pooling_s += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    ref = str(meta.get("model_ref") or meta.get("model_id") or "unknown")
    out = [_front_matter(meta, kind, facts, name), f"# {name}\n"]
    out.append(
        f"A `{kind}` probe on **{_base_model(ref)}**'s activations that flags harmful requests, made with "
        "[probe-atlas](https://pypi.org/project/probe-atlas/). It reads the model's own forward pass: "
        "the cost is a read-out, not a second model.\n"
    )
    out.append("## Probe\n")
    rows = [
        ["model", f"`{ref}` (model id `{meta.get('model_id', '?')}`, "
                  f"weights hash `{meta.get('weights_hash', '?')}`)"],
        ["hook", f"`{meta.get('hook', '?')}`: " + ", ".join(f"`{h}`" for h in meta.get("hook_names", []))],
        ["layer(s)", ", ".join(str(x) for x in meta.get("layers", [])) or "n/a"],
        ["pooling", pooling_s],
        ["positions", f"{meta.get('positions', '?')} (max_len {meta.get('max_len', '?')}, chat template "
                      f"{'on' if meta.get('chat_template') else 'off'})"],
        ["kind", f"`{kind}` (`{doc.get('class', '?')}`), {doc.get('n_features_in', '?')} input features"],
        ["C (chosen on validation)", _fmt(meta.get("C"), 4)],
        ["sweep / run", f"`{meta.get('sweep', '?')}` / `{meta.get('run_id', '?')}`"],
    ]  # fmt: skip
    out.append(_table(["", ""], rows) + "\n")
    if facts is None:
        out.append(
            "## Evaluation\n\nThis probe was carded without its sweep's results: no metrics, thresholds or "
            "data counts are known. Card a probe from its sweep folder (`SWEEP/probes/<run_id>`) "
            "to get them.\n"
        )
    else:
        th = facts["thresholds"]
        ctrl = facts["data"].get("control", {})
        out.append("## Thresholds\n")
        out.append(
            f"Scores are the probe's logits. Flag a prompt when its score is above the threshold. Both "
            f"thresholds were set on the **benign control set** ({th['n_benign_control']} harmless prompts, "
            f"disjoint from training and validation, decontaminated) at the stated FPR, scored on the "
            f"`{meta.get('positions', '?')}` positions with `{pooling_s}` pooling.\n"
        )
        out.append(
            _table(
                ["target FPR", "threshold"],
                [["1%", _fmt(th["1%"], 4)], ["0.1%", _fmt(th["0.1%"], 4) + (
                    " (the control set is too small for 0.1%)" if th["0.1%"] is None else "")]],
            )
            + "\n"
        )  # fmt: skip
        if ctrl.get("by_source"):
            out.append(
                "Calibration set by source: "
                + ", ".join(f"{s['source']} ({s['harmless'] + s['harmful']})" for s in ctrl["by_source"])
                + (f". The FPR realized on {th['n_benign_heldout']} further held-out harmless prompts is "
                   "in the table below." if th["n_benign_heldout"] else ".")
                + "\n"
            )  # fmt: skip
        out.append("## Training data\n")
        for role, title in (
            ("train", "Training"),
            ("val", "Validation (chose C and layer)"),
        ):
            info = facts["data"].get(role)
            if not info:
                continue
            out.append(f"**{title}**: {info['n']} prompts.\n")
            out.append(
                _table(
                    ["source", "harmful", "harmless"],
                    [[s["source"], str(s["harmful"]), str(s["harmless"])] for s in info["by_source"]],
                )
                + "\n"
            )
        out.append("## Evaluation\n")
        chosen = facts.get("selected")
        out.append(
            f"Validation chose everything (primary metric `val_{facts.get('select_metric')}` = "
            f"{_fmt(facts['val'].get(str(facts.get('select_metric'))), 4)}; "
            f"rule: {facts.get('selection_rule') or 'n/a'}). "
            + ("This layer and pooling are the ones validation selected for this probe family. "
               if chosen else "This run is *not* the one validation selected in its family and pooling. ")
            + "Test sets were decontaminated against train ∪ validation; harmful sets are scored against "
            "harmless prompts of the same form where the benchmark has them (`own`), else against the "
            "benign control set (`control`). Brackets: 95% bootstrap CIs.\n"
        )  # fmt: skip
        rows = []
        for es, m in facts["eval_sets"].items():
            rows.append([
                es + (" ⚠ confounded" if m.get("confounded") else ""),
                _ci(m, "auroc"), _ci(m, "tpr_at_1pct_fpr"), _fmt(m.get("tpr_at_0.1pct_fpr")),
                _fmt(m.get("realized_fpr_at_1pct"), 4), _fmt(m.get("surface_auroc")),
                f"{int(m.get('n_pos') or 0)} / {int(m.get('n_neg') or 0)}", str(m.get("negatives") or ""),
            ])  # fmt: skip
        out.append(
            _table(
                ["eval set", "AUROC", "TPR @ 1% FPR", "TPR @ 0.1% FPR", "realized FPR @ 1%",
                 "surface AUROC", "harmful / harmless", "negatives"],
                rows,
            )
            + "\n"
        )  # fmt: skip
        out.append(
            "*surface AUROC*: the best surface baseline (TF-IDF on the text, or a probe on token embeddings) "
            "on "
            "the same set; *confounded*: it reaches 0.9, so form alone separates that set.\n"
        )
        c = facts["cost"]
        out.append("## Cost\n")
        out.append(
            _table(
                ["", "FLOPs per token", "overhead (% of the model's forward pass)"],
                [["read-out (the model runs anyway)", _fmt(c["flops_per_token"], 0),
                  _fmt(c["overhead_pct"], 5)],
                 ["standalone (forward to the read layer + probe)", _fmt(c["standalone_flops_per_token"], 0),
                  _fmt(c["standalone_overhead_pct"], 2)]],
            )
            + "\n"
        )  # fmt: skip
    out.append("## Use\n")
    out.append(
        '```python\nfrom probes import load_probe\n\nprobe = load_probe("hf:OWNER/NAME")  # or this folder\n'
        "```\n\nScore a JSONL file of prompts with the model above (probe-atlas collects the activations the "
        "card names):\n\n```bash\n"
        "probe-atlas score --probe CARD_DIR --data prompts.jsonl --out scores.jsonl\n```\n"
    )
    out.append("## Intended use and limitations\n")
    out.append(
        "- Intended use: a cheap first-line monitor of user requests to this exact model (same weights, "
        "tokenizer, chat template and positions); escalate flagged prompts to a stronger classifier or a "
        "human.\n"
        "- It is not a general harmfulness classifier: it reads one model's activations and does not "
        "transfer to another model, another hook or another pooling.\n"
        "- The thresholds hold for prompts like the benign control set; a different traffic mix shifts the "
        "realized FPR (check it on your own harmless traffic before relying on 1% or 0.1%).\n"
        "- Metrics come from small public benchmarks (English, single-turn prompts); jailbreak wrappers, "
        "look-alike requests and other languages are weaker spots (see the eval sets above), and adaptive "
        "attacks against the probe were not evaluated here.\n"
        "- Labels are the benchmarks' own (harmful request vs. not), not a policy of yours.\n"
    )
    return "\n".join(out)


def make_card(
    probe_dir: str | Path,
    out: str | Path,
    *,
    sweep: str | Path | None = None,
    name: str | None = None,
) -> Path:
    """Write a probe card for ``probe_dir`` into ``out`` (replaced atomically; nothing half-written on
    error) and return it. ``sweep``: the sweep folder the metrics come from (default: the one the probe
    sits in, if any)."""
    src = Path(probe_dir)
    if not (src / "probe.json").is_file() and src.is_dir():
        raise CardError(
            f"{src}: cards are written for saved probes (probe.json + probe.safetensors); this folder holds "
            f"{sorted(f.name for f in src.iterdir())[:4]}"
        )
    doc = read_probe_info(src)  # a probe folder, checked (a clear error otherwise)
    meta = dict(doc.get("metadata") or {})
    sw = Path(sweep) if sweep is not None else sweep_of(src)
    facts = None
    if sw is not None:
        if not (sw / RESULTS).is_file():
            raise CardError(f"{sw}: no {RESULTS} (not a sweep folder)")
        run_id = meta.get("run_id")
        if not run_id:
            raise CardError(
                f"{src}: the probe's metadata has no run_id, so its sweep results cannot be found"
            )
        facts = _sweep_facts(sw, str(run_id))
    pooling = meta.get("pooling", {})
    pname = pooling.get("kind", "") if isinstance(pooling, dict) else str(pooling)
    layers = "-".join(str(x) for x in meta.get("layers", []))
    name = name or "-".join(
        x for x in ("probe-atlas", str(meta.get("model_ref") or ""), str(doc.get("kind")), pname,
                    f"L{layers}" if layers else "") if x
    )  # fmt: skip
    with atomic_dir(out) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in (README, CARD_JSON):
                shutil.copy2(f, tmp / f.name)
        (tmp / README).write_text(_readme(meta, doc, facts, name), encoding="utf-8")
        card = {"name": name, "kind": doc.get("kind"), "metadata": meta, "sweep": facts}
        (tmp / CARD_JSON).write_text(json.dumps(card, indent=1, default=str), encoding="utf-8")
    return Path(out)
