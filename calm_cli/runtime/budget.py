"""What a candidate step costs, stated before it runs: logits = rows x candidates x K x vocabulary.

One model of cost for two uses: a request whose step would score more logits than the
server's budget is refused before it runs, and a step that is admitted decodes its pool in
row slices so that the logits alive at once stay under a fixed number per device. This
module imports no torch, so the command line and the server can price a request before
anything loads.
"""

from __future__ import annotations


def logit_elements(rows: int, candidates: int, patch_size: int, vocab_size: int) -> int:
    """Logits a dense decode of `candidates` chunks for each of `rows` rows would hold at once."""
    return rows * candidates * patch_size * vocab_size
