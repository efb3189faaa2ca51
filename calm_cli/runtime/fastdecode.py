"""Exact fast candidate decoding: bf16 scores with a certificate, float32 only where needed.

Decoding a candidate latent ends with ``argmax_v h . w_v`` over the whole vocabulary for each
of its K final decoder states h (``W`` is the tied output matrix, rows w_v, [V, H]).  At T < 1
the samplers decode hundreds of candidates per step, so this product dominates the step.  Here
it is computed in bf16 (half the bytes of W, on the CPU's AMX / AVX512-BF16 units or the GPU's
tensor cores) together with a bound on how far each bf16 score can be from the float32 score
the dense path computes.  A row whose bf16 winner beats its bf16 runner-up by more than the
bounds allow has that winner as its float32 argmax; for the other rows the few columns the
bounds cannot rule out are scored in float32, and a row that still cannot be settled is
decoded as a dense float32 row.

The bound
---------
u = 2^-8 is bf16's unit roundoff (8 significant bits, round to nearest).  Float32 accumulation
is charged e = 2^-22 per term (2^-24 suffices for round-to-nearest adds; 4x covers a separate
product rounding, truncating adders and tensor cores' multi-operand adders), g = H e / (1 - H e).
Let h^ = bf16(h), dh = h^ - h, w^_v = bf16(w_v), dw_v = w^_v - w_v.  Both differences are exact
in float32 (Sterbenz), so their norms are known, not just bounded by u |h|: typically they are
0.4 u |h|, which makes this bound about 2.5 times tighter than the worst case 2u |h| |w|.

1. Input rounding, an identity: h^ . w^_v - h . w_v = dh . w_v + h^ . dw_v, at most
   |dh| |w_v| + |h^| |dw_v| (Cauchy-Schwarz).
2. Products of two bf16 numbers are exact in float32 (8 + 8 <= 24 bits).
3. The backend accumulates them in float32 in some order: the sum s~_v is within
   g |h^| |w^_v| <= g |h^| |w_v| (1 + u) of h^ . w^_v.  That is the backend's property: torch's
   CPU bf16 matmul (oneDNN) accumulates in float32, and so does cuBLAS once reduced-precision
   reduction is switched off (done here).  ``_accumulates_in_float32`` checks it once per device
   type on a probe that bf16 accumulation fails, and the decoder stays dense if it does not hold.
4. The dense float32 score f_v of any summation order is within g32 |h| |w_v| of h . w_v,
   g32 = 2H 2^-24 / (1 - 2H 2^-24) (product and sum each rounded).  That holds only for IEEE
   float32 products: TF32 (CUDA) or bf16 (oneDNN on CPUs with bf16 units) round the inputs far
   more coarsely.  Every float32 matmul here (the reference scores, the dense rows) therefore
   runs under ``ieee_float32``, whatever ``torch.set_float32_matmul_precision`` or the
   ``fp32_precision`` settings say, so the reference is the true float32 argmax.

So |s~_v - f_v| <= E_v = |dh| |w_v| + |h^| |dw_v| + g (1 + u) |h^| |w_v| + g32 |h| |w_v| + tau,
where tau = 2^-120 (H + sqrt(H) (|h| + max |w_v|)) absorbs underflow (subnormals rounded or
flushed to zero in inputs, products, sums and outputs), which relative terms do not cover.

5. The bf16 output b_v rounds s~_v to nearest, keeping its sign: s~_v >= b_v / (1 + u) when
   b_v >= 0, and s~_v <= max(b_v, 0) / (1 - u) for every v.

Let v1 be the bf16 winner (b1 = b_v1 >= 0) and b2 the largest other bf16 score.  Then
f_v1 >= b1 / (1 + u) - E_v1 and f_v <= max(b2, 0) / (1 - u) + max_v E_v for every v != v1, so

    b1 / (1 + u) - max(b2, 0) / (1 - u) > E_v1 + max_v E_v

proves f_v1 > f_v for all v != v1: a strict inequality, so the dense argmax, tie-breaking
included, is v1.  In the worst case (|dh| = u |h|, |dw_v| = u |w_v|, |b| = |h| |w|) each score
is off by at most c 2^-8 |h| max |w_v| with c = 2 (inputs) + 1 (output) + (g (1 + u) + g32) / u
+ O(u), about 3.06 for H = 512; the measured |dh| and |dw_v| and the actual b1, b2 make the test
several times sharper than that in practice.  Norms, bounds and the gap are computed in float64 and the right-hand side is
enlarged by 1e-6 relative, far more than their own rounding.

Rows the certificate leaves open
--------------------------------
The same bounds say which columns can still be the dense argmax: those with
max(b_v, 0) / (1 - u) + max_v E_v >= b1 / (1 + u) - E_v1, usually two or three.  Each tile of
the vocabulary holding one of them contributes its bf16 winner (which is then that candidate).
For every row the winners of its ``CANDIDATE_TILES`` best tiles are scored in float32 (a fixed
number of dot products per row, so no row has to be picked out on the host); non-candidates
among them are masked out.  Our float32 scores and the dense path's are each within
g32 |h| |w_v| + tau of the exact ones, so a best candidate ahead of every other by more than
twice that is the dense argmax.  Rows this cannot settle are decoded as a dense float32 row:
more candidate tiles than that, a tile holding two candidates (its bf16 runner-up passes the
test too: "crowded"), float32 near-ties, exact duplicates, rows with no positive score.

What "identical to dense" means: the dense path is only defined up to float32 rounding
(oneDNN/MKL sum in a different order for a different number of rows, so the same latent can
get different float32 scores in a pool of 8 and in one of 200).  Every row settled by the
bounds equals every float32 evaluation; a row decoded densely equals a float32 evaluation of
that row, and can differ from the pool's only where two scores are within float32 rounding.

Memory and host synchronisation
-------------------------------
Rows are screened in slices of at most the device's logit budget over one tile
(calm_cli/runtime/budget.py), and dense rows are decoded in slices of the budget over the
whole vocabulary, so no call holds more logits than that whatever its size.  Everything up
to the dense rows stays on the device: counters are device tensors (``FastDecodeStats``), the
candidate rescoring has a fixed shape, and the only host synchronisation of a call is the
one that asks which rows still need a dense row (their number decides the shape of that
matmul).  Building a ``PreparedWeight`` and the accumulation probe also read values back, once
per output matrix and once per device type.

The scan
--------
The bf16 scores are read as int16 keys: for non-negative floats the bit patterns sort like the
values, so one integer max (with index) and one integer amax after masking the winner give the
top two, several times faster than a float argmax.  A row whose best key is negative (every
score negative) is decoded densely; a negative runner-up key is replaced by 0, an upper bound
for it.
The vocabulary is scanned in tiles so each tile's scores are still in cache when reduced.

When more than ``FALLBACK_FRACTION`` of a call's rows needed a dense row, the bf16 pass did
not pay for itself, so the next ``RETRY_AFTER`` calls go straight to dense float32 before
trying again.  Calls smaller than ``MIN_WORK`` multiply-adds are decoded densely too (the
scan's fixed costs would dominate; measured crossover on one CPU core).  Models held in bf16
or fp16 decode densely in their own dtype: there is nothing cheaper to certify against.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.autoencoder import Autoencoder
from .budget import row_slices

BF16_UNIT = 2.0**-8
ACCUMULATION_UNIT = 2.0**-22
FLOAT32_UNIT = 2.0**-24
SAFETY = 1.0 + 1e-6
MIN_KEY = -(2**15)
TILE = {"cuda": 8192}  # vocabulary columns per tile; other devices use DEFAULT_TILE (cache-sized)
# On CUDA the screen's launches per call are set by the budget once a call fills its slices (rows per slice grow
# as the tile shrinks, budget.py), and a smaller tile makes crowded tiles, each costing a dense float32 row, rarer.
DEFAULT_TILE = 2048
FALLBACK_FRACTION = 0.4
RETRY_AFTER = 32
CANDIDATE_TILES = 4  # tile winners rescored in float32 per row: candidates are usually two or three
MIN_WORK = 2**27  # multiply-adds (rows x V x H) below which dense is faster on a CPU core: fixed costs win


def accumulation_error(hidden_size: int) -> float:
    """g = H e / (1 - H e): the relative error of the bf16 path's float32 accumulation (step 3)."""
    n = hidden_size * ACCUMULATION_UNIT
    return n / (1.0 - n)


