"""experiments: sweeps over layers × poolings × probe kinds, their backends and runners, the analysis of
their results, every figure, and the ``probe-atlas`` command line. The top floor: it may import
``activations``, ``probes`` and ``sae``; nothing imports it.

* :mod:`experiments.sweep` -- specs, data, context, results (row schema), engine;
* :mod:`experiments.backends` -- local and Ray;
* :mod:`experiments.kinds` -- the runners (generic, per-token, SAE, ensembles and cascades);
* :mod:`experiments.analysis` -- selection, headline tables, the frontier, robustness, scoring, generation,
  the transfer atlas and mixture ablations;
* :mod:`experiments.viz` -- every figure;
* :mod:`experiments.cli` -- ``probe-atlas``.
"""

from __future__ import annotations

from experiments.analysis.attacks import CampaignConfig, recipe_targets, run_campaign
from experiments.analysis.frontier import claims_table, frontier_summary, pareto_front
from experiments.analysis.mixtures import mixture_ablation
from experiments.analysis.models import signal_table
from experiments.analysis.report import best_per_cost_band, headline_table
from experiments.analysis.robustness import run_robustness
from experiments.analysis.scoring import score_dataset, score_file
from experiments.analysis.selection import annotate, pick, primary_metric
from experiments.analysis.transfer import (
    TransferError,
    TransferSpec,
    generalization_gap,
    layer_profile,
    load_transfer_spec,
    read_transfer,
    run_transfer,
)
from experiments.backends import BACKENDS, Backend, get_backend
from experiments.kinds.finish import finish_run
from experiments.kinds.registry import RUNNERS, register_runner
from experiments.sweep.context import RunGroup, SweepContext
from experiments.sweep.data import load_sweep_data
from experiments.sweep.engine import prepare, run_sweep
from experiments.sweep.results import (
    COLUMNS,
    ResultRow,
    SweepError,
    load_run_scores,
    read_results,
)
from experiments.sweep.spec import CONFIG_DIR, SpecError, SweepSpec, expand, load_spec, parse_spec
from experiments.viz.attacks import attack_figures
from experiments.viz.models import metric_by_depth, metric_vs_flops
from experiments.viz.report import build_report
from experiments.viz.results import (
    auroc_by_layer,
    cost_frontier,
    layer_pooling_heatmap,
    plot_results,
    roc_curves,
)
from experiments.viz.save import save_figure
from experiments.viz.transfer import (
    layer_profile_figure,
    overrefusal_recall,
    transfer_heatmap,
    write_transfer_figures,
)

__all__ = [
    "BACKENDS",
    "COLUMNS",
    "CONFIG_DIR",
    "RUNNERS",
    "Backend",
    "CampaignConfig",
    "ResultRow",
    "RunGroup",
    "SpecError",
    "SweepContext",
    "SweepError",
    "SweepSpec",
    "TransferError",
    "TransferSpec",
    "annotate",
    "attack_figures",
    "auroc_by_layer",
    "best_per_cost_band",
    "build_report",
    "claims_table",
    "cost_frontier",
    "expand",
    "finish_run",
    "frontier_summary",
    "generalization_gap",
    "get_backend",
    "headline_table",
    "layer_pooling_heatmap",
    "layer_profile",
    "layer_profile_figure",
    "load_run_scores",
    "load_spec",
    "load_sweep_data",
    "load_transfer_spec",
    "metric_by_depth",
    "metric_vs_flops",
    "mixture_ablation",
    "overrefusal_recall",
    "pareto_front",
    "parse_spec",
    "pick",
    "plot_results",
    "prepare",
    "primary_metric",
    "read_results",
    "read_transfer",
    "recipe_targets",
    "register_runner",
    "roc_curves",
    "run_campaign",
    "run_robustness",
    "run_sweep",
    "run_transfer",
    "save_figure",
    "score_dataset",
    "score_file",
    "signal_table",
    "transfer_heatmap",
    "write_transfer_figures",
]
