"""The local backend (the default): every group runs in this process, one after the other; each kind's
rows are appended to ``results.parquet`` as soon as they are done, so a killed sweep keeps them."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from experiments.backends.base import Backend, Session, register_backend
from experiments.sweep.context import SweepContext
from experiments.sweep.groups import GroupKey, run_group
from experiments.sweep.results import append_results
from experiments.sweep.spec import Run, SweepSpec

__all__ = ["LocalBackend"]


class _LocalSession(Session):
    def __init__(self, model: HookedTransformer | None) -> None:
        self.model = model

    def run_groups(
        self, ctx: SweepContext, groups: Mapping[GroupKey, Sequence[Run]], *, progress: bool = True
    ) -> None:
        for (_seed, hook_kind, pooling), group in tqdm(
            list(groups.items()), desc="fit groups", disable=not progress
        ):
            run_group(ctx, hook_kind, pooling, list(group), sink=lambda rows: append_results(ctx.out, rows))


@register_backend
class LocalBackend(Backend):
    name = "local"

    def __init__(self, address: str | None = None) -> None:
        pass  # one process: no cluster to connect to

    @contextmanager
    def session(self, spec: SweepSpec, model: HookedTransformer | None) -> Iterator[Session]:
        yield _LocalSession(model)
