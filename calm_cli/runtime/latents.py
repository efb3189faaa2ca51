"""Text to autoencoder latents and back, keeping the text: what `calm encode` and `calm decode` run.

Only text tokens reach the autoencoder: the tokenizer's BOS is left out (the autoencoder
reconstructs it as some visible token), and the PAD that fills an odd last chunk is
remembered as a count of text tokens, so decoding drops whatever the pad slots come back as.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..errors import CalmError, UsageError
from ..models.autoencoder import Autoencoder


@dataclass
class Encoded:
    """One text's latents: `ids` are its text tokens, `padded` those plus PAD up to a whole chunk."""

    ids: list[int]
    padded: list[int]
    mean: Tensor  # [chunks, latent]
    log_std: Tensor  # [chunks, latent]

    def chunk_lengths(self, patch_size: int) -> list[int]:
        """Text tokens in each chunk: K, except a padded last chunk."""
        return [min(patch_size, len(self.ids) - start) for start in range(0, len(self.padded), patch_size)]


def tokenizer_of(ae: Autoencoder) -> Tokenizer:
    tokenizer = getattr(ae, "tokenizer", None)
    if tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    return tokenizer


def text_ids(ae: Autoencoder, text: str) -> list[int]:
    """The text's tokens without BOS or any other special token."""
    return tokenizer_of(ae).encode(text, add_special_tokens=False).ids


def encode_text(ae: Autoencoder, text: str) -> Encoded:
    """Text -> one latent (posterior mean and log std) per K text tokens."""
    ids = text_ids(ae, text)
    if not ids:
        raise UsageError("no text to encode")
    k = ae.config.patch_size
    if ae.config.pad_token_id is None and len(ids) % k:
        raise CalmError("the autoencoder config has no pad_token_id to fill the last chunk")
    padded = ids + [ae.config.pad_token_id] * (-len(ids) % k)
    with torch.inference_mode():
        mean, log_std = ae.encode(torch.tensor([padded], dtype=torch.long, device=next(ae.parameters()).device))
    return Encoded(ids, padded, mean[0].cpu(), log_std[0].cpu())


def decode_latents(ae: Autoencoder, latents: Tensor, chunk_lengths: list[int] | None = None) -> list[int]:
    """Latents [chunks, latent] -> the text tokens they decode to; `chunk_lengths` drops pad slots per chunk."""
    if latents.ndim != 2 or latents.shape[-1] != ae.config.latent_size:
        raise CalmError(f"latents have shape {list(latents.shape)}; the autoencoder needs [chunks, {ae.config.latent_size}]")
    if chunk_lengths is not None and len(chunk_lengths) != latents.shape[0]:
        raise CalmError(f"{len(chunk_lengths)} chunk lengths for {latents.shape[0]} latents")
    parameter = next(ae.parameters())
    with torch.inference_mode():
        chunks = ae.decode_tokens(latents.to(device=parameter.device, dtype=parameter.dtype)).cpu().tolist()
    if chunk_lengths is not None:
        chunks = [chunk[: max(0, n)] for chunk, n in zip(chunks, chunk_lengths)]
    special = _special_ids(ae)
    return [token for chunk in chunks for token in chunk if token not in special]


def ids_to_text(ae: Autoencoder, ids: list[int]) -> str:
    return tokenizer_of(ae).decode(ids, skip_special_tokens=True)


def reconstructed(ae: Autoencoder, encoded: Encoded) -> Tensor:
    """Per text token, whether the posterior mean decodes back to it in place (bool [tokens])."""
    parameter = next(ae.parameters())
    with torch.inference_mode():
        recon = ae.decode_tokens(encoded.mean.to(parameter.device)).reshape(-1).cpu()
    n = len(encoded.ids)
    return recon[:n] == torch.tensor(encoded.ids, dtype=recon.dtype)


def reconstruction(ae: Autoencoder, text: str) -> tuple[int, int]:
    """(text tokens, how many of them the posterior mean reconstructs in place)."""
    ok = reconstructed(ae, encode_text(ae, text))
    return ok.numel(), int(ok.sum())


def first_lost_span(ae: Autoencoder, text: str, ok: Tensor) -> str | None:
    """The source text under the first run of tokens the mean does not reconstruct; None when none is lost.

    Cut from `text` by the tokenizer's offsets, not decoded: a byte-level token alone is often
    part of a character and would print as U+FFFD.
    """
    lost = (~ok).nonzero().flatten().tolist()
    if not lost:
        return None
    end = lost[0]
    while end + 1 < ok.numel() and not ok[end + 1]:
        end += 1
    offsets = tokenizer_of(ae).encode(text, add_special_tokens=False).offsets
    return text[offsets[lost[0]][0] : offsets[end][1]]


def _special_ids(ae: Autoencoder) -> set[int]:
    """BOS, EOS and PAD by the config's explicit ids, and every token the tokenizer marks special."""
    config = ae.config
    ids = {i for i in (config.bos_token_id, config.eos_token_id, config.pad_token_id) if i is not None}
    tokenizer = getattr(ae, "tokenizer", None)
    if tokenizer is not None:
        ids |= {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    return ids
