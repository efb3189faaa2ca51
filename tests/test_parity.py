"""Parity with tensors computed by the authors' code (float32, CPU). Tolerance: max abs diff <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from calm_cli import load_autoencoder, load_model

ATOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=["calm", "calm-bin"])
def model(request, fixtures):
    return load_model(fixtures / request.param)


@torch.inference_mode()
def test_encoder_and_decoder(model, reference):
    ae = model.autoencoder
    mean, log_std = ae.encode(reference["ae_input_ids"])
    assert max_diff(torch.cat([mean, log_std], -1), reference["ae_encoder_out"]) <= ATOL
    assert max_diff(ae.decode(mean), reference["ae_decoder_logits"]) <= ATOL


@torch.inference_mode()
def test_backbone_full_pass(model, reference):
    assert max_diff(model.embed_chunks(reference["calm_input_ids"]), reference["calm_inputs_embeds"]) <= ATOL
    assert max_diff(model.backbone_hidden(reference["calm_input_ids"]), reference["calm_hidden"]) <= ATOL


@torch.inference_mode()
def test_backbone_cached_incremental(model, reference):
    ids, k = reference["calm_input_ids"], model.patch_size
    cache = model.new_cache(ids.shape[0], 16)
    cache.valid[:, :5] = True
    outs = [model.step(ids[:, : 5 * k], cache, 0)]
    for t in range(5, 12):
        cache.valid[:, t] = True
        outs.append(model.step(ids[:, t * k : (t + 1) * k], cache, t))
    assert max_diff(torch.cat(outs, 1), reference["cached_hidden"]) <= ATOL


@torch.inference_mode()
def test_head_output_and_tokens(model, reference):
    hidden = reference["calm_hidden"].expand(3, -1, -1, -1)
    out = model.generative_head(hidden, reference["head_noise"])
    assert max_diff(out, reference["head_out"]) <= ATOL
    assert torch.equal(model.autoencoder.decode_tokens(out), reference["head_tokens"])


@torch.inference_mode()
def test_autoencoder_only_file_reties_output_matrix(fixtures, reference):
    ae = load_autoencoder(fixtures / "autoencoder")
    assert ae.decoder.lm_head_weight is ae.encoder.embed_tokens.weight
    mean, _ = ae.encode(reference["ae_input_ids"])
    assert max_diff(ae.decode(mean), reference["ae_decoder_logits"]) <= ATOL


def test_safetensors_and_bin_identical(fixtures):
    a = load_model(fixtures / "calm").state_dict()
    b = load_model(fixtures / "calm-bin").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
