"""SAE features of a store: a self-contained latent encoder, pooled latents, and sparse latents on disk.

:class:`LatentEncoder` holds only the encoder columns of the latents it computes (for ReLU and JumpReLU SAEs,
where every latent depends on its own encoder row only), or the whole encoder plus a selection (top-k SAEs,
whose top-k competition needs every latent). It reproduces ``sae.encode`` exactly (tested) and is what an
SAE-feature probe saves.

:func:`pooled_latents` pools a store's latents per sequence (chunked over whole sequences: memory is
``chunk_tokens × n_latents``). :func:`encode_store` writes every row's non-zero latents as CSR
(``indptr.npy`` int64, ``indices.npy`` int32, ``values.npy`` float32, plus the store's ``offsets.npy``) and
:class:`SparseLatents` reads it back (memory-mapped), e.g. for :mod:`sae.view`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from activations.pooling import Pooling, iter_sequence_chunks
from activations.store import ActivationStore

__all__ = [
    "LatentEncoder",
    "SparseLatents",
    "encode_store",
    "iter_encoded",
    "pooled_latents",
    "pooled_latents_multi",
]

ACTIVATIONS = ("relu", "jumprelu", "topk")


@dataclass
class LatentEncoder:
    """``latents(x)`` = the chosen SAE latents of activations ``x``, exactly as ``sae.encode(x)[:, ids]``.

    ``W [d, m]``, ``b [m]``: encoder columns; ``b_in [d]``: subtracted from the input first (the decoder bias
    when the SAE applies it to its input); ``threshold [m]`` (JumpReLU); ``scale [m]``: multiplies the
    pre-activations (top-k SAEs trained with decoder-norm rescaling); ``select [k]``: which of the ``m``
    computed latents to return (top-k SAEs compute all ``m = d_sae`` and select after the competition);
    ``ids [k]``: the latents' indices in the SAE.
    """

    W: Float[Tensor, "d m"]
    b: Float[Tensor, " m"]
    b_in: Float[Tensor, " d"]
    ids: Int[Tensor, " k"]
    activation: str = "relu"
    threshold: Float[Tensor, " m"] | None = None
    scale: Float[Tensor, " m"] | None = None
    select: Int[Tensor, " k"] | None = None
    topk: int = 0
    d_sae: int = 0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.W.ndim != 2 or self.b.shape != (self.W.shape[1],) or self.b_in.shape != (self.W.shape[0],):
            raise ValueError(
                f"encoder shapes disagree: W {tuple(self.W.shape)}, b {tuple(self.b.shape)}, "
                f"b_in {tuple(self.b_in.shape)}"
            )
        if self.activation == "topk" and not 0 < self.topk <= self.W.shape[1]:
            raise ValueError(f"a top-k encoder needs 0 < topk <= {self.W.shape[1]}, got {self.topk}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise ValueError("a JumpReLU encoder needs its threshold")

    @property
    def d_in(self) -> int:
        return int(self.W.shape[0])

    @property
    def n_latents(self) -> int:
        return int(self.ids.numel())

    @property
    def n_computed(self) -> int:
        """Encoder columns evaluated per token (``k`` for ReLU/JumpReLU, ``d_sae`` for top-k)."""
        return int(self.W.shape[1])

    def flops_per_token(self) -> float:
        """Per-token FLOPs: the input shift, the encoder matmul, bias and activation (``≈ 2·d·m``)."""
        d, m = self.d_in, self.n_computed
        return 2.0 * d * m + d + 2.0 * m

    @classmethod
    def from_sae(cls, sae: Any, latents: Sequence[int] | Tensor | None = None) -> LatentEncoder:
        """The encoder of ``latents`` (default: all) of an sae-lens SAE (standard, JumpReLU or top-k)."""
        cfg = sae.cfg
        arch = cfg.architecture()
        if getattr(cfg, "normalize_activations", "none") != "none":
            raise ValueError(
                f"the SAE normalizes its input at run time ({cfg.normalize_activations!r}); fold the "
                "normalization into its weights first"
            )
        if getattr(cfg, "reshape_activations", "none") != "none":
            raise ValueError("SAEs on attention hook_z (reshape_activations) are not supported here")
        d_sae = int(cfg.d_sae)
        ids = torch.arange(d_sae) if latents is None else torch.as_tensor(latents, dtype=torch.long).flatten()
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= d_sae:
            raise ValueError(f"latent indices must be in [0, {d_sae}), got {ids.tolist()[:8]}...")
        with torch.no_grad():
            W = sae.W_enc.detach().float().cpu()
            b = sae.b_enc.detach().float().cpu()
            b_in = (sae.b_dec.detach().float().cpu() * float(cfg.apply_b_dec_to_input)).clone()
            if arch == "standard":
                return cls(W[:, ids].clone(), b[ids].clone(), b_in, ids.clone(), "relu", d_sae=d_sae)
            if arch == "jumprelu":
                th = sae.threshold.detach().float().cpu()
                return cls(
                    W[:, ids].clone(),
                    b[ids].clone(),
                    b_in,
                    ids.clone(),
                    "jumprelu",
                    threshold=th[ids].clone(),
                    d_sae=d_sae,
                )
            if arch == "topk":
                scale = (
                    sae.W_dec.detach().float().cpu().norm(dim=-1)
                    if getattr(cfg, "rescale_acts_by_decoder_norm", False)
                    else None
                )
                return cls(
                    W.clone(),
                    b.clone(),
                    b_in,
                    ids.clone(),
                    "topk",
                    scale=scale,
                    select=ids.clone(),
                    topk=int(cfg.k),
                    d_sae=d_sae,
                )
        raise ValueError(
            f"SAE architecture {arch!r} is not supported for feature probes (standard, jumprelu, topk are)"
        )

    def subset(self, positions: Sequence[int] | Tensor) -> LatentEncoder:
        """The encoder of a subset of this encoder's latents (``positions`` index :attr:`ids`)."""
        pos = torch.as_tensor(positions, dtype=torch.long).flatten()
        ids = self.ids[pos].clone()
        if self.activation == "topk":
            sel = (self.select if self.select is not None else torch.arange(self.n_computed))[pos].clone()
            return LatentEncoder(
                self.W,
                self.b,
                self.b_in,
                ids,
                "topk",
                scale=self.scale,
                select=sel,
                topk=self.topk,
                d_sae=self.d_sae,
            )
        th = self.threshold[pos].clone() if self.threshold is not None else None
        return LatentEncoder(
            self.W[:, pos].clone(),
            self.b[pos].clone(),
            self.b_in,
            ids,
            self.activation,
            threshold=th,
            d_sae=self.d_sae,
        )

    def __call__(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n k"]:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected activations [n, {self.d_in}], got {tuple(x.shape)}")
        x = x.to(torch.float32)
        pre = (x - self.b_in) @ self.W + self.b
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            assert self.threshold is not None
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if self.scale is not None:
            pre = pre * self.scale
        vals, idx = torch.topk(pre, k=self.topk, dim=-1, sorted=False)
        out = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        return out if self.select is None else out[:, self.select]

    # ---------------------------------------------------------------- persistence (probe state dicts)
    def state_dict(self, prefix: str = "encoder.") -> dict[str, Tensor]:
        d = {"W": self.W, "b": self.b, "b_in": self.b_in, "ids": self.ids}
        if self.threshold is not None:
            d["threshold"] = self.threshold
        if self.scale is not None:
            d["scale"] = self.scale
        if self.select is not None:
            d["select"] = self.select
        return {prefix + k: v.detach().cpu().contiguous() for k, v in d.items()}

    def config(self) -> dict[str, Any]:
        return {"activation": self.activation, "topk": self.topk, "d_sae": self.d_sae}

    @classmethod
    def from_state(
        cls, config: Mapping[str, Any], state: Mapping[str, Tensor], prefix: str = "encoder."
    ) -> LatentEncoder:
        def get(k: str) -> Tensor | None:
            return state.get(prefix + k)

        W, b, b_in, ids = get("W"), get("b"), get("b_in"), get("ids")
        if W is None or b is None or b_in is None or ids is None:
            raise ValueError(f"the state has no complete encoder under {prefix!r} (W, b, b_in, ids)")
        return cls(
            W.float(),
            b.float(),
            b_in.float(),
            ids.long(),
            str(config["activation"]),
            threshold=get("threshold"),
            scale=get("scale"),
            select=get("select"),
            topk=int(config.get("topk", 0)),
            d_sae=int(config.get("d_sae", 0)),
        )


