"""Write a synthetic Llama-shaped checkpoint family for merge benchmarks: a base model and N fine-tuned models
(base + small Gaussian noise), sharded safetensors with an index json, a Llama config.json and a tiny tokenizer.

    python benchmarks/make_synthetic_llama.py /tmp/synth --size 1b --models 3

Sizes: "1b" has TinyLlama-1.1B's shapes (vocab 32000, hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, untied lm_head: 1.10B parameters, 2.2 GB per model in bf16), "small" (~60M) and "tiny" (~1M) keep the
same structure. Tensors are generated one at a time and streamed to disk (pykernels.io.ShardedWriter), so
memory stays at a few tensors whatever the size. Base values ~ N(0, 0.02^2) (norm weights ~ 1), fine-tuned =
base + N(0, noise^2), with a separate generator per (model, tensor) so the output does not depend on order.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SIZES = {
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def hf_config(c: dict, dtype: str) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "use_cache": True, **c}


def tiny_tokenizer(vocab_size: int) -> dict:
    """A word-level tokenizer.json (valid for the tokenizers library) so tools that copy tokenizers find one."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"tok{i}": i for i in range(3, min(vocab_size, 259))})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def make(root: Path, size: str = "1b", models: int = 3, dtype: str = "bfloat16", noise: float = 0.002,
         shard_size: str = "2GB", seed: int = 0, log=print) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pykernels.io import ShardedWriter, parse_size, plan_shards

    c = SIZES[size]
    torch_dtype = getattr(torch, dtype)
    shapes = llama_shapes(c)
    plan = plan_shards([(n, torch_dtype, s) for n, s in shapes.items()], parse_size(shard_size))
    names = ["base"] + [f"ft{m}" for m in range(models)]
    dirs = {name: root / name for name in names}
    writers = {}
    for name, d in dirs.items():
        d.mkdir(parents=True, exist_ok=False)
        writers[name] = ShardedWriter(d, plan, create=True)
        (d / "config.json").write_text(json.dumps(hf_config(c, dtype), indent=2))
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
        (d / "tokenizer.json").write_text(json.dumps(tiny_tokenizer(c["vocab_size"])))
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                             "unk_token": "<unk>", "bos_token": "<s>",
                                                             "eos_token": "</s>"}))
    t0 = time.perf_counter()
    params = 0
    for k, (tname, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        if len(shape) == 1:
            base = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            base = 0.02 * torch.randn(shape, generator=g)
        writers["base"].write(tname, base.to(torch_dtype))
        for m in range(models):
            gm = torch.Generator().manual_seed((seed * 1_000_003 + k) * 131 + m + 1)
            ft = base + noise * torch.randn(shape, generator=gm)
            writers[f"ft{m}"].write(tname, ft.to(torch_dtype))
            del ft
        params += base.numel()
        del base
    for w in writers.values():
        w.write_index()
        w.close()
    log(f"wrote {len(names)} checkpoints of {params / 1e9:.3f}B parameters ({dtype}, {len(plan.files)} shards each) "
        f"to {root} in {time.perf_counter() - t0:.1f} s")
    return dirs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", default="1b", choices=tuple(SIZES))
    p.add_argument("--models", type=int, default=3, help="fine-tuned models besides the base (default 3)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--noise", type=float, default=0.002, help="std of the fine-tuning noise (default 0.002)")
    p.add_argument("--shard-size", default="2GB")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make(a.out, a.size, a.models, a.dtype, a.noise, a.shard_size, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
