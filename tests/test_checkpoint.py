"""One test per checkpoint-loading rule learnt from the authors' files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from calm_cli import load_model, save_model
from calm_cli.errors import CalmError


def copy_model(fixtures: Path, tmp_path: Path, name: str = "calm") -> Path:
    dst = tmp_path / name
    shutil.copytree(fixtures / "calm", dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def rewrite(directory: Path, keep) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if keep(k)}, str(directory / "model.safetensors"))


@torch.inference_mode()
def head_tokens(model, reference) -> torch.Tensor:
    out = model.generative_head(reference["calm_hidden"].expand(3, -1, -1, -1), reference["head_noise"])
    return model.autoencoder.decode_tokens(out)


def test_embedded_autoencoder_used_even_if_ae_path_is_missing(fixtures, tmp_path, reference):
    d = copy_model(fixtures, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["ae_path"] = "/nowhere/autoencoder"
    (d / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(head_tokens(load_model(d), reference), reference["head_tokens"])


def test_ae_path_resolved_against_model_directory(fixtures, tmp_path, reference, monkeypatch):
    d = copy_model(fixtures, tmp_path)
    shutil.copytree(fixtures / "autoencoder", tmp_path / "autoencoder")
    rewrite(d, lambda k: not k.startswith("ae_model."))
    monkeypatch.chdir("/")
    assert torch.equal(head_tokens(load_model(d), reference), reference["head_tokens"])


def test_explicit_ae_overrides_and_missing_ae_is_an_error(fixtures, tmp_path, reference):
    d = copy_model(fixtures, tmp_path)
    rewrite(d, lambda k: not k.startswith("ae_model."))
    with pytest.raises(CalmError, match="autoencoder directory"):
        load_model(d)
    model = load_model(d, ae=str(fixtures / "autoencoder"))
    assert torch.equal(head_tokens(model, reference), reference["head_tokens"])


@pytest.mark.parametrize("drop", ["mlp_generator.", "generative_head."])
def test_either_head_copy_is_enough(fixtures, tmp_path, reference, drop):
    d = copy_model(fixtures, tmp_path)
    rewrite(d, lambda k: not k.startswith(drop))
    assert torch.equal(head_tokens(load_model(d), reference), reference["head_tokens"])


def test_no_model_type_needed(fixtures):
    assert "model_type" not in json.loads((fixtures / "calm" / "config.json").read_text())
    assert load_model(fixtures / "calm").config.patch_size == 4


class NotATensor:
    pass


def test_bin_needing_code_is_refused(fixtures, tmp_path):
    d = copy_model(fixtures, tmp_path)
    (d / "model.safetensors").unlink()
    torch.save({"x": NotATensor()}, d / "pytorch_model.bin")
    with pytest.raises(CalmError, match="refused"):
        load_model(d)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_checkpoints(fixtures, tmp_path, reference, fmt):
    d = copy_model(fixtures, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(tensors)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"{prefix}-{i + 1:05d}-of-00002.{ext}"
        shard = {k: tensors[k] for k in part}
        save_file(shard, str(d / name)) if fmt == "safetensors" else torch.save(shard, d / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (d / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = load_model(d)
    assert model.source_format == f"{fmt}-sharded"
    assert torch.equal(head_tokens(model, reference), reference["head_tokens"])


def test_convert_roundtrip_is_identical(fixtures, tmp_path, reference):
    original = load_model(fixtures / "calm-bin")
    out = save_model(original, tmp_path / "ours")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    again = load_model(out)
    a, b = original.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.inference_mode():
        assert torch.equal(again.backbone_hidden(reference["calm_input_ids"]), original.backbone_hidden(reference["calm_input_ids"]))
    assert torch.equal(head_tokens(again, reference), reference["head_tokens"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bf16_conversion_loads(fixtures, tmp_path):
    out = save_model(load_model(fixtures / "calm"), tmp_path / "bf16", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_model(out, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32


def test_missing_config_field(fixtures, tmp_path):
    d = copy_model(fixtures, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CalmError, match="hidden_size"):
        load_model(d)


def test_shape_mismatch_names_the_tensor(fixtures, tmp_path):
    d = copy_model(fixtures, tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["transformer.norm.weight"] = torch.ones(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CalmError, match="transformer.norm.weight"):
        load_model(d)


def test_tokenizer_larger_than_vocab(fixtures, tmp_path):
    d = copy_model(fixtures, tmp_path)
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 700, "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CalmError, match="tokenizer has"):
        load_model(d)


def test_corrupt_safetensors(fixtures, tmp_path):
    d = copy_model(fixtures, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CalmError, match="safetensors"):
        load_model(d)


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_size", "64", "whole number"),
        ("num_hidden_layers", 10**12, "whole number"),
        ("rms_norm_eps", float("nan"), "finite number"),
        ("pad_token_id", 512, "outside the vocabulary"),
        ("architectures", "EnergyTransformer", "list of names"),
        ("ae_path", 3, "string"),
    ],
)
def test_bad_config_fields_are_named(fixtures, tmp_path, field, value, needle):
    d = copy_model(fixtures, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CalmError, match=needle):
        load_model(d)


def test_config_that_does_not_match_the_weights_is_refused_before_allocating(fixtures, tmp_path):
    """hidden_size 2^20 would need terabytes: the meta-device check names the first misshapen tensor instead."""
    d = copy_model(fixtures, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(hidden_size=2**20, intermediate_size=2**20)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CalmError, match="has shape"):
        load_model(d)
