"""The small Mixture-of-Experts LMs that fxpress trains itself and ships, to measure MoE passes on.

No trained MoE small enough for CI ships in a package, so `examples/train_moe.py` trains two, of two
architectures on two texts:

- `fxpress/data/tiny_moe/` (`--arch mixtral`): Mixtral, 8 experts per layer, top-2, trained on the
  "train" split of `fxpress.data` (the Python library reference); measured on "calib"/"heldout"/"eval".
- `fxpress/data/tiny_qwen2_moe/` (`--arch qwen2_moe`): Qwen2-MoE, 8 routed experts per layer, top-2, plus
  a sigmoid-gated shared expert, trained on King James prose (`PROSE_TRAIN`: every book but Genesis, Luke
  and Acts, which are the "prose_eval"/"prose_calib"/"prose_heldout" splits, and their close parallels);
  measured on the "prose_*" splits.

Each vocabulary is SmolLM2's, reduced honestly: the most frequent SmolLM2 tokens of the model's own
training text keep an id, every other token maps to `<unk>` (id 0). `RemappedTokenizer` does that
mapping, so `fxpress.data.token_windows` works on it unchanged. Weights are stored in fp16 and loaded
as fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from fxpress.errors import ModelNotFoundError

TINY_MOE_DIR = Path(__file__).resolve().parent / "data" / "tiny_moe"
TINY_QWEN2_MOE_DIR = Path(__file__).resolve().parent / "data" / "tiny_qwen2_moe"
# The Qwen2-MoE's training text: the `bible` program's verse ranges, every book except Genesis (prose_eval),
# Luke (prose_calib) and Acts (prose_heldout), and except what retells them: 1 Chronicles 1 (Genesis'
# genealogies) and Matthew and Mark (the gospels parallel to Luke).
PROSE_TRAIN = ("Exodus1:1-Deuteronomy34:12", "Joshua1:1-2Kings25:30", "1Chronicles2:1-Malachi4:6",
               "John1:1-21:25", "Romans1:1-Revelation22:21")
VOCAB_FILE = "vocab.json"
UNK_ID = 0


class _Encoded(dict):
    """What a Hugging Face tokenizer returns, reduced to the part fxpress reads (`.input_ids`)."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]


class RemappedTokenizer:
    """SmolLM2's tokenizer with ids remapped to a reduced vocabulary (rare tokens -> `<unk>`)."""

    def __init__(self, base, kept_ids: list[int]):
        self.base = base
        self.kept_ids = torch.tensor(kept_ids, dtype=torch.long)  # small id i+1 <- SmolLM2 id kept_ids[i]
        table = torch.full((len(base),), UNK_ID, dtype=torch.long)
        table[self.kept_ids] = torch.arange(1, len(kept_ids) + 1)
        self.to_small = table
        self.unk_token = "<unk>"

    def __len__(self) -> int:
        return len(self.kept_ids) + 1

    @property
    def vocab_size(self) -> int:
        return len(self)

    def remap(self, base_ids: torch.Tensor) -> torch.Tensor:
        """SmolLM2 ids -> reduced ids."""
        return self.to_small[base_ids]

    def __call__(self, text: str | list[str], return_tensors: str | None = None, **kwargs: Any) -> _Encoded:
        kwargs.setdefault("add_special_tokens", False)
        enc = self.base(text, return_tensors="pt" if return_tensors == "pt" else None, **kwargs)
        ids = enc["input_ids"]
        if return_tensors == "pt":
            return _Encoded(input_ids=self.remap(ids))
        if ids and isinstance(ids[0], list):
            return _Encoded(input_ids=[self.remap(torch.tensor(row)).tolist() for row in ids])
        return _Encoded(input_ids=self.remap(torch.tensor(ids)).tolist())

    def encode(self, text: str) -> list[int]:
        return self(text).input_ids

    def decode(self, ids: Any) -> str:
        """Reduced ids -> text; `<unk>` stands for every token outside the reduced vocabulary."""
        ids = torch.as_tensor(ids).flatten().tolist()
        pieces, run = [], []
        for i in ids:
            if i == UNK_ID:
                if run:
                    pieces.append(self.base.decode(run))
                    run = []
                pieces.append(self.unk_token)
            else:
                run.append(int(self.kept_ids[i - 1]))
        if run:
            pieces.append(self.base.decode(run))
        return "".join(pieces)


