"""A streaming monitor: generation with TransformerLens's KV cache, a per-token probe read from the forward
pass that happens anyway, and an early stop when the running score crosses a threshold.

:func:`generate_tokens` is one batched generation loop (left padding with an explicit attention mask, a
``TransformerLensKeyValueCache``, greedy or seeded sampling, per-row EOS). With a probe it registers forward
hooks on the probe's hook points: each decoding forward pass feeds the newest token, its hook activation
(``act[:, -1]``, already computed for the next-token logits, no second pass) goes to the probe's
:class:`~probes.token.Streamer`, and a row whose running score exceeds the threshold stops: the token that
crossed is the last one it emits. The running scores stay on the model's device in preallocated tensors
(one vectorized stop check per token, one conversion to Python lists at the end). With ``score_last`` the
last generated token of a row that ran to ``max_new_tokens`` is scored by one more forward pass up to the
probe's deepest layer.

**Partial windows, one definition** (training, offline scoring and streaming alike): a ``window<M>`` window
counts only when it is full, or, for a sequence shorter than ``M``, as the single whole-sequence window. In
a stream, a prefix shorter than ``M`` has no score yet (NaN in ``GenerationResult.scores``), and the
whole-sequence window of a stream that ends before ``M`` tokens is scored at the **end-of-stream step**
(:meth:`~probes.token.Streamer.finish`, run by :func:`generate_tokens` when a row ends: EOS, the end of a
forced continuation or ``max_new_tokens``; its score is ``GenerationResult.final_score``, and a row that
crosses only there is flagged with ``stopped_at_end``).

**The stopping statistic** of a complete stream is what the monitor stops on: the maximum over the stream of
the running score, the end-of-stream step included (:func:`stopping_statistic`,
``GenerationResult.stopping_statistic``). For ``max``, ``ema`` and ``window`` read-outs it equals the probe's
offline score of the whole sequence (``decision_function``); for ``mean``, ``last``, ``softmax``, attention
(and MultiMax with a negative head weight) it does not: it is at least the offline score, so thresholds for
streaming must be set on it, never on offline scores.

Thresholds for streaming (:func:`calibrate_threshold`) are the conservative thresholds
(:func:`probes.metrics.conservative_threshold`) that flag at most ``fpr`` of *complete* benign streams by
their stopping statistic, and they record the token positions they were calibrated on
(``threshold_positions``: ``prompt``, ``response``, ...). The monitor scores *generated response* tokens:
:meth:`StreamingMonitor.from_dir` warns (:class:`ThresholdPositionWarning`) when the saved threshold was
calibrated on anything else, and :meth:`StreamingMonitor.calibrate` (``probe-atlas calibrate-monitor``) sets
it on benign generated responses, with the same generation loop. :func:`catch_positions` gives the token at
which each harmful stream is first caught and :func:`recall_by_tokens` the recall against tokens generated
(:mod:`experiments.viz.stream` draws both, and a generation's tokens coloured by their score).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from activations.collect import model_fingerprint
from activations.data import Example
from activations.models import load_model
from activations.render import ROLE_PROMPT, ROLE_RESPONSE, ROLE_SYSTEM, render_example
from probes.io import load_probe, read_probe_info
from probes.metrics import conservative_threshold, threshold_at_fpr
from probes.ragged import Ragged
from probes.token import TokenProbeBase

try:  # TransformerLens 3.x
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as _KVCache
except ImportError:  # pragma: no cover - TransformerLens 2.x
    from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]
        HookedTransformerKeyValueCache as _KVCache,
    )

__all__ = [
    "CALIBRATION_FILE",
    "GenerationResult",
    "MonitorError",
    "StreamCalibration",
    "StreamingMonitor",
    "ThresholdPositionWarning",
    "calibrate_threshold",
    "catch_positions",
    "generate_tokens",
    "positions_of_roles",
    "recall_by_tokens",
    "stopping_statistic",
    "stream_max_scores",
]

#: the file in a probe's folder that holds a threshold calibrated on benign generated responses
CALIBRATION_FILE = "stream_calibration.json"


class MonitorError(ValueError):
    pass


class ThresholdPositionWarning(UserWarning):
    """The monitor's threshold was calibrated on other token positions (e.g. prompt tokens) than the ones it
    scores (generated response tokens): its false-positive rate on responses is not the calibrated one."""


def positions_of_roles(roles: np.ndarray | Sequence[int]) -> str:
    """The token positions a set of scored rows covers, from their roles (``activations.render``):
    ``prompt``, ``response``, ``prompt+response``, ``all`` (system rows too) or ``none``."""
    have = {int(r) for r in np.unique(np.asarray(roles))}
    if not have:
        return "none"
    if ROLE_SYSTEM in have:
        return "all"
    names = [n for r, n in ((ROLE_PROMPT, "prompt"), (ROLE_RESPONSE, "response")) if r in have]
    return "+".join(names) if names else "none"


@dataclass
class GenerationResult:
    """One generated sequence (and, with a probe, its per-token logits and running scores)."""

    prompt_ids: list[int]
    ids: list[int]  # generated token ids (up to and including the stop / EOS token)
    token_logits: list[float] = field(default_factory=list)  # probe logit of each scored generated token
    scores: list[float] = field(default_factory=list)  # running score after each scored token (NaN: none yet)
    stop_index: int | None = None  # index into ids of the token whose score crossed the threshold
    threshold: float | None = None
    eos: bool = False
    final_score: float | None = None  # the end-of-stream step's score (None: the stream was stopped before)
    stopped_at_end: bool = False  # only the end-of-stream score crossed (stop_index: the last scored token)

    @property
    def stopped(self) -> bool:
        return self.stop_index is not None

    @property
    def stopping_statistic(self) -> float:
        """The maximum of the running scores and the end-of-stream score (NaN when nothing was scored)."""
        vals = [s for s in self.scores if not math.isnan(s)]
        if self.final_score is not None and not math.isnan(self.final_score):
            vals.append(self.final_score)
        return max(vals) if vals else math.nan

    def text(self, tokenizer: Any) -> str:
        return str(tokenizer.decode(self.ids, skip_special_tokens=True))


def _sample(
    logits: Float[Tensor, "b v"], temperature: float, gen: torch.Generator | None
) -> Int[Tensor, " b"]:
    """The next token of every row, on the CPU (greedy: the argmax on the logits' device)."""
    if temperature <= 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float().cpu().to(torch.float64) / temperature, -1)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _hook_layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
        raise MonitorError(f"hook {name!r} is not a block hook (blocks.<layer>.<hook>)")
    return int(parts[1])


