"""Hugging Face interop: any PaLM run as a transformers model, and a transformers model of PaLM's architecture as
a run to sample from, evaluate and finetune.

PaLM's block exists in transformers as `CohereForCausalLM` (model_type "cohere", the architecture of Cohere's
Command-R and Aya): a parallel block fed by one bias-free LayerNorm, SwiGLU, rotary embeddings, multi-query or
grouped attention, tied embeddings and a multiplier on the logits. One exporter so opens transformers, peft,
vLLM (which registers CohereForCausalLM), llama.cpp's GGUF converter and the lm-evaluation-harness's `hf`
model (docs/HF.md). Needs the `[hf]` extra: pip install -e ".[hf]".

    python -m nanopalm.convert export out-shakespeare hf-shakespeare      # fp32; --dtype=bfloat16 halves it
    python -m nanopalm.convert import hf-shakespeare out-imported         # then sample.py, eval.py, --init_from
    python -m nanopalm.convert export_adapter LORA_RUN ADAPTER_DIR        # a LoRA run's adapters, for peft

Tensor by tensor (nanoPALM's names on the left):
  wte                  model.embed_tokens (and lm_head, when the run does not tie them)
  blocks.i.norm        model.layers.i.input_layernorm: the block's one LayerNorm, no bias (PaLM Section 2)
  blocks.i.in_proj     self_attn.q_proj | k_proj | v_proj, mlp.gate_proj | up_proj: the fused matmul cut by its
                       splits; q and k rows reordered within each head, because model.apply_rope turns
                       dimension d with d + D/2 and Cohere turns 2d with 2d + 1 (the same rotation otherwise)
  blocks.i.attn.out    self_attn.o_proj
  blocks.i.mlp.out     mlp.down_proj
  norm                 model.norm
and logit_scale = 1/sqrt(d_model) where the run scales its logits (Section 5), 1.0 where it does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nanopalm.errors import UserError
from nanopalm.model import PaLMConfig
from nanopalm.tokenizer import EOT_TEXT, HfTokenizer, Tokenizer, gpt2_files

# What a Cohere config must say for nanoPALM to run it unchanged: key -> (accepted values, why not otherwise).
COHERE_REQUIRES = {
    "hidden_act": (("silu",), "PaLM's SwiGLU"),
    "use_qk_norm": ((False, None), "no LayerNorm on q and k in model.py"),
    "attention_bias": ((False, None), "no biases in PaLM's attention"),
    "layer_norm_eps": ((1e-5,), "model.LayerNorm's epsilon"),
    "sliding_window": ((None,), "attention over the whole context"),
}


# ---- the architecture ---------------------------------------------------------------------------------------
def rope_order(head_dim: int) -> torch.Tensor:
    """Cohere's row j of a head is our row rope_order[j]: pairs (i, i + D/2) become neighbours (2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def adapter_to_peft(name: str, tensor: torch.Tensor, c: PaLMConfig) -> tuple[str, torch.Tensor]:
    """An adapter tensor (blocks.i.<layer>.adapter.A|B.<matrix>) under peft's name for the exported model. B's rows
    of q and k are reordered within each head as the base's are (rope_order): B A then adds to the same rows."""
    parts = name.split(".")  # blocks, i, layer, [...], adapter, A|B, matrix
    layer, which, matrix = parts[1], parts[-2], parts[-1]
    if which == "B" and matrix in ("q", "k"):
        tensor = tensor.unflatten(0, (-1, c.head_dim))[:, rope_order(c.head_dim)].flatten(0, 1)
    return f"base_model.model.model.layers.{layer}.{PEFT_MODULES[matrix]}.lora_{which}.weight", tensor


def check_exportable(c: PaLMConfig) -> None:
    """UserError naming the first switch CohereForCausalLM has no equivalent for (the GPT-2 ablation variants)."""
    for key, wanted in (("parallel_block", True), ("bias", False), ("mlp", "swiglu"), ("pos_emb", "rope")):
        if getattr(c, key) != wanted:
            raise UserError(f"{key}={getattr(c, key)!r} has no equivalent in transformers' CohereForCausalLM, which "
                            f"export writes ({key}={wanted!r} in PaLM): only PaLM-architecture runs export")


