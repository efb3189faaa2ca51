"""`calm bench`: CALM against the token-level baseline with the same backbone, side by side.

Each row is one model (CALM at some K, or the baseline), one batch size and one
temperature (and, for CALM, one candidate decoder: `--candidate-decoder dense,fast` gives
both). A run prefills a prompt of random token ids (so no tokenisation is timed),
draws the first K tokens from the prefill state (time to first token), then takes
fixed-length decode steps with EOS ignored: backbone step, then the engine's sampler
(`engine.sample_step` over the head and the candidate decoder for CALM, `sample_logits` for
the baseline), then the new tokens go to the host as the engines hand them to their caller.
`decodes_per_step` is the candidates decoded per row and step.
That hand-off waits for the device, so per-step latencies are real. One warm-up run (it
also triggers torch.compile) is not counted; means and standard deviations are over the
runs after it, step-latency percentiles over all their steps. Building or loading a model
is timed apart (`models[].load_s`).

Bandwidth is the weight bytes one decode step reads times steps/s, as gpt-fast counts it:
backbone layers, embed_proj, head and autoencoder decoder (its output matrix included) for
CALM; backbone layers and lm_head for the baseline. Embedding tables (a step gathers a few
rows), the autoencoder's encoder (unused in decoding) and the KV cache are left out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UsageError
from ..io.checkpoint import is_baseline, load_baseline, load_model
from ..models.backbone import KVCache
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from ..models.config import AutoencoderConfig, CALMConfig, config_from_dict, read_json
from ..runtime.engine import CANDIDATE_DECODERS, GenerationSettings, sample_step
from ..runtime.fastdecode import FastCandidateDecoder
from ..runtime.sampling import SamplingStats
from ..runtime.token_engine import next_logits, sample_logits


@dataclass(frozen=True)
class Preset:
    """A backbone shape plus the autoencoder that goes with it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 128256
    ae_hidden: int = 512
    ae_intermediate: int = 1280
    latent: int = 128
    noise: int = 64


# S is the authors' default backbone and M is CALM-M. L and XL are inferred from the paper's
# parameter counts (735M and 1.82B with this vocabulary and autoencoder); their head counts
# are our assumption. tiny is for CPU tests, with an autoencoder scaled down to match.
PRESETS = {
    "tiny": Preset(256, 688, 4, 4, vocab=8192, ae_hidden=128, ae_intermediate=320, latent=32, noise=32),
    "S": Preset(768, 2048, 12, 12),
    "M": Preset(1024, 2752, 16, 16),
    "L": Preset(1536, 4096, 16, 16),
    "XL": Preset(2560, 6880, 16, 20),
}


@dataclass
class BenchOptions:
    ks: list[int] = field(default_factory=lambda: [4])
    batches: list[int] = field(default_factory=lambda: [1])
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    prompt_tokens: int = 128
    new_tokens: int = 128
    repetitions: int = 3
    num_samples: int = 200
    sampler: str = "approx"
    candidate_decoders: list[str] = field(default_factory=lambda: ["fast"])
    seed: int = 0
    compile: bool = False
    peak_gbs: float | None = None


@dataclass
class Subject:
    """A model under test and the seconds it took to build or load."""

    kind: str
    k: int
    model: CALM | TokenTransformer
    load_s: float


def check_options(options: BenchOptions) -> None:
    """Reject what the benchmark cannot run, before any model is built."""
    if min(options.ks) < 1 or min(options.batches) < 1:
        raise UsageError("--K and -b values must be at least 1")
    if any(not 0.0 <= t <= 1.0 for t in options.temperatures):
        raise UsageError("--temp values must be in [0, 1]")
    if options.prompt_tokens < 1 or options.repetitions < 1 or options.num_samples < 1:
        raise UsageError("-p, -r and --samples must be at least 1")
    if options.new_tokens <= max(options.ks):
        raise UsageError(f"-n must be more than K ({max(options.ks)}): the first chunk comes from the prefill, steps follow")
    if options.sampler not in ("approx", "exact"):
        raise UsageError(f"--sampler must be 'approx' or 'exact', got '{options.sampler}'")
    if not options.candidate_decoders or set(options.candidate_decoders) - set(CANDIDATE_DECODERS):
        raise UsageError(f"--candidate-decoder takes dense, fast or dense,fast, got '{','.join(options.candidate_decoders)}'")
    if options.peak_gbs is not None and options.peak_gbs <= 0:
        raise UsageError("--peak-gbs must be positive")