def smollm2_tokenizer():
    """SmolLM2's tokenizer alone (no model weights loaded)."""
    from transformers import AutoTokenizer

    from fxpress.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))


def prose_train_text() -> str:
    """The Qwen2-MoE's training text (`PROSE_TRAIN`), a verse per line."""
    from fxpress.data import prose_text

    return "\n".join(prose_text(r) for r in PROSE_TRAIN)


def train_stream(tokenizer, split: str = "train") -> torch.Tensor:
    """A training text tokenized as one 1-D LongTensor: a `fxpress.data` split, or "prose_train" (`PROSE_TRAIN`)."""
    from fxpress.data import token_stream

    if split != "prose_train":
        return token_stream(tokenizer, split)
    return tokenizer(prose_train_text(), return_tensors="pt", add_special_tokens=False).input_ids[0].long()


def build_vocab(base_tokenizer, size: int = 8192, split: str = "train") -> list[int]:
    """The `size - 1` most frequent SmolLM2 ids of `split` (ties broken by id, so it is deterministic)."""
    counts = torch.bincount(train_stream(base_tokenizer, split), minlength=len(base_tokenizer))
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))
    return order[: size - 1]


def tiny_qwen2_moe_config(vocab_size: int):
    """Qwen2-MoE, 4 layers, hidden 128, 8 routed experts of width 256 per layer, top-2 (top-k weights not
    renormalised, Qwen2-MoE's default), plus one shared expert of width 256 behind a sigmoid gate."""
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
        max_position_embeddings=512, tie_word_embeddings=True, router_aux_loss_coef=0.01,
        use_sliding_window=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def tiny_moe_config(vocab_size: int):
    """The architecture: Mixtral, 4 layers, hidden 128, 8 experts of width 256 per layer, top-2."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=512, tie_word_embeddings=True, router_aux_loss_coef=0.01,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


def save_tiny_moe(model: torch.nn.Module, kept_ids: list[int], target: Path = TINY_MOE_DIR) -> None:
    """Write weights (fp16 safetensors), config.json and vocab.json atomically into `target`."""
    import copy
    import shutil

    target = Path(target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    half = copy.deepcopy(model).half()
    half.save_pretrained(tmp)
    gen = tmp / "generation_config.json"
    if gen.exists():
        gen.unlink()
    with open(tmp / VOCAB_FILE, "w") as fh:
        json.dump({"base": "SmolLM2-135M-Instruct", "unk_id": UNK_ID, "kept_smollm2_ids": kept_ids}, fh)
    old = target.with_name(target.name + f".old{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def load_tiny_moe(path: str | os.PathLike | None = None):
    """The shipped trained MoE (fp32, eval) and its `RemappedTokenizer`; `path` may hold either architecture."""
    from transformers import AutoModelForCausalLM

    folder = Path(path) if path is not None else TINY_MOE_DIR
    if not (folder / "config.json").is_file() or not (folder / VOCAB_FILE).is_file():
        arch = " --arch qwen2_moe" if folder.name == TINY_QWEN2_MOE_DIR.name else ""
        raise ModelNotFoundError(
            f"the trained tiny MoE is missing from {folder}: run `python examples/train_moe.py{arch}` to train it"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with open(folder / VOCAB_FILE) as fh:
        kept = json.load(fh)["kept_smollm2_ids"]
    return model, RemappedTokenizer(smollm2_tokenizer(), kept)


def load_tiny_qwen2_moe(path: str | os.PathLike | None = None):
    """The shipped trained Qwen2-MoE with a shared expert (fp32, eval) and its `RemappedTokenizer`."""
    return load_tiny_moe(TINY_QWEN2_MOE_DIR if path is None else path)