def _encoder(sae_or_encoder: Any, latents: Sequence[int] | Tensor | None = None) -> LatentEncoder:
    if isinstance(sae_or_encoder, LatentEncoder):
        return sae_or_encoder if latents is None else sae_or_encoder.subset(latents)
    return LatentEncoder.from_sae(sae_or_encoder, latents)


def iter_encoded(
    store: ActivationStore,
    hook: str,
    sae_or_encoder: Any,
    *,
    select: str = "scored",
    chunk_tokens: int = 8192,
) -> Iterator[tuple[int, int, np.ndarray, Float[Tensor, "t k"]]]:
    """Yield ``(seq_lo, seq_hi, offsets, latents)`` over whole-sequence chunks of a store's rows.

    ``offsets`` are the chunk's sequence boundaries (from 0) over the ``latents`` rows.
    """
    enc = _encoder(sae_or_encoder)
    arr = store.activations(hook)
    if arr.shape[1] != enc.d_in:
        raise ValueError(f"{hook} in {store.path} is {arr.shape[1]}-wide, the SAE reads {enc.d_in}")
    rows, off = store.selection(select)
    for lo, hi in iter_sequence_chunks(off, chunk_tokens):
        r = slice(int(off[lo]), int(off[hi]))
        block = arr[r] if rows is None else arr[rows[r]]
        x = torch.from_numpy(np.asarray(block, dtype=np.float32))
        with torch.no_grad():
            yield lo, hi, off[lo : hi + 1] - off[lo], enc(x)