def generate_tokens(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 48,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    stop_on_eos: bool = True,
    probe: TokenProbeBase | None = None,
    hooks: Sequence[str] | None = None,
    threshold: float | None = None,
    forced: Sequence[Sequence[int]] | None = None,
    score_last: bool = True,
) -> list[GenerationResult]:
    """Generate up to ``max_new_tokens`` for each prompt (token ids), batched, with the KV cache.

    With ``probe`` (a per-token probe; ``hooks`` default to ``probe.hooks``) every generated token is scored
    from its hook activation in the forward pass that consumes it, and every row that was not stopped gets
    the end-of-stream step when it ends (``final_score``); with ``threshold`` a row stops at the first token
    whose running score exceeds it (or is flagged ``stopped_at_end`` when only its end-of-stream score
    does). ``forced`` feeds fixed continuations (one per prompt) instead of the model's choices (teacher
    forcing; generation ends with the continuation).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise MonitorError("give at least one non-empty prompt")
    if max_new_tokens < 1:
        raise MonitorError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if forced is not None and len(forced) != len(prompts):
        raise MonitorError(f"forced has {len(forced)} continuations for {len(prompts)} prompts")
    if threshold is not None and probe is None:
        raise MonitorError("a threshold needs a probe")
    tok = model.tokenizer
    if eos_token_id is None and tok is not None:
        eos_token_id = tok.eos_token_id
    pad_id = int((tok.pad_token_id if tok is not None else None) or 0)
    device = torch.device(model.cfg.device) if model.cfg.device is not None else torch.device("cpu")
    b = len(prompts)
    s0 = max(len(p) for p in prompts)
    tokens = torch.full((b, s0), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s0), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, s0 - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, s0 - len(p) :] = 1
    gen = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    n_steps = max_new_tokens if forced is None else min(max_new_tokens, max(len(f) for f in forced))
    forced_ids: Tensor | None = None
    forced_len: Tensor | None = None
    if forced is not None:
        forced_ids = torch.full((b, n_steps), pad_id, dtype=torch.long)
        for i, f in enumerate(forced):
            if len(f):
                forced_ids[i, : min(len(f), n_steps)] = torch.as_tensor(list(f)[:n_steps], dtype=torch.long)
        forced_len = torch.as_tensor([len(f) for f in forced], dtype=torch.long)

    hook_names = list(hooks if hooks is not None else (probe.hooks or []) if probe is not None else [])
    if probe is not None and not hook_names:
        raise MonitorError("the probe records no hook names; pass hooks=")
    for h in hook_names:
        if h not in model.hook_dict:
            raise MonitorError(f"hook {h!r} of the probe is not a hook point of the model")
    streamer = probe.streamer() if probe is not None else None
    if streamer is not None:
        streamer.reset(b, device)
    captured: dict[str, Tensor] = {}

    def grabber(name: str) -> Any:
        def grab(module: Any, inputs: Any, output: Tensor) -> None:
            captured[name] = output[:, -1]

        return grab

    ids = torch.full((b, n_steps), pad_id, dtype=torch.long)  # generated tokens, host side
    n_ids = torch.zeros(b, dtype=torch.long)
    eos = torch.zeros(b, dtype=torch.bool)
    active = torch.ones(b, dtype=torch.bool)  # still generating
    stop_at = torch.full((b,), -1, dtype=torch.long)  # step whose token crossed the threshold
    score_cols: list[Tensor] = []  # per scored step, every row's running score (stacked once at the end)
    logit_cols: list[Tensor] = []
    thr = float(threshold) if threshold is not None else None
    cache = _KVCache.init_cache(model.cfg, device, b)
    handles = [model.hook_dict[h].register_forward_hook(grabber(h)) for h in hook_names]
    try:
        with torch.inference_mode():
            logits = model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache)
            captured.clear()  # prompt activations are not scored
            step_mask = torch.ones((b, 1), dtype=torch.long, device=device)
            for step in range(n_steps):
                if forced_ids is not None and forced_len is not None:
                    nxt = forced_ids[:, step]
                    live = active & (step < forced_len)  # a row whose continuation ended stops here
                else:
                    nxt = _sample(logits[:, -1], temperature, gen)
                    live = active
                ids[:, step] = nxt
                n_ids += live
                if stop_on_eos and eos_token_id is not None:
                    hit = live & (nxt == eos_token_id)  # the end-of-sequence token is kept, not scored
                    eos |= hit
                    live = live & ~hit
                active = live
                if not bool(live.any()):
                    break
                last = step == n_steps - 1
                if last and (streamer is None or not score_last):
                    break
                if last:  # only the probe needs this pass: stop after its deepest layer
                    stop = max(_hook_layer(h) for h in hook_names) + 1
                    model(
                        nxt[:, None].to(device),
                        attention_mask=step_mask,
                        past_kv_cache=cache,
                        stop_at_layer=stop,
                    )
                else:
                    logits = model(nxt[:, None].to(device), attention_mask=step_mask, past_kv_cache=cache)
                if streamer is not None:
                    x = (
                        captured[hook_names[0]]
                        if len(hook_names) == 1
                        else torch.cat([captured[h] for h in hook_names], dim=-1)
                    )
                    captured.clear()
                    s = streamer.update(x, rows=live)
                    score_cols.append(s)
                    logit_cols.append(s if streamer.last_token_logit is None else streamer.last_token_logit)
                    if thr is not None:
                        over = s > thr
                        if bool(over.any()):  # one host read per token; rows crossing now stop here
                            crossed = over.cpu() & live
                            stop_at[crossed] = step
                            active = active & ~crossed
                if not bool(active.any()):
                    break
            final = streamer.finish() if streamer is not None else None
    finally:
        for hd in handles:
            hd.remove()

    results = [
        GenerationResult(
            [int(t) for t in p], ids[i, : int(n_ids[i])].tolist(), threshold=threshold, eos=bool(eos[i])
        )
        for i, p in enumerate(prompts)
    ]
    if streamer is not None and final is not None:
        n_scored = streamer.count.cpu().tolist()
        empty = torch.zeros((b, 0))
        sc = (torch.stack(score_cols, 1) if score_cols else empty).cpu().tolist()
        lg = (torch.stack(logit_cols, 1) if logit_cols else empty).cpu().tolist()
        fin = final.cpu().tolist()
        for i, r in enumerate(results):
            k = int(n_scored[i])
            r.scores, r.token_logits = sc[i][:k], lg[i][:k]
            if int(stop_at[i]) >= 0:
                r.stop_index = int(stop_at[i])
            elif k > 0:  # the end-of-stream step
                r.final_score = float(fin[i])
                if thr is not None and r.final_score > thr:
                    r.stop_index, r.stopped_at_end = k - 1, True
    return results


# ----------------------------------------------------------------------------------------------------------
# the monitor
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamCalibration:
    """A streaming threshold and where it comes from: the conservative threshold that flags at most ``fpr``
    of ``n`` complete benign streams by their stopping statistic, on token ``positions`` of ``source``."""

    threshold: float
    fpr: float
    realized_fpr: float
    n: int
    positions: str
    source: str
    limited_by_n: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None

    def save(self, probe_dir: str | os.PathLike[str]) -> Path:
        """Write it to ``probe_dir/stream_calibration.json`` (atomically); the monitor reads it from there."""
        path = Path(probe_dir) / CALIBRATION_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        doc = asdict(self)
        doc["threshold"] = self.threshold if math.isfinite(self.threshold) else str(self.threshold)
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> StreamCalibration:
        p = Path(path)
        if p.is_dir():
            p = p / CALIBRATION_FILE
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            doc["threshold"] = float(doc["threshold"])
            return cls(**doc)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise MonitorError(f"cannot read a streaming calibration from {p}: {e}") from e


def _check_positions(threshold: float, positions: str | None, source: str) -> None:
    if positions == "response":
        return
    how = (
        "on benign generated responses: `probe-atlas calibrate-monitor --probe DIR --data BENIGN.jsonl` "
        "(or StreamingMonitor.calibrate)"
    )
    if positions is None:
        msg = (
            f"the streaming threshold {threshold:.4g} of {source} records no calibration positions (a sweep "
            "calibrates on its benign control set's scored tokens, prompt tokens unless `positions: "
            f"response`), but the monitor scores generated response tokens; calibrate it {how}"
        )
    else:
        msg = (
            f"the streaming threshold {threshold:.4g} of {source} was calibrated on {positions!r} tokens, "
            "but the monitor scores generated response tokens: its false-positive rate on responses is not "
            f"the calibrated one; calibrate it {how}"
        )
    warnings.warn(msg, ThresholdPositionWarning, stacklevel=3)


class StreamingMonitor:
    """Generation with a per-token probe that stops when the running score crosses ``threshold``.

    ``threshold_positions`` records the token positions the threshold was calibrated on (``response`` for
    :meth:`calibrate`; None when unknown or given by hand).
    """

    def __init__(
        self,
        model: HookedTransformer,
        probe: TokenProbeBase,
        *,
        threshold: float | None = None,
        hooks: Sequence[str] | None = None,
        use_chat_template: bool | None = None,
        threshold_positions: str | None = None,
    ) -> None:
        if not isinstance(probe, TokenProbeBase):
            raise MonitorError(
                f"the streaming monitor needs a per-token probe (probes.token), got {type(probe).__name__}"
            )
        self.model, self.probe, self.threshold = model, probe, threshold
        self.threshold_positions = threshold_positions
        self.calibration: StreamCalibration | None = None
        self.hooks = list(hooks if hooks is not None else probe.hooks or [])
        if not self.hooks:
            raise MonitorError("the probe records no hook names; pass hooks=")
        for h in self.hooks:
            if h not in model.hook_dict:
                raise MonitorError(f"hook {h!r} of the probe is not a hook point of the model")
        self.use_chat_template = use_chat_template

    @classmethod
    def from_dir(
        cls, probe_dir: str | Path, model: HookedTransformer | None = None, *, threshold: float | None = None
    ) -> StreamingMonitor:
        """Load a probe saved by a sweep (checks the model). The threshold defaults to the one calibrated on
        benign generated responses (``stream_calibration.json`` in the folder, written by
        :meth:`calibrate` / ``probe-atlas calibrate-monitor``), else the sweep's ``stream_threshold_1pct``
        (1% of the benign control sequences flagged), which warns (:class:`ThresholdPositionWarning`) unless
        it was calibrated on response tokens."""
        meta = dict(read_probe_info(probe_dir).get("metadata") or {})
        if model is None:
            ref = meta.get("model_ref") or meta.get("model_id")
            if not ref:
                raise MonitorError(f"probe at {probe_dir} names no model; pass one")
            model = load_model(str(ref))
        fp = model_fingerprint(model)
        for k in ("config_hash", "weights_hash", "tokenizer_hash"):
            if k in meta and meta[k] != fp[k]:
                raise MonitorError(
                    f"probe at {probe_dir} was trained on model {meta.get('model_id')!r} ({k}={meta[k]}), "
                    f"not on the loaded model {fp['model_id']!r} ({k}={fp[k]})"
                )
        probe = load_probe(probe_dir)
        if not isinstance(probe, TokenProbeBase):
            raise MonitorError(f"probe at {probe_dir} is a {type(probe).__name__}, not a per-token probe")
        positions: str | None = None
        calibration: StreamCalibration | None = None
        if threshold is None:
            if (Path(probe_dir) / CALIBRATION_FILE).is_file():
                calibration = StreamCalibration.load(probe_dir)
                threshold, positions = calibration.threshold, calibration.positions
            elif meta.get("stream_threshold_1pct") is not None:
                threshold = float(meta["stream_threshold_1pct"])
                positions = meta.get("stream_threshold_positions")
                _check_positions(threshold, positions, f"probe {probe_dir}")
        hooks = probe.hooks or meta.get("hook_names")
        mon = cls(
            model,
            probe,
            threshold=threshold,
            hooks=hooks,
            use_chat_template=meta.get("chat_template"),
            threshold_positions=positions,
        )
        mon.calibration = calibration
        return mon

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt rendered as the probe's training data was (chat template with generation prompt)."""
        r = render_example(
            Example(id="prompt", label=0, text=prompt),
            self.model.tokenizer,
            max_len=self.model.cfg.n_ctx,
            use_chat_template=self.use_chat_template,
        )
        return [int(t) for t in r.ids]

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 48,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        forced: Sequence[Sequence[int]] | None = None,
        threshold: float | None = None,
        score_last: bool = True,
    ) -> list[GenerationResult]:
        ps = [prompts] if isinstance(prompts, str) else list(prompts)
        thr = self.threshold if threshold is None else threshold
        return generate_tokens(
            self.model,
            [self.prompt_ids(p) for p in ps],
            max_new_tokens,
            temperature=temperature,
            seed=seed,
            probe=self.probe,
            hooks=self.hooks,
            threshold=thr,
            forced=forced,
            score_last=score_last,
        )

    def calibrate(
        self,
        prompts: Sequence[str],
        fpr: float = 0.01,
        max_new_tokens: int = 48,
        *,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 16,
        source: str = "benign prompts",
    ) -> StreamCalibration:
        """Set the threshold on benign *generated responses*: generate a response to every benign prompt with
        the monitor's own loop (no stopping, the end-of-stream step included), and take the conservative
        threshold that flags at most ``fpr`` of them by their stopping statistic. Sets ``threshold`` and
        ``threshold_positions = "response"``; returns the record (``.save(probe_dir)`` keeps it for
        :meth:`from_dir`). A response with no scored token (EOS first) can never be flagged: it counts as a
        benign stream below any threshold."""
        ps = list(prompts)
        if not ps:
            raise MonitorError("calibrate: give at least one benign prompt")
        if batch_size < 1:
            raise MonitorError(f"batch_size must be >= 1, got {batch_size}")
        ids = [self.prompt_ids(p) for p in ps]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        stat = np.full(len(ids), -np.inf)
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            res = generate_tokens(
                self.model,
                [ids[i] for i in idx],
                max_new_tokens,
                temperature=temperature,
                seed=seed + lo,
                probe=self.probe,
                hooks=self.hooks,
            )
            for i, r in zip(idx, res, strict=True):
                s = r.stopping_statistic
                stat[i] = s if not math.isnan(s) else -np.inf
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # limited_by_n is recorded instead
            info = conservative_threshold(stat, fpr)
        cal = StreamCalibration(
            threshold=info.threshold,
            fpr=float(fpr),
            realized_fpr=info.realized_fpr,
            n=info.n,
            positions="response",
            source=source,
            limited_by_n=info.limited_by_n,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            seed=int(seed),
        )
        self.threshold, self.threshold_positions, self.calibration = cal.threshold, cal.positions, cal
        return cal

    def offline_scores(self, result: GenerationResult) -> Float[Tensor, " t"]:
        """The running score after every scored generated token, computed offline from a fresh full forward
        pass over prompt + generated tokens (no KV cache) and the probe's ``decision_function`` of every
        prefix (NaN while not yet scorable): the check of the streaming scores."""
        x = self._offline_tokens(result)
        if x.shape[0] == 0:
            return torch.zeros(0)
        return self.probe.prefix_scores(x, running=True)

    def offline_final_score(self, result: GenerationResult) -> float:
        """The probe's offline score (``decision_function``) of all the scored generated tokens: what the
        end-of-stream step reports."""
        x = self._offline_tokens(result)
        if x.shape[0] == 0:
            return math.nan
        return float(self.probe.decision_function([x])[0])

    def _offline_tokens(self, result: GenerationResult) -> Float[Tensor, "t d"]:
        n = len(result.scores)
        if n == 0:
            return torch.zeros(0, 0)
        ids = torch.as_tensor([*result.prompt_ids, *result.ids[:n]], dtype=torch.long)[None]
        stop = max(_hook_layer(h) for h in self.hooks) + 1
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(ids, names_filter=self.hooks, stop_at_layer=stop)
        p0 = len(result.prompt_ids)
        return torch.cat([cache[h][0, p0 : p0 + n] for h in self.hooks], -1).to(torch.float32).cpu()


