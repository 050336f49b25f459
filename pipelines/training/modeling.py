"""Loading and saving causal LMs as local safetensors folders (no pickle, no remote code), for every trainer."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_WEIGHTS_FILE = "model.safetensors"
_CONFLICTING_WEIGHTS = ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def torch_dtype(name: str) -> torch.dtype:
    """Map ``"float32"``/``"bfloat16"`` to the torch dtype (``"auto"`` is resolved first, for a device:
    ``pipelines.training.precision.resolve_dtype``)."""
    if name == "auto":
        raise ValueError("dtype auto must be resolved for the device first (pipelines.training.precision."
                         "resolve_dtype): it is bf16 only where this machine measures bf16 matmuls fast")
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def _state_dict_for_safetensors(model: PreTrainedModel, state: dict[str, torch.Tensor] | None = None
                                ) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses tensors that share memory).

    Tied targets (e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``) are dropped when they really
    share storage with their source; ``from_pretrained`` re-ties them from ``config.tie_word_embeddings``.
    Any other shared tensors are cloned.
    """
    state = model.state_dict() if state is None else state
    tied = model.get_expanded_tied_weights_keys() if hasattr(model, "get_expanded_tied_weights_keys") else {}

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        source = tied.get(key)
        if source in state and storage(state[source]) == storage(tensor):
            continue
        tensor = tensor.detach().cpu()
        ptr = storage(tensor)
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


def save_model(model: PreTrainedModel, tokenizer, out_dir: str | os.PathLike,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``generation_config.json``) + tokenizer files.

    Works for models ``save_pretrained`` refuses (GGUF-flagged): the config is written without
    ``quantization_config`` and with the model's current dtype. Refuses a folder that already holds a
    sharded or pickle checkpoint, which ``from_pretrained`` could pick up instead. ``state_dict`` replaces the
    model's own (ZeRO-3: the weights gathered on rank 0, while the module holds only its partition).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = [name for name in _CONFLICTING_WEIGHTS if (out / name).exists()]
    if stale:
        raise FileExistsError(f"{out} already holds {stale}; save into an empty folder")
    save_file(_state_dict_for_safetensors(model, state_dict), str(out / _WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = next(iter(state_dict.values())).dtype if state_dict else model.dtype
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_model(model_dir: str | os.PathLike, dtype: str | None = None) -> tuple[PreTrainedModel, object]:
    """Load a local checkpoint folder (safetensors only, no remote code). ``dtype=None`` keeps the saved dtype."""
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=torch_dtype(dtype) if dtype else "auto",
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    return model, tokenizer


def causal_lm_parts(model):
    """(decoder, lm_head) of a plain causal LM, through a DeepSpeed engine and a peft wrapper; None otherwise."""
    module = getattr(model, "module", model)  # DeepSpeed engine -> the wrapped module
    if hasattr(module, "get_base_model"):  # peft; a disabled adapter stays disabled in the base model's layers
        module = module.get_base_model()
    decoder, head = getattr(module, "model", None), getattr(module, "lm_head", None)
    config = getattr(module, "config", None)
    if not callable(decoder) or not callable(head) or getattr(config, "final_logit_softcapping", None):
        return None
    return decoder, head
