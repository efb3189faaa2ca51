"""Text -> latents -> text with the bundled autoencoder: special tokens never come back as text."""

from __future__ import annotations

import pytest
import torch

from calm_cli.io.checkpoint import load_autoencoder
from calm_cli.io.registry import resolve_model
from calm_cli.runtime.latents import (
    decode_latents,
    encode_text,
    ids_to_text,
    reconstruction,
)

TEXTS = ["ab", "Hi.", "The quick brown fox jumps over the lazy dog.", "A plain sentence that ends on an odd token count"]


@pytest.fixture(scope="module")
def ae():
    return load_autoencoder(resolve_model("default"))


@pytest.mark.parametrize("text", TEXTS)
def test_text_comes_back_whole(ae, text):
    encoded = encode_text(ae, text)
    assert encoded.ids == ae.tokenizer.encode(text, add_special_tokens=False).ids  # no BOS
    lengths = encoded.chunk_lengths(ae.config.patch_size)
    assert sum(lengths) == len(encoded.ids) and len(lengths) == encoded.mean.shape[0]
    assert ids_to_text(ae, decode_latents(ae, encoded.mean, lengths)) == text


def test_roundtrip_counts_text_tokens_only(ae):
    text = "The quick brown fox jumps over the lazy dog."
    tokens, correct = reconstruction(ae, text)
    assert tokens == len(ae.tokenizer.encode(text, add_special_tokens=False).ids) == 15  # was 16 with BOS, 15 of them right
    assert correct == tokens


def test_pad_slots_are_dropped_whatever_they_decode_to(ae):
    """A padded last chunk's pad slot is cut by the chunk's length, not by what the autoencoder makes of it."""
    encoded = encode_text(ae, "The quick brown fox jumps over the lazy dog.")
    assert len(encoded.padded) > len(encoded.ids)
    ids = decode_latents(ae, encoded.mean, encoded.chunk_lengths(ae.config.patch_size))
    assert len(ids) == len(encoded.ids)
    lengths = [1] * encoded.mean.shape[0]
    assert decode_latents(ae, encoded.mean, lengths) == encoded.ids[:: ae.config.patch_size]


def test_special_tokens_never_reach_the_text(ae, monkeypatch):
    """Whatever the autoencoder makes of a latent, BOS, EOS and PAD give no text."""
    c = ae.config
    chunks = torch.tensor([[c.bos_token_id, 369], [c.pad_token_id, c.eos_token_id]])
    monkeypatch.setattr(ae, "decode_tokens", lambda latents: chunks)
    assert decode_latents(ae, torch.zeros(2, c.latent_size)) == [369]