# ----------------------------------------------------------------------------------------------------------
# calibration for streaming
# ----------------------------------------------------------------------------------------------------------


def stopping_statistic(probe: TokenProbeBase, X: Ragged) -> np.ndarray:
    """Per complete sequence, what a streaming monitor stops on: the maximum of the running score over the
    stream, the end-of-stream step included (:meth:`~probes.token.TokenProbeBase.replay`)."""
    return probe.stopping_statistic(X)


def stream_max_scores(probe: TokenProbeBase, X: Ragged) -> np.ndarray:
    """The stopping statistic of every complete sequence (the name predates the end-of-stream step; same as
    :func:`stopping_statistic`)."""
    return stopping_statistic(probe, X)


def calibrate_threshold(probe: TokenProbeBase, benign: Ragged, fpr: float = 0.01) -> float:
    """The streaming threshold that flags at most ``fpr`` of complete benign sequences by their stopping
    statistic (conservative). The threshold holds for the token positions ``benign`` covers: to monitor
    generated responses, calibrate on benign responses (:meth:`StreamingMonitor.calibrate`)."""
    return float(threshold_at_fpr(stopping_statistic(probe, benign), fpr))


def catch_positions(probe: TokenProbeBase, harmful: Ragged, threshold: float) -> np.ndarray:
    """1-based index of the first token at which each sequence's running score exceeds ``threshold``; the
    sequence length when only its end-of-stream score does; 0 where it never does."""
    rep = probe.replay(harmful)
    out = []
    for s, f in zip(rep.running, rep.final, strict=True):
        hit = np.nonzero(s > threshold)[0]
        out.append(int(hit[0]) + 1 if len(hit) else (len(s) if f > threshold else 0))
    return np.array(out, dtype=np.int64)


def recall_by_tokens(catch: np.ndarray, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall (share of sequences caught) after ``k`` tokens, for ``k = 1..max_tokens``."""
    c = np.asarray(catch)
    top = int(max_tokens if max_tokens is not None else max(int(c.max()) if len(c) else 1, 1))
    k = np.arange(1, top + 1)
    caught = c[c > 0]
    recall = np.array([(caught <= kk).sum() / max(len(c), 1) for kk in k])
    return k, recall
