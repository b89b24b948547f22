"""Shared fixtures: tiny random BERT-family classifiers built from a config in code (no hub)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: Head of a script run in a subprocess that must not see prune_attattr (stock transformers only): any
#: import of the package fails there, and the script stops if it could still be imported.
BLOCK_PRUNE_ATTATTR = r"""
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prune_attattr" or name.startswith("prune_attattr."):
            raise ImportError("prune_attattr is blocked in this test")
sys.meta_path.insert(0, _Block())
try:
    import prune_attattr  # noqa: F401
    raise SystemExit("prune_attattr could be imported")
except ImportError:
    pass
"""

_STOCK_LOADER = BLOCK_PRUNE_ATTATTR + r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification
out = {}
for folder in sys.argv[1:]:
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(folder + "/batch.pt")
    with torch.no_grad():
        out[folder] = {"logits": model(**batch).logits.tolist(), "parameters": sum(p.numel() for p in model.parameters())}
print(json.dumps(out))
"""


def load_with_stock_transformers(folders: list[str], tmp_path) -> dict:
    """Load each saved folder with stock transformers alone (``trust_remote_code``; prune_attattr blocked, no
    PYTHONPATH) in a fresh interpreter and run it on the ``batch.pt`` saved beside it:
    ``{folder: {"logits": [[...]], "parameters": int}}``."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    proc = subprocess.run([sys.executable, "-I", "-c", _STOCK_LOADER, *folders], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])

FAMILY_KINDS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "modernbert", "deberta-v2")
NO_SEGMENTS = ("roberta", "xlm-roberta", "camembert", "distilbert", "modernbert", "deberta-v2")


def tiny_config(kind: str = "bert", *, layers: int = 3, heads: int = 4, hidden: int = 32, labels: int = 3, init: float = 0.3):
    """A tiny config of model type ``kind`` (vocabulary 120, 64 positions)."""
    from transformers import AutoConfig

    common = dict(
        vocab_size=120,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden + 3,
        max_position_embeddings=64,
        num_labels=labels,
        initializer_range=init,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    if kind in ("roberta", "xlm-roberta", "camembert"):
        return AutoConfig.for_model(kind, **common, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if kind == "electra":
        return AutoConfig.for_model(kind, **common, embedding_size=hidden // 2)
    if kind == "distilbert":
        return AutoConfig.for_model(
            kind, vocab_size=120, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden + 3,
            max_position_embeddings=64, num_labels=labels, initializer_range=init, dropout=0.1, attention_dropout=0.1,
            pad_token_id=0,
        )
    if kind == "modernbert":
        # local_attention 8 < sequence length 11, so sliding-window layers really differ from global ones
        return AutoConfig.for_model(
            kind, vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=labels, initializer_range=init,
            local_attention=8, global_attn_every_n_layers=2, attention_bias=True, pad_token_id=0,
            bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
        )
    if kind == "deberta-v2":
        # DeBERTa-v3's layout (shared position keys, log buckets, LayerNorm'd relative embeddings, no
        # absolute positions, no segments); 4 buckets < sequence length 11 so log bucketing is exercised
        return AutoConfig.for_model(
            kind, **common, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=4,
            max_relative_positions=64, share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
            type_vocab_size=0, pooler_hidden_size=hidden, pooler_hidden_act="gelu", pad_token_id=0,
        )
    if kind == "deberta-v2-separate":
        # DeBERTa-v2's older layout: own position projections (pos_key_proj/pos_query_proj), segments
        return AutoConfig.for_model(
            "deberta-v2", **common, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=-1,
            max_relative_positions=16, share_att_key=False, position_biased_input=True, type_vocab_size=2,
            pooler_hidden_size=hidden, pooler_hidden_act="gelu", pad_token_id=0,
        )
    return AutoConfig.for_model(kind, **common)


def tiny_model(kind: str = "bert", *, layers: int = 3, heads: int = 4, hidden: int = 32, labels: int = 3, seed: int = 0, init: float = 0.3):
    """A random classifier with large-ish weights so attention and attributions are far from uniform."""
    from transformers import AutoModelForSequenceClassification

    from prune_attattr.attention import register_attention

    torch.manual_seed(seed)
    config = tiny_config(kind, layers=layers, heads=heads, hidden=hidden, labels=labels, init=init)
    config._attn_implementation = register_attention()
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=register_attention())
    if kind == "modernbert":  # its init ignores initializer_range for some weights; make attention peaky
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, init)
    return model.eval()


def tiny_batch(seed: int = 1, batch: int = 4, seq: int = 11, labels: int = 3, kind: str = "bert"):
    """``input_ids``/``attention_mask``/``token_type_ids``/``labels`` with padding in some rows.

    ``kind="roberta"``: padding uses RoBERTa's pad id 1 and there are no segment ids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for b in range(1, batch):
        n = max(3, seq - 2 * b)
        mask[b, n:] = 0
        ids[b, n:] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 2 :] = 1
    types = types * mask
    out = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": torch.randint(0, labels, (batch,), generator=g),
    }
    if kind in ("roberta", "xlm-roberta", "camembert"):
        ids[mask == 0] = 1
    if kind in NO_SEGMENTS:
        out.pop("token_type_ids")
    return out


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def batch():
    return tiny_batch()


WORDS = (
    "the a an and or but not no very too so is was are be it this that film movie story acting plot "
    "good great fine best fun funny moving bad worst dull boring awful poor slow long short one two "
    "of in on to for with as by at from man woman he she they we you i its his her their some all"
).split()


def tiny_tokenizer(kind: str = "bert"):
    """A word-level fast tokenizer for the tiny models (ids < 120) whose pad id matches the model's.

    RoBERTa-style families pad with id 1 (``<s> <pad> </s> <unk> <mask>``), the others with id 0
    (``[PAD] [UNK] [CLS] [SEP] [MASK]``); ``model_input_names`` are the family's inputs.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind in ("roberta", "xlm-roberta", "camembert"):
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        cls, pad, sep, unk, mask = specials
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        pad, unk, cls, sep, mask = specials
    vocab = {t: i for i, t in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])]
    )
    names = ["input_ids", "attention_mask"] if kind in NO_SEGMENTS else ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, cls_token=cls, sep_token=sep, mask_token=mask, model_input_names=names
    )


def save_tiny_classifier(kind: str, folder, *, labels: int = 2, id2label: dict | None = None, seed: int = 0):
    """Save a tiny random classifier of family ``kind`` and its tokenizer with ``save_pretrained``."""
    model = tiny_model(kind, labels=labels, seed=seed)
    if id2label is not None:
        model.config.id2label = dict(id2label)
        model.config.label2id = {v: k for k, v in id2label.items()}
    model.config._attn_implementation = "sdpa"  # as a user's checkpoint would be
    model.save_pretrained(folder)
    tiny_tokenizer(kind).save_pretrained(folder)
    return folder