def parse_list(text: str, kind: type, flag: str) -> list:
    """'1,8,32' -> [1, 8, 32]; anything else is a usage error naming the flag."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{flag} expects a comma-separated list of numbers, got '{text}'") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def _build(device: torch.device, dtype: torch.dtype, cls: Callable[..., Any], *args: Any) -> Any:
    """cls(*args) with its parameters created on `device` in `dtype` directly: no float32 copy on the host first."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return cls(*args)
    finally:
        torch.set_default_dtype(previous)


def preset_configs(preset: Preset, k: int) -> tuple[CALMConfig, AutoencoderConfig]:
    p = preset
    config = CALMConfig(
        vocab_size=p.vocab, patch_size=k, hidden_size=p.hidden, intermediate_size=p.intermediate,
        num_hidden_layers=p.layers, num_attention_heads=p.heads, latent_size=p.latent, noise_size=p.noise,
    )
    ae = AutoencoderConfig(
        vocab_size=p.vocab, patch_size=k, hidden_size=p.ae_hidden, intermediate_size=p.ae_intermediate, latent_size=p.latent
    )
    return config, ae


def _timed(kind: str, k: int, make: Callable[[], CALM | TokenTransformer]) -> Subject:
    t0 = time.perf_counter()
    model = make().eval().requires_grad_(False)
    return Subject(kind, k, model, time.perf_counter() - t0)


def preset_subjects(name: str, ks: list[int], device: torch.device, dtype: torch.dtype) -> list[Callable[[], Subject]]:
    """Builders of random-weight models, called one at a time so that one model at a time is in memory."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}' (choose from {', '.join(PRESETS)})")
    preset = PRESETS[name]
    base, _ = preset_configs(preset, 1)
    makers = [lambda: _timed("baseline", 1, lambda: _build(device, dtype, TokenTransformer, base))]
    makers += [lambda k=k: _timed("calm", k, lambda: _build(device, dtype, CALM, *preset_configs(preset, k))) for k in ks]
    return makers


def checkpoint_subjects(
    model_dir: Path, baseline_dir: Path | None, device: torch.device, dtype: torch.dtype
) -> list[Callable[[], Subject]]:
    """A saved CALM (its own K) and a baseline: `baseline_dir`, else random weights with the CALM's backbone."""
    for directory in (model_dir, baseline_dir):
        if directory is not None and not (directory / "config.json").is_file():
            raise UsageError(f"{directory}: no config.json (not a model directory)")
    raw = read_json(model_dir / "config.json")
    if is_baseline(raw):
        if baseline_dir is not None:
            raise UsageError("--model is already a token-level baseline; --baseline goes with a CALM model")
        return [lambda: _timed("baseline", 1, lambda: load_baseline(model_dir, device=device, dtype=dtype))]
    config = config_from_dict(CALMConfig, raw, str(model_dir / "config.json"))

    def baseline() -> TokenTransformer:
        if baseline_dir is not None:
            return load_baseline(baseline_dir, device=device, dtype=dtype)
        return _build(device, dtype, TokenTransformer, dataclasses.replace(config, patch_size=1))

    return [
        lambda: _timed("calm", config.patch_size, lambda: load_model(model_dir, device=device, dtype=dtype)),
        lambda: _timed("baseline", 1, baseline),
    ]


def decode_weight_bytes(model: CALM | TokenTransformer) -> int:
    """Bytes of the weights one decode step reads (see the module docstring); tied tensors count once."""
    if isinstance(model, CALM):
        parts = [model.transformer.layers, model.transformer.norm, model.embed_proj, model.generative_head,
                 model.ae_model.decoder]
    else:
        parts = [model.transformer.layers, model.transformer.norm, model.lm_head]
    sizes = {p.data_ptr(): p.numel() * p.element_size() for part in parts for p in part.parameters()}
    return sum(sizes.values())