def cohere_config(c: PaLMConfig, eot_id: int, dtype: str) -> dict:
    """The CohereConfig of model `c`, whose end of text is `eot_id` (also its padding: Cohere's default 0 is a
    real token here)."""
    return dict(
        architectures=["CohereForCausalLM"], model_type="cohere", vocab_size=c.vocab_size, hidden_size=c.d_model,
        intermediate_size=c.d_ff, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, hidden_act="silu", max_position_embeddings=c.block_size,
        layer_norm_eps=1e-5, logit_scale=c.d_model ** -0.5 if c.logit_scale else 1.0,
        tie_word_embeddings=c.tie_embeddings, rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        attention_bias=False, attention_dropout=0.0, use_qk_norm=False, bos_token_id=None, eos_token_id=eot_id,
        pad_token_id=eot_id, dtype=dtype)


def palm_config(hf: dict) -> tuple[PaLMConfig, float]:
    """(the PaLMConfig of a Cohere config.json, the factor its logits need beyond the model's own scale: 1.0
    unless logit_scale is neither 1 nor 1/sqrt(hidden_size)). UserError naming the first key nanoPALM
    cannot represent."""
    if hf.get("model_type") != "cohere":
        raise UserError(f"model_type {hf.get('model_type')!r}: nanoPALM imports transformers' 'cohere' models "
                        "(PaLM's architecture: Command-R, Aya and nanoPALM's own exports)")
    for key, (accepted, why) in COHERE_REQUIRES.items():
        if hf.get(key) not in accepted:
            raise UserError(f"{key}={hf.get(key)!r} is not representable in nanoPALM ({why}); it imports only "
                            f"models with {key}={accepted[0]!r}")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"rope_parameters.rope_type={rope.get('rope_type')!r} is not representable in nanoPALM, "
                        "which applies RoPE unscaled; it imports models with rope_type 'default'")
    n_head = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_head
    config = PaLMConfig(vocab_size=hf["vocab_size"], block_size=hf["max_position_embeddings"],
                        n_layer=hf["num_hidden_layers"], n_head=n_head,
                        n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=head_dim,
                        d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], rope_base=float(rope["rope_theta"]),
                        logit_scale=True, z_loss=0.0, tie_embeddings=hf.get("tie_word_embeddings", True))
    scale = hf.get("logit_scale") or 1.0
    if scale == 1.0:
        return PaLMConfig(**{**config.to_dict(), "logit_scale": False}), 1.0
    return config, scale * math.sqrt(config.d_model)  # 1.0 for 1/sqrt(d_model), nanoPALM's own


def to_cohere(name: str, tensor: torch.Tensor, c: PaLMConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The transformers tensors that nanoPALM's tensor `name` becomes."""
    parts = name.split(".")
    if name == "wte.weight":
        yield "model.embed_tokens.weight", tensor
    elif name == "lm_head.weight":
        yield "lm_head.weight", tensor
    elif name == "norm.weight":
        yield "model.norm.weight", tensor
    elif parts[0] == "blocks":
        layer = f"model.layers.{parts[1]}"
        where = ".".join(parts[2:])
        if where == "norm.weight":
            yield f"{layer}.input_layernorm.weight", tensor
        elif where == "attn.out.weight":
            yield f"{layer}.self_attn.o_proj.weight", tensor
        elif where == "mlp.out.weight":
            yield f"{layer}.mlp.down_proj.weight", tensor
        elif where == "in_proj.weight":
            sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim, c.d_ff, c.d_ff]
            q, k, v, gate, up = tensor.split(sizes)
            order = rope_order(c.head_dim)
            rotated = (t.unflatten(0, (-1, c.head_dim))[:, order].flatten(0, 1) for t in (q, k))
            for proj, t in zip(("self_attn.q_proj", "self_attn.k_proj"), rotated, strict=True):
                yield f"{layer}.{proj}.weight", t
            yield f"{layer}.self_attn.v_proj.weight", v
            yield f"{layer}.mlp.gate_proj.weight", gate
            yield f"{layer}.mlp.up_proj.weight", up
        else:
            raise KeyError(name)
    else:
        raise KeyError(name)


