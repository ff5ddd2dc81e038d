"""Load SAEs: a folder in sae-lens's format (what :mod:`sae.train` writes) or a pretrained release by ID.

``load_sae("runs/sae/saes/blocks.12...")`` reads a local folder (``cfg.json`` + ``sae_weights.safetensors``)
with ``SAE.load_from_disk``; ``load_sae("pretrained:gpt2-small-res-jb/blocks.8.hook_resid_pre")`` or
:func:`load_pretrained` downloads a release listed in sae-lens's directory with ``SAE.from_pretrained``
(online only: offline it fails with :class:`SAELoadError` saying so). :func:`check_hook` checks that an SAE
was trained on the hook a store holds, with a clear error otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from activations.store import ActivationStore
from probes.io import (
    FLOATS,
    LIMITS,
    ProbeLoadError,
    TensorSpec,
    check_json_tree,
    read_json_file,
    read_tensors,
)

__all__ = [
    "PRETRAINED_PREFIX",
    "SAEFolderError",
    "SAEHookMismatchError",
    "SAELoadError",
    "check_hook",
    "load_pretrained",
    "load_sae",
    "sae_hook_name",
    "save_sae",
    "validate_sae_folder",
]

PRETRAINED_PREFIX = "pretrained:"


class SAELoadError(RuntimeError):
    """An SAE could not be loaded (missing folder, unknown release, no network)."""


class SAEFolderError(SAELoadError, ProbeLoadError):
    """A local SAE folder is malformed or claims what it cannot hold (names the file and field)."""


#: architectures a local folder may name (what :class:`sae.features.LatentEncoder` reads)
SAE_ARCHITECTURES = ("standard", "jumprelu", "topk")
SAE_DTYPES = ("float32", "float16", "bfloat16", "float64")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def validate_sae_folder(p: Path) -> dict[str, Any]:
    """Check a local sae-lens folder before sae-lens reads it: ``cfg.json`` (bounded, a known architecture,
    dimensions, dtype, typed flags) and ``sae_weights.safetensors`` (header first; names, shapes and dtypes
    that agree with the config; finite values). Returns the parsed config; raises :class:`SAEFolderError`."""
    cfg_file = p / CFG_FILE
    try:
        cfg = read_json_file(cfg_file, max_bytes=1 << 20, what=CFG_FILE)
        if not isinstance(cfg, dict):
            raise ProbeLoadError(f"{cfg_file}: not a JSON object")
        check_json_tree(cfg, cfg_file)
        arch = cfg.get("architecture", "standard")
        if arch not in SAE_ARCHITECTURES:
            raise ProbeLoadError(
                f"{cfg_file}: architecture {str(arch)[:40]!r} is not one of {SAE_ARCHITECTURES}"
            )
        dims = {}
        for key in ("d_in", "d_sae"):
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= LIMITS.max_dim:
                raise ProbeLoadError(
                    f"{cfg_file}: {key} must be an integer in [1, {LIMITS.max_dim}], got {v!r}"
                )
            dims[key] = v
        if dims["d_in"] * dims["d_sae"] > LIMITS.max_numel:
            raise ProbeLoadError(f"{cfg_file}: d_in x d_sae = {dims['d_in'] * dims['d_sae']} is too large")
        if cfg.get("dtype", "float32") not in SAE_DTYPES:
            raise ProbeLoadError(
                f"{cfg_file}: dtype {str(cfg.get('dtype'))[:40]!r} is not one of {SAE_DTYPES}"
            )
        for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if key in cfg and not isinstance(cfg[key], bool):
                raise ProbeLoadError(f"{cfg_file}: {key} must be true or false")
        for key in ("normalize_activations", "reshape_activations", "device"):
            if key in cfg and not isinstance(cfg[key], str):
                raise ProbeLoadError(f"{cfg_file}: {key} must be a string")
        if arch == "topk":
            k = cfg.get("k")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= dims["d_sae"]:
                raise ProbeLoadError(
                    f"{cfg_file}: k must be an integer in [1, d_sae={dims['d_sae']}], got {k!r}"
                )
        meta = cfg.get("metadata", {})
        if not isinstance(meta, dict) or not isinstance(meta.get("hook_name", ""), str | None):
            raise ProbeLoadError(f"{cfg_file}: metadata must be an object with a string hook_name")
        d, m = dims["d_in"], dims["d_sae"]
        specs: dict[str, TensorSpec] = {
            "W_enc": ((d, m), FLOATS),
            "W_dec": ((m, d), FLOATS),
            "b_enc": ((m,), FLOATS),
            "b_dec": ((d,), FLOATS),
        }
        if arch == "jumprelu":
            specs["threshold"] = ((m,), FLOATS)
        read_tensors(p / WEIGHTS_FILE, specs)
    except SAEFolderError:
        raise
    except ProbeLoadError as e:
        raise SAEFolderError(str(e)) from e
    return cfg


class SAEHookMismatchError(ValueError):
    """An SAE is applied to activations of another hook (or another width) than it was trained on."""


def sae_hook_name(sae: Any) -> str | None:
    """The TransformerLens hook an SAE reads (``cfg.metadata.hook_name``), or None if it does not say."""
    name = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    return str(name) if name else None


def check_hook(sae: Any, hook: str, store: ActivationStore | None = None) -> None:
    """Raise :class:`SAEHookMismatchError` unless ``sae`` reads ``hook`` (and, with ``store``, its width)."""
    have = sae_hook_name(sae)
    if have is None:
        raise SAEHookMismatchError(
            f"the SAE does not record its hook (cfg.metadata.hook_name is empty); cannot check it against "
            f"{hook!r}; set sae.cfg.metadata.hook_name if you know it"
        )
    if have != hook:
        raise SAEHookMismatchError(
            f"the SAE was trained on hook {have!r}, but the activations are from {hook!r}; "
            "use an SAE for this hook (or collect the SAE's hook)"
        )
    if store is not None:
        if hook not in store.hooks:
            raise SAEHookMismatchError(
                f"hook {hook!r} is not in the store {store.path} (it has {store.hooks})"
            )
        d = int(store.activations(hook).shape[1])
        if int(sae.cfg.d_in) != d:
            raise SAEHookMismatchError(
                f"the SAE reads {sae.cfg.d_in}-dimensional activations, "
                f"but {hook} in {store.path} is {d}-wide"
            )


def save_sae(sae: Any, path: str | Path, *, hook: str | None = None, model_id: str | None = None) -> Path:
    """Save an inference SAE in sae-lens's format (``save_model``), recording hook and model."""
    if hook is not None:
        sae.cfg.metadata.hook_name = hook
    if model_id is not None:
        sae.cfg.metadata.model_name = model_id
    p = Path(path)
    sae.save_model(p)
    return p


