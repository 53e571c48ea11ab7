"""Whole models people export, built small: Hugging Face ``transformers`` BERT, GPT-2, DistilBERT and
T5 encoder from configs (random weights, no downloads; ``transformers``' default SDPA attention,
called with keyword arguments as ``transformers`` models are), and ConvNeXt- and Swin-style blocks
written here. Each is exported once per format and run in real TensorFlow (as shipped, oneDNN and
grappler on) and ONNX Runtime at another batch size than captured, on a padded batch."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers
from export_check import assert_close, feeds_for, run_onnx, run_tf, small_variance, torch_outputs
from torch import nn

from lightning_saver.graph.onnx_export import export_onnx
from lightning_saver.graph.tf_export import export_meta_graph

VOCAB = 50


def _hf(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=32))
    if kind == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, use_cache=False,
            bos_token_id=0, eos_token_id=0))
    if kind == "distilbert":
        return transformers.DistilBertModel(transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32))
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, use_cache=False))


def _tokens(batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, 7), generator=gen)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[-1, 5:] = 0  # a padded sequence
    return {"input_ids": ids, "attention_mask": mask}


def _hidden(model: nn.Module, kwargs: dict[str, torch.Tensor]) -> list[Any]:
    with torch.no_grad():
        return [model(**kwargs).last_hidden_state.numpy()]


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise 7x7, LayerNorm and MLP in NHWC (after a permute), layer scale,
    residual; then the head's global pooling over the permuted tensor (``as_strided`` after lowering)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.act, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dim), nn.Linear(dim, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.dwconv(images).permute(0, 2, 3, 1)
        x = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        return self.head(images + x.permute(0, 3, 1, 2))


class SwinBlock(nn.Module):
    """Swin's shifted-window attention: torch.roll, window partition by view/permute, the shift mask
    written slice by slice in place, attention per window with a relative bias, windows merged back."""

    def __init__(self, dim: int = 8, size: int = 8, window: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.size, self.window, self.heads, self.shift = size, window, heads, window // 2
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = nn.Parameter(torch.randn(heads, window * window, window * window) * 0.1)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        w, s = self.window, self.shift
        img = torch.zeros_like(x[:1, :, :, :1])  # (1, H, W, 1), filled region by region
        count = 0
        for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
                img[:, hs, ws, :] = count
                count += 1
        windows = self._partition(img).squeeze(-1)  # (nW, w*w)
        diff = windows.unsqueeze(1) - windows.unsqueeze(2)
        return diff.masked_fill(diff != 0, -100.0)

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w_, c = x.shape
        w = self.window
        x = x.view(b, h // w, w, w_ // w, w, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, w * w, c)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, length, c = tokens.shape
        x = self.norm1(tokens).view(b, self.size, self.size, c)
        x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        windows = self._partition(x)  # (b*nW, w*w, c)
        n = windows.shape[1]
        q, k, v = self.qkv(windows).view(-1, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5 + self.bias
        mask = self._mask(x)
        scores = scores.view(b, mask.shape[0], self.heads, n, n) + mask[None, :, None]
        y = (F.softmax(scores.view(-1, self.heads, n, n), -1) @ v).transpose(1, 2).reshape(-1, n, c)
        w = self.window
        y = self.proj(y).view(b, self.size // w, self.size // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
        y = torch.roll(y.reshape(b, self.size, self.size, c), (self.shift, self.shift), (1, 2))
        x = tokens + y.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_vision_block_on_unit_and_small_variance(kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = (ConvNeXtBlock() if kind == "convnext" else SwinBlock()).eval()
    shape = (8, 16, 16) if kind == "convnext" else (64, 8)
    meta = export_meta_graph(model, (torch.randn(2, *shape),), tmp_path / "model.meta")
    onnx = export_onnx(model, (torch.randn(2, *shape),), tmp_path / "model.onnx")
    for inputs in ((torch.randn(3, *shape),), small_variance((torch.randn(3, *shape),))):
        expected = torch_outputs(model, inputs)
        feeds = feeds_for(model, inputs)
        assert_close(run_tf(meta, feeds, 1), expected, atol=1e-5, rtol=1e-4, what=f"TensorFlow {kind}")
        assert_close(run_onnx(onnx, feeds), expected, atol=1e-5, rtol=1e-4, what=f"ONNX Runtime {kind}")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "distilbert", "t5"])
def test_transformers_model_with_keyword_inputs(kind: str, tmp_path) -> None:
    model = _hf(kind).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = export_meta_graph(model, (), tmp_path / "model.meta", kwargs=_tokens(2, 0))
        onnx = export_onnx(model, (), tmp_path / "model.onnx", kwargs=_tokens(2, 0))
    run = _tokens(3, 1)
    feeds = {k: v.numpy() for k, v in run.items()}
    expected = _hidden(model, run)
    assert_close(run_tf(meta, feeds, 1), expected, atol=1e-5, rtol=1e-4, what=f"TensorFlow {kind}")
    assert_close(run_onnx(onnx, feeds)[:1], expected, atol=1e-5, rtol=1e-4, what=f"ONNX Runtime {kind}")