def float32_error(hidden_size: int) -> float:
    """g32: the relative error of a float32 dot product of length H, product and sum rounded per term (step 4)."""
    n = 2 * hidden_size * FLOAT32_UNIT
    return n / (1.0 - n)


@contextlib.contextmanager
def _float32_accumulation(device: torch.device) -> Iterator[None]:
    """cuBLAS may reduce bf16 products in bf16 unless told not to; CPU kernels always use float32."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        matmul.allow_bf16_reduced_precision_reduction = previous


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """Float32 matmuls on `device` in full IEEE precision for the block, whatever the user set.

    The backend's own ``fp32_precision`` overrides both the global one and
    ``torch.set_float32_matmul_precision``; reading and writing it never raises, unlike the
    legacy ``allow_tf32`` once the new API has been used.
    """
    backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
    previous = backend.fp32_precision
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = previous


_PROBED: dict[str, bool] = {}


def _accumulates_in_float32(device: torch.device) -> bool:
    """Check step 3's assumption once per device type, on inputs where bf16 accumulation breaks.

    Row 0 is 1 followed by 511 copies of 2^-8 (a bf16 running sum sticks at 1); the other rows are
    random.  Every output must be within one bf16 rounding plus step 3's allowance of the exact
    product of the same bf16 inputs.
    """
    if device.type not in _PROBED:
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(8, 512, generator=gen)
        h[0] = 2.0**-8
        h[0, 0] = 1.0
        w = torch.rand(64, 512, generator=gen) + 0.5  # positive, so row 0's sum cannot cancel
        hb, wb = h.bfloat16(), w.bfloat16()
        with _float32_accumulation(device):
            out = F.linear(hb.to(device), wb.to(device)).double().cpu()
        exact = hb.double() @ wb.double().T
        mass = hb.double().abs() @ wb.double().abs().T
        allowed = BF16_UNIT * exact.abs() * (1 + BF16_UNIT) + accumulation_error(512) * mass * (1 + BF16_UNIT) ** 2
        _PROBED[device.type] = bool(((out - exact).abs() <= allowed).all())
    return _PROBED[device.type]


@dataclass
class TileScan:
    """Per vocabulary tile and row: the best int16 key, its column, and the best key of the rest."""

    first: Tensor  # int16 [tiles, M]
    where: Tensor  # long [tiles, M], a column of W
    second: Tensor  # int16 [tiles, M]


def scan_tiles(hidden: Tensor, weight: Tensor, tile: int) -> TileScan:
    """bf16 scores of ``hidden`` [M, H] against ``weight`` [V, H] (both bf16), reduced tile by tile.

    Keys are the bf16 bit patterns read as int16; they order like the scores where those are
    non-negative (see the module docstring).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    tiles = -(-vocab // tile)
    first = torch.empty(tiles, rows, dtype=torch.int16, device=hidden.device)
    where = torch.empty(tiles, rows, dtype=torch.long, device=hidden.device)
    second = torch.empty(tiles, rows, dtype=torch.int16, device=hidden.device)
    for t in range(tiles):
        keys = F.linear(hidden, weight[t * tile : (t + 1) * tile]).view(torch.int16)
        torch.max(keys, -1, out=(first[t], where[t]))
        keys.scatter_(1, where[t].unsqueeze(1), MIN_KEY)
        torch.amax(keys, -1, out=second[t])
    where += torch.arange(0, tiles * tile, tile, device=hidden.device).unsqueeze(1)
    return TileScan(first, where, second)


def _values(keys: Tensor) -> Tensor:
    """int16 keys back to their bf16 values, in float64."""
    return keys.view(torch.bfloat16).double()


@dataclass
class PreparedWeight:
    """What the certificate needs from the output matrix, computed once per version of it."""

    bf16: Tensor  # bf16(W), [V, H]
    norms: Tensor  # |w_v|, float64 [V]
    rounding: Tensor  # |bf16(w_v) - w_v|, float64 [V]
    max_norm: float
    max_rounding: float

    @classmethod
    def of(cls, weight: Tensor) -> PreparedWeight:
        w = weight.detach()
        bf16 = w.bfloat16()
        norms = w.double().norm(dim=-1)
        rounding = (bf16.float() - w).double().norm(dim=-1)
        return cls(bf16, norms, rounding, float(norms.max()), float(rounding.max()))


@dataclass
class Decision:
    """Per row of a call: the argmax where known, and how it was settled."""

    column: Tensor  # long [M]; valid where not ``dense``
    rescored: Tensor  # bool [M]: settled by float32 scores of its few candidates (else by bf16 alone)
    dense: Tensor  # bool [M]: needs a dense float32 row


@dataclass
class RowNorms:
    """Float64 norms of each row: |h|, |bf16(h)| and |bf16(h) - h| (exact in float32, Sterbenz)."""

    h: Tensor
    rounded: Tensor
    error: Tensor

    @classmethod
    def of(cls, hidden: Tensor, rounded: Tensor) -> RowNorms:
        return cls(hidden.double().norm(dim=-1), rounded.double().norm(dim=-1), (rounded.float() - hidden).double().norm(dim=-1))


def score_error(norms: RowNorms, prepared: PreparedWeight, size: int, column: Tensor | None) -> Tensor:
    """E_v of the module docstring: how far the float32 accumulator of the bf16 path can be from the dense score.

    For each row's ``column`` [M], or the bound over all columns when ``column`` is None.
    """
    u, g, g32 = BF16_UNIT, accumulation_error(size), float32_error(size)
    per_norm = norms.error + g * (1 + u) * norms.rounded + g32 * norms.h
    w_norm = prepared.max_norm if column is None else prepared.norms[column]
    w_rounding = prepared.max_rounding if column is None else prepared.rounding[column]
    return per_norm * w_norm + norms.rounded * w_rounding + _underflow(norms, prepared, size)


def _underflow(norms: RowNorms, prepared: PreparedWeight, size: int) -> Tensor:
    """tau: covers subnormals rounded or flushed to zero anywhere in one evaluation (module docstring)."""
    return 2.0**-120 * (size + math.sqrt(size) * (norms.h + prepared.max_norm))


def decide(hidden: Tensor, weight: Tensor, prepared: PreparedWeight) -> Decision:
    """Settle the argmax of every row of float32 ``hidden`` [M, H] that the bounds allow, without leaving the device.

    A row's candidates are the columns whose float32 score could still be the largest (upper
    bound >= the winner's lower bound, module docstring).  One candidate: proven.  Several, in
    at most ``CANDIDATE_TILES`` uncrowded tiles: their float32 scores decide, if the best beats
    every other by more than the float32 error of both evaluations.  Every other row (and any
    with a non-positive threshold) is left to a dense row.
    """
    device, size = hidden.device, hidden.shape[-1]
    rounded = hidden.bfloat16()
    with _float32_accumulation(device):
        scan = scan_tiles(rounded, prepared.bf16, TILE.get(device.type, DEFAULT_TILE))
    best, tile_of = scan.first.max(0)
    column = scan.where.gather(0, tile_of.unsqueeze(0)).squeeze(0)
    norms = RowNorms.of(hidden, rounded)
    e_winner = score_error(norms, prepared, size, column)
    e_max = score_error(norms, prepared, size, None)
    # Candidates v: max(b_v, 0) / (1 - u) + e_max >= b_1 / (1 + u) - e_winner (the winner's lower bound).
    u = BF16_UNIT
    threshold = (1 - u) * (_values(best) / (1 + u) - SAFETY * (e_winner + e_max))
    usable = torch.isfinite(threshold) & (threshold > 0)
    first = _values(scan.first)
    candidate = first >= threshold
    count = candidate.sum(0)
    crowded = (_values(scan.second) >= threshold).any(0)
    proven = usable & (count == 1) & ~crowded
    winner, clear = _rescore(hidden, weight, scan, first, candidate, norms, prepared)
    rescored = usable & ~proven & ~crowded & (count <= CANDIDATE_TILES) & clear
    return Decision(torch.where(rescored, winner, column), rescored, ~(proven | rescored))


def _rescore(
    hidden: Tensor, weight: Tensor, scan: TileScan, first: Tensor, candidate: Tensor, norms: RowNorms, prepared: PreparedWeight
) -> tuple[Tensor, Tensor]:
    """Per row: the column with the best float32 score among its best tiles' candidate winners, and whether it is clear.

    The ``CANDIDATE_TILES`` tiles with the highest bf16 winners hold every candidate tile of a
    row that has at most that many (candidates score above all non-candidates).  Clear: ahead
    of the runner-up by more than twice the float32 error (ours and the dense path's).
    """
    take = min(CANDIDATE_TILES, first.shape[0])
    tiles = first.topk(take, dim=0).indices  # [take, M]
    columns = scan.where.gather(0, tiles)
    scores = (hidden.unsqueeze(0) * weight[columns]).sum(-1).double()
    scores = scores.masked_fill(~candidate.gather(0, tiles), -math.inf)
    if take == 1:  # a single tile: a second candidate would make it crowded
        scores = torch.cat([scores, torch.full_like(scores, -math.inf)])
    top, at = scores.topk(2, dim=0)
    size = hidden.shape[-1]
    apart = 2 * float32_error(size) * norms.h * prepared.max_norm
    margin = 2 * (apart + 2 * _underflow(norms, prepared, size))
    return columns.gather(0, at[:1].clamp(max=take - 1)).squeeze(0), top[0] - top[1] > SAFETY * margin


def dense_argmax(hidden: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(hidden, weight).argmax(-1)`` for ``hidden`` [M, H], float32 in IEEE precision, in row slices.

    The slices keep the logits alive at once within the device's budget (calm_cli/runtime/budget.py),
    whatever M is: a whole pool's logits would be [M, V].
    """
    with ieee_float32(hidden.device):
        parts = [F.linear(hidden[s], weight).argmax(-1) for s in row_slices(hidden.shape[0], weight.shape[0], hidden.device.type)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=hidden.device)


@dataclass
class FastDecodeStats:
    """What the decoder did, summed over calls: rows decoded, and how many needed more than bf16.

    ``rescored``: settled by float32 scores of a few candidates, a device tensor once a certified
    call has run (reading it waits for the device: do it only to report); ``dense``: needed a
    dense float32 row (including whole calls decoded densely), known on the host anyway.
    """

    rows: int = 0
    rescored: int | Tensor = 0
    dense: int = 0


class FastCandidateDecoder:
    """Drop-in for ``Autoencoder.decode_tokens``: the same chunks, from bf16 scores plus a certificate.

    ``states`` computes the decoder's final states (default ``ae.decoder.hidden``; the runner
    passes its bf16 layers, calm_cli/runtime/precision.py); the certificate takes them as given.

    It keeps a ``PreparedWeight`` of the output matrix, rebuilt when the matrix changes (new
    storage or an in-place update), so an engine can hold one for a model's life.
    """

    def __init__(self, ae: Autoencoder, states: Callable[[Tensor], Tensor] | None = None) -> None:
        self.ae = ae
        self.states = states or ae.decoder.hidden  # latents [..., P, latent] -> final states [..., P * K, H]
        self.stats = FastDecodeStats()
        self._key: tuple | None = None
        self._prepared: PreparedWeight | None = None
        self._dense_calls_left = 0

    def __call__(self, latents: Tensor) -> Tensor:
        """Latents [..., latent] -> argmax chunks [..., K]: the float32 argmax of W h for the states ``states`` gives."""
        hidden = self.states(latents.unsqueeze(-2))
        weight = self.ae.decoder.lm_head_weight
        flat = hidden.reshape(-1, hidden.shape[-1])
        if self._use_bf16(flat, weight):
            column = self.argmax(flat, weight)
        else:
            self.stats.rows += flat.shape[0]
            self.stats.dense += flat.shape[0]
            column = dense_argmax(flat, weight)
        return column.reshape(hidden.shape[:-1])

    def argmax(self, hidden: Tensor, weight: Tensor) -> Tensor:
        """``F.linear(hidden, weight).argmax(-1)`` for float32 ``hidden`` [M, H], settled by ``decide`` slice by slice."""
        prepared = self.prepared(weight)
        tile = TILE.get(hidden.device.type, DEFAULT_TILE)
        parts = [decide(hidden[s], weight, prepared) for s in row_slices(hidden.shape[0], tile, hidden.device.type)]
        column = torch.cat([part.column for part in parts])
        dense = torch.cat([part.dense for part in parts]).nonzero().squeeze(1)  # the call's one host sync
        if dense.numel():
            column[dense] = dense_argmax(hidden[dense], weight)
        self.stats.rows += hidden.shape[0]
        self.stats.rescored += sum(part.rescored.sum() for part in parts)
        self.stats.dense += dense.numel()
        if dense.numel() > FALLBACK_FRACTION * hidden.shape[0]:
            self._dense_calls_left = RETRY_AFTER
        return column

    def prepared(self, weight: Tensor) -> PreparedWeight:
        """The cached ``PreparedWeight`` of ``weight``, rebuilt when ``weight`` has changed."""
        version = -1 if weight.is_inference() else weight._version  # inference tensors keep no counter
        key = (weight.data_ptr(), version, weight.device, tuple(weight.shape))
        if key != self._key or self._prepared is None:
            self._prepared = PreparedWeight.of(weight)
            self._key = key
        return self._prepared

    def _use_bf16(self, hidden: Tensor, weight: Tensor) -> bool:
        """float32 models on a backend that accumulates bf16 in float32, unless in a dense spell."""
        if hidden.dtype != torch.float32 or weight.dtype != torch.float32 or hidden.shape[0] * weight.numel() <= MIN_WORK:
            return False
        if self._dense_calls_left > 0:
            self._dense_calls_left -= 1
            return False
        return _accumulates_in_float32(weight.device)