def load_pretrained(release: str, sae_id: str, *, device: str = "cpu", dtype: str = "float32") -> Any:
    """``SAE.from_pretrained(release, sae_id)`` (needs the Hugging Face hub); clear errors when offline."""
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory and "/" not in release:
        near = sorted(r for r in directory if release.split("-")[0] in r)[:8]
        raise SAELoadError(f"unknown sae-lens release {release!r}; similar releases: {near}")
    if release in directory and sae_id not in directory[release].saes_map:
        ids = list(directory[release].saes_map)
        raise SAELoadError(f"release {release!r} has no SAE {sae_id!r}; it has e.g. {ids[:6]}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise SAELoadError(
            f"cannot download the pretrained SAE {release}/{sae_id}: HF_HUB_OFFLINE=1 "
            "(pretrained SAEs need the Hugging Face hub; train one with sae.train instead)"
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except (OSError, ConnectionError, TimeoutError, ValueError) as e:
        raise SAELoadError(
            f"cannot load the pretrained SAE {release}/{sae_id} from the Hugging Face hub "
            f"(offline or unreachable?): {type(e).__name__}: {e}"
        ) from e
    except Exception as e:  # huggingface_hub raises its own HTTP / offline error types
        raise SAELoadError(
            f"cannot load the pretrained SAE {release}/{sae_id}: {type(e).__name__}: {e}"
        ) from e


def load_sae(ref: str | Path, *, hook: str | None = None, store: ActivationStore | None = None) -> Any:
    """An SAE from a local sae-lens folder or ``pretrained:RELEASE/SAE_ID``; checks ``hook`` when given.

    For a pretrained reference the split is at the first ``/`` after the release name as sae-lens lists it
    (release names have no ``/``); a Hugging Face repo id as release is not supported here.
    """
    from sae_lens import SAE

    s = str(ref)
    if s.startswith(PRETRAINED_PREFIX):
        rest = s[len(PRETRAINED_PREFIX) :]
        if "/" not in rest:
            raise SAELoadError(f"{s!r}: expected pretrained:RELEASE/SAE_ID")
        release, sae_id = rest.split("/", 1)
        sae = load_pretrained(release, sae_id)
    else:
        p = Path(os.path.expandvars(s)).expanduser()
        if not (p / CFG_FILE).is_file():
            raise SAELoadError(f"{p}: not an SAE folder in sae-lens's format (no cfg.json)")
        validate_sae_folder(p)
        try:
            sae = SAE.load_from_disk(p, device="cpu")
        except Exception as e:  # sae-lens judged a folder that passed the schema
            raise SAEFolderError(f"{p}: cannot load the SAE: {type(e).__name__}: {e}") from e
    if hook is not None:
        check_hook(sae, hook, store)
    return sae