def from_cohere(get: Callable[[str], torch.Tensor], c: PaLMConfig, logit_factor: float = 1.0
                ) -> dict[str, torch.Tensor]:
    """nanoPALM's state dict from transformers' tensors (get(name) reads one): the inverse of to_cohere. A
    logit_factor other than 1 is folded into the final LayerNorm's gain, which only the logits read."""
    back = torch.argsort(rope_order(c.head_dim))
    state = {"wte.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if logit_factor != 1.0:
        state["norm.weight"] = state["norm.weight"] * logit_factor
    if not c.tie_embeddings:
        state["lm_head.weight"] = get("lm_head.weight")
    for i in range(c.n_layer):
        layer = f"model.layers.{i}"
        q, k = (get(f"{layer}.self_attn.{p}.weight").unflatten(0, (-1, c.head_dim))[:, back].flatten(0, 1)
                for p in ("q_proj", "k_proj"))
        rest = [get(f"{layer}.{p}.weight") for p in ("self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
        state[f"blocks.{i}.norm.weight"] = get(f"{layer}.input_layernorm.weight")
        state[f"blocks.{i}.in_proj.weight"] = torch.cat([q, k, *rest])
        state[f"blocks.{i}.attn.out.weight"] = get(f"{layer}.self_attn.o_proj.weight")
        state[f"blocks.{i}.mlp.out.weight"] = get(f"{layer}.mlp.down_proj.weight")
    return state


# ---- the tokenizer ------------------------------------------------------------------------------------------
def hf_tokenizer(tokenizer: Tokenizer):
    """nanoPALM's tokenizer as a `tokenizers.Tokenizer` that gives the same ids for every text (tests/test_hf.py
    checks the whole built-in val split and hard strings). The end of text reads <|endoftext|> in both."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    if isinstance(tokenizer, HfTokenizer):
        return tokenizer.backend
    if tokenizer.name == "gpt2":  # GPT-2's own files (hash-checked by tokenizer.py): byte-level BPE
        files = gpt2_files()
        backend = Backend(models.BPE.from_file(str(files / "encoder.json"), str(files / "vocab.bpe")))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
    elif tokenizer.name == "palm":
        backend = _sentencepiece_backend(tokenizer)
    else:
        raise UserError(f"the {tokenizer.name} tokenizer has no Hugging Face equivalent that export writes: "
                        "prepare the data with --tokenizer=palm (or gpt2) to train a model you can export")
    backend.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
    return backend


def _sentencepiece_backend(tokenizer: Tokenizer):
    """A SentencePiece BPE (tokenizer.train_palm_tokenizer's settings: identity normalisation, no dummy
    prefix, byte fallback) as a tokenizers BPE over the raw text. Pieces hold real spaces where SentencePiece
    writes U+2581, so that a U+2581 in a text falls back to its bytes, as PalmTokenizer encodes it."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    proto = sp_model.ModelProto.FromString(tokenizer.model_proto)
    kinds = sp_model.ModelProto.SentencePiece
    vocab, scores = {}, {}
    for i, piece in enumerate(proto.pieces):
        text = piece.piece if piece.type == kinds.BYTE else piece.piece.replace("\u2581", " ")
        if i == tokenizer.eot_id:
            text = EOT_TEXT
        vocab[text] = i
        if piece.type in (kinds.NORMAL, kinds.USER_DEFINED):
            scores[text] = piece.score
    merges = []  # SentencePiece merges the adjacent pair whose union scores highest; ties: the leftmost
    for text in sorted(scores, key=lambda t: (-scores[t], vocab[t])):
        merges += [(text[:i], text[i:]) for i in range(1, len(text)) if text[:i] in scores and text[i:] in scores]
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    backend = Backend(models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return backend


def save_hf_tokenizer(backend, eot_id: int, directory: Path, max_length: int) -> None:
    """tokenizer.json and tokenizer_config.json for AutoTokenizer: `backend`'s ids, its token `eot_id` as end of
    text and padding, and special tokens' strings in a text read as text (split_special_tokens), as here."""
    from transformers import PreTrainedTokenizerFast

    eot = backend.id_to_token(eot_id)
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eot, pad_token=eot, model_max_length=max_length,
                            split_special_tokens=True, clean_up_tokenization_spaces=False).save_pretrained(directory)