def pooled_latents_multi(
    store: ActivationStore,
    hook: str,
    sae_or_encoder: Any,
    poolings: Sequence[Pooling | str],
    *,
    latents: Sequence[int] | Tensor | None = None,
    select: str = "scored",
    chunk_tokens: int = 8192,
) -> dict[str, Float[Tensor, "n k"]]:
    """``{pooling name: [n_seq, k] pooled latents}`` for several poolings from one pass of the encoder."""
    pools = [Pooling.parse(p) for p in poolings]
    if not pools:
        raise ValueError("give at least one pooling")
    enc = _encoder(sae_or_encoder, latents)
    outs: dict[str, list[Tensor]] = {p.name: [] for p in pools}
    for _lo, _hi, off, z in iter_encoded(store, hook, enc, select=select, chunk_tokens=chunk_tokens):
        for p in pools:
            outs[p.name].append(p.ragged(z, off))
    return {k: torch.cat(v) for k, v in outs.items()}


def pooled_latents(
    store: ActivationStore,
    hook: str,
    sae_or_encoder: Any,
    pooling: Pooling | str,
    *,
    latents: Sequence[int] | Tensor | None = None,
    select: str = "scored",
    chunk_tokens: int = 8192,
) -> Float[Tensor, "n k"]:
    """Per-sequence pooled SAE latents ``[n_seq, k]`` (float32).

    Each token's latents are computed first and pooled over the sequence's ``select`` rows (pool the
    latents, as the raw probes pool activations), chunk by chunk of whole sequences.
    """
    p = Pooling.parse(pooling)
    return pooled_latents_multi(
        store, hook, sae_or_encoder, [p], latents=latents, select=select, chunk_tokens=chunk_tokens
    )[p.name]


