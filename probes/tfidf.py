"""TF-IDF + logistic regression on the text (``tfidf``): word 1-2 grams (and optionally character n-grams)
with sublinear tf-idf weights and an L2 logistic regression (scikit-learn), ``C`` chosen on the validation set
when one is given. Essentially free to run; a surface baseline beside every sweep."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from probes.base import SweepKind, register_scorer
from probes.cost import CostModel
from probes.io import ProbeLoadError, TensorSpec
from probes.metrics import auroc
from probes.text import DEFAULT_CS, TextClassifier, best_by_val

__all__ = ["TFIDF_FLOPS_PER_NGRAM", "TfidfClassifier"]

#: FLOPs per n-gram occurrence of the tf-idf scorer: sublinear tf ``1 + log tf`` (≈ 1), the product with the
#: folded ``idf·coef`` weight and the accumulation into the dot product (2), and the square-and-add of the
#: L2 norm (2), rounded up to 6 (a hash lookup per n-gram is not a FLOP).
TFIDF_FLOPS_PER_NGRAM = 6.0


@register_scorer
class TfidfClassifier(TextClassifier):
    """Sublinear tf-idf over word ``ngram_range`` n-grams (plus ``char_ngrams`` character n-grams within word
    boundaries, ``None`` for none) and an L2 logistic regression.

    With a validation set, ``C`` is picked from ``Cs`` by validation AUROC (ties: the smaller ``C``);
    without one, ``C`` is used. Labels are thresholded at 0.5 (soft labels become hard). Vectorizers are
    fitted on the training texts only. ``class_weight="balanced"`` reweights classes as scikit-learn does.
    """

    kind = "tfidf"
    sweep_kinds = (
        SweepKind(
            "tfidf",
            lambda e: (TfidfClassifier, dict(e.get("params") or {})),
            per_layer=False,
            uses_C=False,
            params=frozenset(("ngram_range", "char_ngrams", "min_df", "max_features", "Cs", "class_weight")),
            description="TF-IDF n-grams + logistic regression on the text",
        ),
    )

    def __init__(
        self,
        *,
        ngram_range: tuple[int, int] = (1, 2),
        char_ngrams: tuple[int, int] | None = None,
        sublinear_tf: bool = True,
        min_df: int = 1,
        max_features: int | None = None,
        lowercase: bool = True,
        C: float = 1.0,
        Cs: Sequence[float] | None = DEFAULT_CS,
        class_weight: str | None = None,
        max_iter: int = 2000,
    ) -> None:
        self.ngram_range = self._check_range(ngram_range, "ngram_range")
        self.char_ngrams = None if char_ngrams is None else self._check_range(char_ngrams, "char_ngrams")
        self.sublinear_tf = bool(sublinear_tf)
        if int(min_df) < 1:
            raise ValueError(f"min_df must be >= 1, got {min_df}")
        self.min_df = int(min_df)
        if max_features is not None and int(max_features) < 1:
            raise ValueError(f"max_features must be >= 1 or None, got {max_features}")
        self.max_features = None if max_features is None else int(max_features)
        self.lowercase = bool(lowercase)
        if not float(C) > 0:
            raise ValueError(f"C must be > 0, got {C}")
        self.C = float(C)
        self.Cs = None if Cs is None else tuple(float(c) for c in Cs)
        if self.Cs is not None and (not self.Cs or any(not c > 0 for c in self.Cs)):
            raise ValueError(f"Cs must be a non-empty list of positive numbers, got {Cs}")
        if class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {class_weight!r}")
        self.class_weight = class_weight
        self.max_iter = int(max_iter)
        self.vectorizers_: list[Any] = []
        self.coef_: np.ndarray | None = None
        self.intercept_: float = 0.0
        self.C_: float | None = None
        self.chars_per_word_: float = 0.0
        self.val_aurocs_: dict[float, float] = {}

    @staticmethod
    def _check_range(r: Sequence[int], name: str) -> tuple[int, int]:
        lo, hi = (int(x) for x in r)
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {tuple(r)}")
        return lo, hi

    def _make_vectorizers(self, vocabularies: Sequence[Mapping[str, int]] | None = None) -> list[Any]:
        specs: list[tuple[str, tuple[int, int]]] = [("word", self.ngram_range)]
        if self.char_ngrams is not None:
            specs.append(("char_wb", self.char_ngrams))
        out = []
        for i, (analyzer, rng) in enumerate(specs):
            out.append(
                TfidfVectorizer(
                    analyzer=analyzer,
                    ngram_range=rng,
                    sublinear_tf=self.sublinear_tf,
                    min_df=self.min_df,
                    max_features=self.max_features,
                    lowercase=self.lowercase,
                    vocabulary=None if vocabularies is None else dict(vocabularies[i]),
                    dtype=np.float64,
                )
            )
        return out

    def _transform(self, texts: list[str]) -> Any:
        mats = [v.transform(texts) for v in self.vectorizers_]
        return mats[0] if len(mats) == 1 else sp.hstack(mats, format="csr")

    def _fit(
        self, texts: list[str], y: np.ndarray, val: tuple[list[str], np.ndarray] | None, progress: bool
    ) -> None:
        vecs = self._make_vectorizers()
        try:
            mats = [v.fit_transform(texts) for v in vecs]
        except ValueError as exc:  # "empty vocabulary; perhaps the documents only contain stop words"
            raise ValueError(f"TfidfClassifier: no n-grams in the training texts ({exc})") from exc
        self.vectorizers_ = vecs
        X = mats[0] if len(mats) == 1 else sp.hstack(mats, format="csr")
        yh = (y >= 0.5).astype(np.int64)
        Cs = list(self.Cs) if (val is not None and self.Cs) else [self.C]
        models, scores, val_scores = [], [], []
        Xv = self._transform(val[0]) if val is not None else None
        for C in Cs:
            lr = LogisticRegression(C=C, class_weight=self.class_weight, max_iter=self.max_iter)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=UserWarning)
                lr.fit(X, yh)
            models.append(lr)
            if val is not None:
                val_scores.append(lr.decision_function(Xv))
                scores.append(auroc(val[1] >= 0.5, val_scores[-1]))
        best = best_by_val(val[1], val_scores, self.select_metric_) if val is not None else 0
        lr = models[best]
        self.coef_ = np.asarray(lr.coef_[0], dtype=np.float64)
        self.intercept_ = float(lr.intercept_[0])
        self.C_ = float(Cs[best])
        self.val_aurocs_ = {float(c): float(s) for c, s in zip(Cs, scores, strict=False)}
        self.val_auroc_ = float(scores[best]) if val is not None else None
        # word tokens as the vectorizer splits them (unigrams only), to count character n-grams per word
        unigrams = TfidfVectorizer(lowercase=self.lowercase).build_analyzer()
        n_words = sum(len(unigrams(t)) for t in texts)
        n_chars = sum(len(t) for t in texts)
        self.chars_per_word_ = float(n_chars / n_words) if n_words else 0.0

    def _decision_function(self, texts: list[str]) -> np.ndarray:
        assert self.coef_ is not None
        X = self._transform(texts)
        return np.asarray(X @ self.coef_, dtype=np.float64).reshape(-1) + self.intercept_

    @property
    def n_features_(self) -> int:
        return 0 if self.coef_ is None else int(self.coef_.shape[0])

    def ngram_orders_per_token(self) -> float:
        """N-grams counted per word token: one per word n-gram order, plus (with ``char_ngrams``) one per
        character n-gram order per character, i.e. ``chars_per_word_`` (measured on the training texts,
        counting the word boundary) per order."""
        words = self.ngram_range[1] - self.ngram_range[0] + 1
        chars = 0.0
        if self.char_ngrams is not None:
            chars = (self.char_ngrams[1] - self.char_ngrams[0] + 1) * (self.chars_per_word_ or 5.0)
        return float(words + chars)

    def flops_per_token(self, policy: CostModel | None = None) -> float:
        """``TFIDF_FLOPS_PER_NGRAM`` (6) × n-grams per word token (see :meth:`ngram_orders_per_token`):
        a sparse dot product with a normalized tf-idf vector, ≈ 12 FLOPs per token for word 1-2 grams.
        Independent of ``policy``; a word token stands for a policy token (BPE tokens are ≈ 1.3 per word,
        so this slightly over-counts per policy token)."""
        return TFIDF_FLOPS_PER_NGRAM * self.ngram_orders_per_token()

    def n_params(self) -> int:
        """Coefficients + intercept + idf weights."""
        return 2 * self.n_features_ + 1

    def get_config(self) -> dict[str, Any]:
        return {
            "ngram_range": list(self.ngram_range),
            "char_ngrams": None if self.char_ngrams is None else list(self.char_ngrams),
            "sublinear_tf": self.sublinear_tf,
            "min_df": self.min_df,
            "max_features": self.max_features,
            "lowercase": self.lowercase,
            "C": self.C,
            "Cs": None if self.Cs is None else list(self.Cs),
            "class_weight": self.class_weight,
            "max_iter": self.max_iter,
        }

    def saved_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        assert self.coef_ is not None
        tensors: dict[str, Tensor] = {
            "coef": torch.from_numpy(self.coef_.copy()),
            "intercept": torch.tensor([self.intercept_], dtype=torch.float64),
        }
        vocabs = []
        for i, v in enumerate(self.vectorizers_):
            terms = [""] * len(v.vocabulary_)
            for term, j in v.vocabulary_.items():
                terms[int(j)] = term
            vocabs.append(terms)
            tensors[f"idf.{i}"] = torch.from_numpy(np.asarray(v.idf_, dtype=np.float64).copy())
        extra = {
            "vocabularies": vocabs,
            "C_selected": self.C_,
            "val_aurocs": {str(k): v for k, v in self.val_aurocs_.items()},
            "chars_per_word": self.chars_per_word_,
        }
        return tensors, extra

    @classmethod
    def classifier_tensor_specs(
        cls, config: dict[str, Any], extra: dict[str, Any], file: Path
    ) -> dict[str, TensorSpec] | None:
        vocabs = extra.get("vocabularies")
        if (
            not isinstance(vocabs, list)
            or not 1 <= len(vocabs) <= 2
            or not all(isinstance(v, list) and all(isinstance(t, str) for t in v) for v in vocabs)
        ):
            raise ProbeLoadError(f"{file}: extra.vocabularies must be one or two lists of terms")
        for i, v in enumerate(vocabs):
            if len(set(v)) != len(v):
                raise ProbeLoadError(f"{file}: extra.vocabularies[{i}] repeats a term")
        n = sum(len(v) for v in vocabs)
        f64 = frozenset({torch.float64, torch.float32})
        specs: dict[str, TensorSpec] = {"coef": ((n,), f64), "intercept": ((1,), f64)}
        specs |= {f"idf.{i}": ((len(v),), f64) for i, v in enumerate(vocabs)}
        for key in ("C_selected", "chars_per_word"):
            val = extra.get(key)
            if val is not None and (not isinstance(val, int | float) or isinstance(val, bool)):
                raise ProbeLoadError(f"{file}: extra.{key} must be a number")
        va = extra.get("val_aurocs") or {}
        if not isinstance(va, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in va.values()
        ):
            raise ProbeLoadError(f"{file}: extra.val_aurocs must map C to numbers")
        try:
            [float(k) for k in va]
        except ValueError as e:
            raise ProbeLoadError(f"{file}: extra.val_aurocs: {e}") from e
        return specs

    @classmethod
    def from_saved(
        cls, config: dict[str, Any], tensors: dict[str, Tensor], extra: dict[str, Any], **kwargs: Any
    ) -> TfidfClassifier:
        if kwargs:
            raise TypeError(f"TfidfClassifier.load takes no options, got {sorted(kwargs)}")
        cfg = dict(config)
        cfg["ngram_range"] = tuple(cfg["ngram_range"])
        if cfg.get("char_ngrams") is not None:
            cfg["char_ngrams"] = tuple(cfg["char_ngrams"])
        obj = cls(**cfg)
        vocabs = [{t: j for j, t in enumerate(terms)} for terms in extra["vocabularies"]]
        vecs = obj._make_vectorizers(vocabs)
        if len(vecs) != len(vocabs):
            raise ValueError(f"saved tf-idf has {len(vocabs)} vocabularies but its config builds {len(vecs)}")
        for i, v in enumerate(vecs):
            idf = tensors[f"idf.{i}"].numpy().astype(np.float64)
            if idf.shape[0] != len(vocabs[i]):
                raise ValueError(f"idf.{i} has {idf.shape[0]} entries for a vocabulary of {len(vocabs[i])}")
            v.idf_ = idf
        obj.vectorizers_ = vecs
        obj.coef_ = tensors["coef"].numpy().astype(np.float64)
        if obj.coef_.shape[0] != sum(len(vc) for vc in vocabs):
            raise ValueError("saved tf-idf coefficients do not match its vocabulary size")
        obj.intercept_ = float(tensors["intercept"][0])
        obj.C_ = extra.get("C_selected")
        obj.val_aurocs_ = {float(k): float(v) for k, v in (extra.get("val_aurocs") or {}).items()}
        obj.chars_per_word_ = float(extra.get("chars_per_word", 0.0))
        return obj
