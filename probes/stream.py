"""A streaming monitor: generation with TransformerLens's KV cache, a per-token probe read from the forward
pass that happens anyway, and an early stop when the running score crosses a threshold.

:func:`generate_tokens` is one batched generation loop (left padding with an explicit attention mask, a
``TransformerLensKeyValueCache``, greedy or seeded sampling, per-row EOS). With a probe it registers forward
hooks on the probe's hook points: each decoding forward pass feeds the newest token, its hook activation
(``act[:, -1]``, already computed for the next-token logits, no second pass) goes to the probe's
:class:`~probes.token.Streamer` (EMA / window mean / running max / ... of the per-token logit, exactly the
offline aggregation of the tokens so far), and a row whose running score exceeds the threshold stops: the
token that crossed is the last one it emits. With ``score_last`` the last generated token of a row that ran
to ``max_new_tokens`` is scored by one more forward pass up to the probe's deepest layer.

Thresholds for streaming (:func:`calibrate_threshold`) come from *complete* benign exchanges: the statistic
is the maximum of the running score over the whole stream (what the monitor would have stopped on), and the
threshold is the conservative one that flags at most ``fpr`` of them. :func:`catch_positions` gives the token
at which each harmful exchange is first caught; :func:`recall_by_tokens` / :func:`recall_figure` the recall
against tokens generated. :func:`token_figure` colours each generated token by its score (plotly HTML).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from probes.metrics import threshold_at_fpr
from probes.token import Ragged, Streamer, TokenProbeBase

try:  # TransformerLens 3.x
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as _KVCache
except ImportError:  # pragma: no cover - TransformerLens 2.x
    from transformer_lens.past_key_value_caching import (  # type: ignore[no-redef]
        HookedTransformerKeyValueCache as _KVCache,
    )

__all__ = [
    "GenerationResult",
    "StreamingMonitor",
    "calibrate_threshold",
    "catch_positions",
    "generate_tokens",
    "recall_by_tokens",
    "recall_figure",
    "stream_max_scores",
    "token_figure",
]


class MonitorError(ValueError):
    pass


@dataclass
class GenerationResult:
    """One generated sequence (and, with a probe, its per-token logits and running scores)."""

    prompt_ids: list[int]
    ids: list[int]  # generated token ids (up to and including the stop / EOS token)
    token_logits: list[float] = field(default_factory=list)  # probe logit of each scored generated token
    scores: list[float] = field(default_factory=list)  # running aggregate after each scored token
    stop_index: int | None = None  # index into ids of the token whose score crossed the threshold
    threshold: float | None = None
    eos: bool = False

    @property
    def stopped(self) -> bool:
        return self.stop_index is not None

    def text(self, tokenizer: Any) -> str:
        return str(tokenizer.decode(self.ids, skip_special_tokens=True))


def _sample(
    logits: Float[Tensor, "b v"], temperature: float, gen: torch.Generator | None
) -> Int[Tensor, " b"]:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.to(torch.float64) / temperature, -1)
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
    from its hook activation in the forward pass that consumes it; with ``threshold`` a row stops at the
    first token whose running score exceeds it. ``forced`` feeds fixed continuations (one per prompt)
    instead of the model's choices (teacher forcing; generation ends with the continuation).
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
    pad_id = (tok.pad_token_id if tok is not None else None) or 0
    device = model.cfg.device
    b = len(prompts)
    lens = [len(p) for p in prompts]
    s0 = max(lens)
    tokens = torch.full((b, s0), int(pad_id), dtype=torch.long)
    mask = torch.zeros((b, s0), dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, s0 - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, s0 - len(p) :] = 1
    results = [GenerationResult(list(map(int, p)), [], threshold=threshold) for p in prompts]
    gen = torch.Generator().manual_seed(int(seed)) if temperature > 0 else None
    n_steps = max_new_tokens if forced is None else min(max_new_tokens, max(len(f) for f in forced))

    hook_names = list(hooks if hooks is not None else (probe.hooks or []) if probe is not None else [])
    if probe is not None and not hook_names:
        raise MonitorError("the probe records no hook names; pass hooks=")
    captured: dict[str, Tensor] = {}
    streamer: Streamer | None = probe.streamer() if probe is not None else None
    if streamer is not None:
        streamer.reset(b)

    def grab(act: Tensor, hook: Any) -> None:
        captured[hook.name] = act[:, -1].detach()

    active = torch.ones(b, dtype=torch.bool)  # still generating
    scoring = torch.zeros(b, dtype=torch.bool)  # the newest token of the row is to be scored

    def score_step(step_tokens: int) -> None:
        assert streamer is not None
        x = torch.cat([captured[h] for h in hook_names], dim=-1).to(torch.float32).cpu()
        s = streamer.update(x)
        logit = streamer.last_token_logit
        for i in torch.nonzero(scoring).flatten().tolist():
            r = results[i]
            r.scores.append(float(s[i]))
            r.token_logits.append(float(logit[i]) if logit is not None else float("nan"))
            if threshold is not None and r.stop_index is None and float(s[i]) > threshold:
                r.stop_index = len(r.ids) - 1
                active[i] = False
        captured.clear()

    fwd_hooks: list[tuple[str | Callable[..., Any], Callable[..., Any]]] = (
        [(h, grab) for h in hook_names] if probe is not None else []
    )
    cache = _KVCache.init_cache(model.cfg, device, b)
    ctx = model.hooks(fwd_hooks=fwd_hooks) if fwd_hooks else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        logits = model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache)
        captured.clear()  # prompt activations are not scored
        for step in range(n_steps):
            if forced is not None:
                nxt = torch.tensor(
                    [int(f[step]) if step < len(f) else int(pad_id) for f in forced], dtype=torch.long
                )
            else:
                nxt = _sample(logits[:, -1].float().cpu(), temperature, gen)
            scoring = active.clone()
            for i in torch.nonzero(active).flatten().tolist():
                if forced is not None and step >= len(forced[i]):
                    active[i] = scoring[i] = False
                    continue
                results[i].ids.append(int(nxt[i]))
                if stop_on_eos and eos_token_id is not None and int(nxt[i]) == eos_token_id:
                    results[i].eos = True
                    active[i] = scoring[i] = False  # the end-of-sequence token is not scored
            if not bool(scoring.any()):
                break
            last = step == n_steps - 1
            if last and (probe is None or not score_last):
                break
            step_mask = torch.ones((b, 1), dtype=torch.long, device=device)
            if last:  # only the probe needs this pass: stop after its deepest layer
                stop = max(_hook_layer(h) for h in hook_names) + 1
                model(
                    nxt[:, None].to(device), attention_mask=step_mask, past_kv_cache=cache, stop_at_layer=stop
                )
            else:
                logits = model(nxt[:, None].to(device), attention_mask=step_mask, past_kv_cache=cache)
            if probe is not None:
                score_step(step)
            if not bool(active.any()):
                break
    return results


# ----------------------------------------------------------------------------------------------------------
# the monitor
# ----------------------------------------------------------------------------------------------------------


class StreamingMonitor:
    """Generation with a per-token probe that stops when the running score crosses ``threshold``."""

    def __init__(
        self,
        model: HookedTransformer,
        probe: TokenProbeBase,
        *,
        threshold: float | None = None,
        hooks: Sequence[str] | None = None,
        use_chat_template: bool | None = None,
    ) -> None:
        if not isinstance(probe, TokenProbeBase):
            raise MonitorError(
                f"the streaming monitor needs a per-token probe (probes.token), got {type(probe).__name__}"
            )
        self.model, self.probe, self.threshold = model, probe, threshold
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
        """Load a probe saved by a sweep (checks the model); the threshold defaults to the saved
        ``stream_threshold_1pct`` (1% of the sweep's benign control sequences flagged)."""
        from activations.collect import model_fingerprint
        from probes.io import load_probe, read_probe_info

        meta = dict(read_probe_info(probe_dir).get("metadata") or {})
        if model is None:
            from activations.models import load_model

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
        if threshold is None and meta.get("stream_threshold_1pct") is not None:
            threshold = float(meta["stream_threshold_1pct"])
        hooks = probe.hooks or meta.get("hook_names")
        return cls(
            model, probe, threshold=threshold, hooks=hooks, use_chat_template=meta.get("chat_template")
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt rendered as the probe's training data was (chat template with generation prompt)."""
        from activations.data import Example
        from activations.render import render_example

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

    def offline_scores(self, result: GenerationResult) -> Float[Tensor, " t"]:
        """The probe's offline score of every prefix of the scored generated tokens, from a fresh full
        forward pass over prompt + generated tokens (no KV cache): the check of the streaming scores."""
        n = len(result.scores)
        if n == 0:
            return torch.zeros(0)
        ids = torch.as_tensor([*result.prompt_ids, *result.ids[:n]], dtype=torch.long)[None]
        stop = max(_hook_layer(h) for h in self.hooks) + 1
        with torch.inference_mode():
            _, cache = self.model.run_with_cache(ids, names_filter=self.hooks, stop_at_layer=stop)
        p0 = len(result.prompt_ids)
        x = torch.cat([cache[h][0, p0 : p0 + n] for h in self.hooks], -1).to(torch.float32)
        return self.probe.prefix_scores(x)


# ----------------------------------------------------------------------------------------------------------
# calibration for streaming
# ----------------------------------------------------------------------------------------------------------


def stream_max_scores(probe: TokenProbeBase, X: Ragged) -> np.ndarray:
    """Per complete sequence, the maximum of the running score over the stream (what a monitor stops on)."""
    return np.array([s.max() for s in probe.stream_scores(X)])


def calibrate_threshold(probe: TokenProbeBase, benign: Ragged, fpr: float = 0.01) -> float:
    """The streaming threshold that flags at most ``fpr`` of complete benign sequences (conservative)."""
    return float(threshold_at_fpr(stream_max_scores(probe, benign), fpr))


def catch_positions(probe: TokenProbeBase, harmful: Ragged, threshold: float) -> np.ndarray:
    """1-based index of the first token at which each sequence's running score exceeds ``threshold``;
    0 where it never does."""
    out = []
    for s in probe.stream_scores(harmful):
        hit = np.nonzero(s > threshold)[0]
        out.append(int(hit[0]) + 1 if len(hit) else 0)
    return np.array(out, dtype=np.int64)


def recall_by_tokens(catch: np.ndarray, max_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Recall (share of sequences caught) after ``k`` tokens, for ``k = 1..max_tokens``."""
    c = np.asarray(catch)
    top = int(max_tokens if max_tokens is not None else max(int(c.max()) if len(c) else 1, 1))
    k = np.arange(1, top + 1)
    caught = c[c > 0]
    recall = np.array([(caught <= kk).sum() / max(len(c), 1) for kk in k])
    return k, recall


def recall_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "") -> Any:
    """Plotly figure: recall against tokens generated, one line per probe."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, (k, r) in curves.items():
        fig.add_trace(go.Scatter(x=k, y=r, mode="lines", name=name))
    fig.update_layout(
        title=title or "streaming recall at a fixed benign FPR",
        xaxis_title="tokens generated",
        yaxis_title="recall (harmful exchanges caught)",
        yaxis_range=[0, 1.02],
        template="plotly_white",
    )
    return fig


def token_figure(result: GenerationResult, tokenizer: Any, *, per_row: int = 12, title: str = "") -> Any:
    """Plotly figure: the generated tokens in a grid coloured by their running score, and the running score
    against the token index with the threshold."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    n = len(result.scores)
    toks = [tokenizer.decode([t]) for t in result.ids[:n]]
    rows = max(1, -(-n // per_row))
    z = np.full((rows, per_row), np.nan)
    text = np.full((rows, per_row), "", dtype=object)
    for i, (t, s) in enumerate(zip(toks, result.scores, strict=True)):
        z[i // per_row, i % per_row] = s
        mark = " ■" if result.stop_index == i else ""
        text[i // per_row, i % per_row] = (t.replace("\n", "⏎") or "·") + mark
    fig = make_subplots(rows=2, cols=1, row_heights=[0.65, 0.35], vertical_spacing=0.08)
    fig.add_trace(
        go.Heatmap(
            z=z[::-1],
            text=text[::-1],
            texttemplate="%{text}",
            colorscale="RdYlGn_r",
            colorbar={"title": "running score"},
            showscale=True,
            hovertemplate="%{text}: %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(go.Scatter(y=result.scores, mode="lines+markers", name="running score"), row=2, col=1)
    fig.add_trace(
        go.Scatter(y=result.token_logits, mode="lines", name="token logit", opacity=0.5), row=2, col=1
    )
    if result.threshold is not None:
        fig.add_hline(y=result.threshold, line_dash="dash", line_color="red", row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="generated token", row=2, col=1)
    stop = f", stopped at token {result.stop_index}" if result.stopped else ""
    fig.update_layout(
        title=title or f"streaming monitor{stop}", template="plotly_white", height=300 + 40 * rows
    )
    return fig
