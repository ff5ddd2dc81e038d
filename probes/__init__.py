"""probes: everything that scores a sequence, its metrics and its cost. Builds on ``activations`` only.

One protocol (:class:`Scorer`, :mod:`probes.scorer`), one registry (:mod:`probes.base`, filled by
:func:`register_scorer` in each family's own module), one persistence module (:mod:`probes.io`). Every
module of this package is imported here, so every family is registered: a new family is one new module.
"""

from __future__ import annotations

import importlib
import pkgutil

from probes.attention import AttentionProbe
from probes.base import (
    SCORERS,
    SWEEP_KINDS,
    VIEWS,
    SweepKind,
    register_scorer,
    scorer_class,
    sweep_kind,
)
from probes.cascade import Cascade, cascade_scores, thresholds_for_rate
from probes.cost import CostModel, ProbeCost, cascade_expected_flops
from probes.diffmeans import DiffMeansProbe
from probes.ensemble import Ensemble, StackingEnsemble, ZScoreEnsemble, ensemble_cost
from probes.finetune import FinetunedLayers, Sequences, TruncatedModelClassifier
from probes.io import (
    ProbeLoadError,
    ProbeMismatchError,
    load_probe,
    load_scorer,
    read_probe_info,
    save_scorer,
)
from probes.lda import LDAProbe
from probes.logistic import LogisticProbe
from probes.metrics import auroc, conservative_threshold, evaluate, tpr_at_fpr
from probes.minilm import MiniLMClassifier
from probes.multilayer import MultiLayerProbe
from probes.multimax import MultiMaxProbe
from probes.prompted import PromptedClassifier
from probes.ragged import Ragged, ragged_from_store
from probes.scorer import Grid, Probe, Scorer
from probes.selection import DEFAULT_SELECT, select_best, select_scores
from probes.solver import fit_logistic_batched
from probes.stream import StreamingMonitor, calibrate_threshold, generate_tokens
from probes.text import TextClassifier, example_text
from probes.tfidf import TfidfClassifier
from probes.token import TokenProbe, TokenProbeBase

for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")  # every family registers itself

__all__ = [
    "DEFAULT_SELECT",
    "SCORERS",
    "SWEEP_KINDS",
    "VIEWS",
    "AttentionProbe",
    "Cascade",
    "CostModel",
    "DiffMeansProbe",
    "Ensemble",
    "FinetunedLayers",
    "Grid",
    "LDAProbe",
    "LogisticProbe",
    "MiniLMClassifier",
    "MultiLayerProbe",
    "MultiMaxProbe",
    "Probe",
    "ProbeCost",
    "ProbeLoadError",
    "ProbeMismatchError",
    "PromptedClassifier",
    "Ragged",
    "Scorer",
    "Sequences",
    "StackingEnsemble",
    "StreamingMonitor",
    "SweepKind",
    "TextClassifier",
    "TfidfClassifier",
    "TokenProbe",
    "TokenProbeBase",
    "TruncatedModelClassifier",
    "ZScoreEnsemble",
    "auroc",
    "calibrate_threshold",
    "cascade_expected_flops",
    "cascade_scores",
    "conservative_threshold",
    "ensemble_cost",
    "evaluate",
    "example_text",
    "fit_logistic_batched",
    "generate_tokens",
    "load_probe",
    "load_scorer",
    "ragged_from_store",
    "read_probe_info",
    "register_scorer",
    "save_scorer",
    "scorer_class",
    "select_best",
    "select_scores",
    "sweep_kind",
    "thresholds_for_rate",
    "tpr_at_fpr",
]
