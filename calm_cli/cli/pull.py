"""`calm pull`: a model from the Hugging Face hub into the standard hub cache."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from ..errors import UsageError
from .common import err
from .typer_setup import with_examples


@with_examples(
    "calm pull cccczshao/CALM-M        # the authors' CALM-M (371M parameters)",
    "calm pull cccczshao/CALM-L@main   # a branch, tag or commit after @",
    'calm generate -m cccczshao/CALM-M "The history of"   # runs offline',
    "HF_HUB_CACHE=/data/hf calm pull cccczshao/CALM-XL   # another cache",
)
def pull(
    model: str = typer.Argument(..., metavar="ORG/NAME[@REVISION]", help="The model's Hugging Face id, with an optional branch, tag or commit."),
    ae: Optional[str] = typer.Option(
        None, "--ae", metavar="ORG/NAME|DIR",
        help="The autoencoder, when the weights hold none and config.json's ae_path is a path on another machine "
        "(pass the same --ae when you run the model).",
    ),
) -> None:
    """Download a model from the Hugging Face hub, with a progress bar.

    Fetches only what calm reads: config.json, the tokenizer files and one weights format
    (safetensors, else .bin, shards included), plus the autoencoder when the weights do not
    hold it. Files go to the standard hub cache ($HF_HUB_CACHE, else $HF_HOME/hub); files
    already there are not fetched again, so running pull again finishes an interrupted one.
    Prints the snapshot folder on stdout.
    """
    from ..io.hub import parse_hub_id
    from ..io.hub import pull as pull_model
    from ..io.registry import describe_entry

    hub = parse_hub_id(model)
    if hub is None:
        raise UsageError(f"{model}: not a Hugging Face id (org/name or org/name@revision)")
    snapshot = pull_model(hub, ae)
    entry = describe_entry(str(hub), snapshot)
    sys.stdout.write(f"{snapshot}\n")
    err.print(f"{hub}: {entry.kind}, K={entry.k or '?'}, {entry.size_mb:.1f} MB; run it with -m {hub}")