class PeakMemory:
    """Peak memory of a row: CUDA's max_memory_allocated, else the process's resident-set high-water mark.

    On Linux the high-water mark (VmHWM) is reset before each row through /proc/self/clear_refs,
    so it is that row's peak; where that fails it is getrusage's maximum over the whole process.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        else:
            self.kind = "rss_high_water_per_row" if self._reset_rss() else "rss_high_water_process"

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._reset_rss()

    def read_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "rss_high_water_per_row":
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calm_next(model: CALM, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    return model.step(input_ids, cache, start)[:, -1]


def _draw_chunks(model: CALM, hidden: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n fresh chunks per row, as `Engine.draw_fn` makes them: head draws decoded by argmax."""
    return model.ae_model.decode_tokens(model.generative_head.sample(hidden, n, generator=generator))


class Decoder:
    """One subject's cached forward pass and sampler; compiled once per subject when asked.

    CALM candidates go through `candidate_decoder` as in `Engine`; the fast one is never compiled
    (its rescoring is data-dependent), the dense one is with the step.  `stats` counts the draws.
    """

    def __init__(self, subject: Subject, options: BenchOptions, candidate_decoder: str = "fast") -> None:
        self.model, self.k, self.options = subject.model, subject.k, options
        self.is_calm = isinstance(subject.model, CALM)
        self.candidate_decoder = candidate_decoder if self.is_calm else None
        self.stats = SamplingStats()
        forward = _calm_next if self.is_calm else next_logits
        self._forward = torch.compile(forward, dynamic=True) if options.compile else forward
        self._draw = torch.compile(_draw_chunks, dynamic=True) if options.compile and self.is_calm else _draw_chunks
        if self.is_calm and candidate_decoder == "fast":
            fast = FastCandidateDecoder(subject.model.ae_model)

            def draw_fast(model: CALM, hidden: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
                return fast(model.generative_head.sample(hidden, n, generator=generator))

            self._draw = draw_fast

    def forward(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Hidden state (CALM) or logits (baseline) after the last new input, [B, ...]."""
        return self._forward(self.model, input_ids, cache, start)

    def sample(self, state: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
        """The next K tokens per row, [B, K]."""
        if not self.is_calm:
            return sample_logits(state, temperature, generator)[:, None]
        o = self.options
        draw = lambda n, rows=None: self._draw(self.model, state if rows is None else state[rows], n, generator)  # noqa: E731
        settings = GenerationSettings(temperature=temperature, num_samples=o.num_samples, sampler=o.sampler)
        return sample_step(draw, settings, generator, self.stats)


@dataclass
class Run:
    prefill_s: float
    ttft_s: float
    steps_s: list[float]


@torch.inference_mode()
def run_once(decoder: Decoder, ids: torch.Tensor, steps: int, temperature: float, seed: int) -> Run:
    """Prefill `ids`, sample the first chunk, then `steps - 1` decode steps; every step's tokens reach the host."""
    batch, length = ids.shape
    chunks = length // decoder.k
    generator = torch.Generator(device=ids.device).manual_seed(seed)
    cache = decoder.model.new_cache(batch, chunks + steps)
    cache.valid[:, :chunks] = True
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    state = decoder.forward(ids, cache, 0)
    sync()
    prefill_s = time.perf_counter() - t0
    tokens = decoder.sample(state, temperature, generator)
    tokens.tolist()
    last = time.perf_counter()
    ttft_s, laps = last - t0, []
    for slot in range(chunks, chunks + steps - 1):
        cache.valid[:, slot] = True
        tokens = decoder.sample(decoder.forward(tokens, cache, slot), temperature, generator)
        tokens.tolist()
        now = time.perf_counter()
        laps.append(now - last)
        last = now
    return Run(prefill_s, ttft_s, laps)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def measure(decoder: Decoder, batch: int, temperature: float, options: BenchOptions, peak: PeakMemory) -> dict[str, Any]:
    """One row: warm-up, `repetitions` timed runs, and the figures derived from them."""
    k, model = decoder.k, decoder.model
    device = next(model.parameters()).device
    prompt = math.ceil(options.prompt_tokens / k) * k
    steps = math.ceil(options.new_tokens / k)
    cpu = torch.Generator().manual_seed(options.seed)
    with torch.inference_mode():  # like the tokens fed back later, so compiled graphs see one kind of tensor
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=cpu).to(device)
    peak.reset()
    t0 = time.perf_counter()
    run_once(decoder, ids, steps, temperature, options.seed)
    warmup_s = time.perf_counter() - t0
    decoder.stats = SamplingStats()
    runs = [run_once(decoder, ids, steps, temperature, options.seed + 1 + i) for i in range(options.repetitions)]
    decode_steps = steps - 1
    prefill, prefill_std = _mean_std([batch * prompt / r.prefill_s for r in runs])
    rate, rate_std = _mean_std([batch * k * decode_steps / sum(r.steps_s) for r in runs])
    ttft, ttft_std = _mean_std([1000 * r.ttft_s for r in runs])
    laps = [1000 * s for r in runs for s in r.steps_s]
    weight_bytes = decode_weight_bytes(model)
    bandwidth = weight_bytes * rate / (batch * k) / 1e9
    row = {
        "kind": "calm" if decoder.is_calm else "baseline", "K": k, "batch": batch, "temp": temperature,
        "candidate_decoder": decoder.candidate_decoder,
        # Candidate chunks decoded per row and step (the first chunk's step included); None for the baseline.
        "decodes_per_step": decoder.stats.draws / decoder.stats.rows if decoder.stats.rows else None,
        "prompt_tokens": prompt, "new_tokens": steps * k, "decode_steps": decode_steps,
        "prefill_tok_s": prefill, "prefill_tok_s_std": prefill_std, "decode_tok_s": rate, "decode_tok_s_std": rate_std,
        "vector_steps_s": rate / (batch * k), "vector_steps_s_std": rate_std / (batch * k),
        "ttft_ms": ttft, "ttft_ms_std": ttft_std,
        "step_ms_p50": _percentile(laps, 0.5), "step_ms_p95": _percentile(laps, 0.95),
        "peak_mem_mb": peak.read_mb(), "weight_mb": weight_bytes / 2**20,
        "bandwidth_gbs": bandwidth, "bandwidth_frac": bandwidth / options.peak_gbs if options.peak_gbs else None,
        "warmup_s": warmup_s,
    }
    return {key: float(f"{v:.5g}") if isinstance(v, float) else v for key, v in row.items()}


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
            if names:
                return f"{names[0]} ({len(names)} logical CPUs)"
    return platform.processor() or platform.machine()


def run_bench(
    makers: list[Callable[[], Subject]], options: BenchOptions, device: torch.device, source: str,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Measure every subject at every temperature and batch size; one model in memory at a time."""
    peak = PeakMemory(device)
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    dtype = None
    for make in makers:
        subject = make()
        dtype = next(subject.model.parameters()).dtype
        is_calm = isinstance(subject.model, CALM)
        names = options.candidate_decoders if is_calm else ["dense"]  # a baseline has no candidates to decode
        decoders = [Decoder(subject, options, name) for name in names]
        models.append({
            "kind": subject.kind, "K": subject.k, "params": sum(p.numel() for p in subject.model.parameters()),
            "weight_mb": round(decode_weight_bytes(subject.model) / 2**20, 2), "load_s": round(subject.load_s, 3),
        })
        progress(f"{subject.kind} K={subject.k}: built/loaded in {subject.load_s:.2f}s")
        for temperature in options.temperatures:
            for batch in options.batches:
                for decoder in decoders:
                    rows.append(measure(decoder, batch, temperature, options, peak))
                    using = f" {decoder.candidate_decoder} decoder" if is_calm else ""
                    progress(f"  batch {batch} T={temperature}{using}: {rows[-1]['decode_tok_s']:.1f} decode tok/s")
        del subject, decoders
        if options.compile:
            torch._dynamo.reset()  # drop this model's graphs; also keeps the next model under the recompile limit
    baseline = {(r["batch"], r["temp"]): r["decode_tok_s"] for r in rows if r["kind"] == "baseline"}
    for r in rows:
        if r["kind"] == "calm":
            base = baseline.get((r["batch"], r["temp"]))
            r["speedup_vs_baseline"] = round(r["decode_tok_s"] / base, 3) if base else None
    rows.sort(key=lambda r: (-r["temp"], r["batch"], r["kind"] != "baseline", r["K"], r["candidate_decoder"] or ""))
    return {
        "source": source, "device": str(device), "hardware": _hardware(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "compile": options.compile,
        "prompt_tokens": options.prompt_tokens, "new_tokens": options.new_tokens, "repetitions": options.repetitions,
        "sampler": options.sampler, "samples": options.num_samples, "candidate_decoders": options.candidate_decoders,
        "peak_gbs": options.peak_gbs,
        "peak_mem_kind": peak.kind, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": models, "rows": rows,
    }