# ------------------------------------------------------------------------------------------ sparse on disk
def encode_store(
    store: ActivationStore,
    hook: str,
    sae_or_encoder: Any,
    out: str | Path,
    *,
    select: str = "scored",
    chunk_tokens: int = 8192,
    top_k: int | None = None,
) -> SparseLatents:
    """Encode every ``select`` row of ``store`` into its SAE latents, stored sparse (CSR) under ``out``.

    ``top_k`` keeps only each row's ``top_k`` largest latents. Streams chunk by chunk: indices and values are
    appended to raw files and wrapped as ``.npy`` at the end, so memory stays bounded by the chunk.
    """
    enc = _encoder(sae_or_encoder)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _rows, off = store.selection(select)
    indptr = [np.zeros(1, np.int64)]
    nnz = 0
    tmp_i, tmp_v = out / ".indices.bin", out / ".values.bin"
    with tmp_i.open("wb") as fi, tmp_v.open("wb") as fv:
        for _lo, _hi, _off, z in iter_encoded(store, hook, enc, select=select, chunk_tokens=chunk_tokens):
            if top_k is not None and top_k < z.shape[1]:
                vals, idx = torch.topk(z, top_k, dim=1)
                z = torch.zeros_like(z).scatter_(1, idx, vals)
            nzr, nzc = torch.nonzero(z, as_tuple=True)
            counts = torch.bincount(nzr, minlength=z.shape[0]).numpy().astype(np.int64)
            fi.write(nzc.numpy().astype(np.int32).tobytes())
            fv.write(z[nzr, nzc].numpy().astype(np.float32).tobytes())
            indptr.append(nnz + np.cumsum(counts))
            nnz += int(counts.sum())
    for tmp, name, dt in ((tmp_i, "indices.npy", np.int32), (tmp_v, "values.npy", np.float32)):
        src = np.memmap(tmp, dtype=dt, mode="r", shape=(nnz,)) if nnz else np.zeros(0, dt)
        dst = np.lib.format.open_memmap(out / name, mode="w+", dtype=dt, shape=(nnz,))
        for lo in range(0, nnz, 1 << 22):
            dst[lo : lo + (1 << 22)] = src[lo : lo + (1 << 22)]
        dst.flush()
        del dst, src
        os.unlink(tmp)
    np.save(out / "indptr.npy", np.concatenate(indptr))
    np.save(out / "offsets.npy", np.asarray(off, dtype=np.int64))
    meta = {
        "store": str(store.path),
        "hook": hook,
        "select": select,
        "n_rows": int(off[-1]),
        "n_latents": enc.n_latents,
        "latent_ids": enc.ids.tolist() if enc.n_latents < enc.d_sae else None,
        "d_sae": enc.d_sae,
        "nnz": nnz,
        "top_k": top_k,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return SparseLatents(out)


class SparseLatents:
    """Latents of a store's rows in CSR form on disk (written by :func:`encode_store`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "meta.json").is_file():
            raise FileNotFoundError(f"{self.path}: no sparse latents here (missing meta.json)")
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.indptr = np.load(self.path / "indptr.npy")
        self.indices = np.load(self.path / "indices.npy", mmap_mode="r")
        self.values = np.load(self.path / "values.npy", mmap_mode="r")
        self.offsets = np.load(self.path / "offsets.npy")

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def n_latents(self) -> int:
        return int(self.meta["n_latents"])

    def dense(self, lo: int, hi: int) -> Float[Tensor, "r k"]:
        """Rows ``lo:hi`` as a dense float32 tensor."""
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        counts = np.diff(self.indptr[lo : hi + 1])
        r = np.repeat(np.arange(hi - lo), counts)
        out = torch.zeros(hi - lo, self.n_latents)
        out[torch.from_numpy(r), torch.from_numpy(np.array(self.indices[a:b], dtype=np.int64))] = (
            torch.from_numpy(np.array(self.values[a:b], dtype=np.float32))
        )
        return out

    def column(self, latent: int) -> Float[np.ndarray, " n"]:
        """One latent's activation on every row (dense float32 ``[n_rows]``), streamed over the CSR arrays."""
        out = np.zeros(self.n_rows, np.float32)
        step = 1 << 22
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))  # int64 [nnz]
        for lo in range(0, len(rows), step):
            idx = np.asarray(self.indices[lo : lo + step])
            hit = idx == latent
            out[rows[lo : lo + step][hit]] = np.asarray(self.values[lo : lo + step])[hit]
        return out

    def pooled(self, pooling: Pooling | str, chunk_tokens: int = 8192) -> Float[Tensor, "n k"]:
        """Per-sequence pooled latents (same as :func:`pooled_latents` on the same rows)."""
        p = Pooling.parse(pooling)
        outs = []
        for lo, hi in iter_sequence_chunks(self.offsets, chunk_tokens):
            z = self.dense(int(self.offsets[lo]), int(self.offsets[hi]))
            outs.append(p.ragged(z, self.offsets[lo : hi + 1] - self.offsets[lo]))
        return torch.cat(outs)
