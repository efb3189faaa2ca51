"""`calm bench`: CALM against the token-level baseline with the same backbone, side by side.

Each row is one model (CALM at some K, or the baseline), one concurrency (requests in
flight at once: the engine's slots) and one temperature (and, for CALM, one candidate
decoder: `--candidate-decoder dense,fast` gives both). A run submits that many prompts of
random token ids (so no tokenisation is timed) to the same `Engine` that `calm generate`
and `calm serve` use, with EOS ignored and a fixed number of new tokens, and steps the
engine until all are done; every step hands its tokens to the host as it does for them.
Decode tokens/s is all requests' new tokens over the engine's time minus the prefills:
the aggregate rate at that concurrency. `decodes_per_step` is the candidates decoded per
row and step.

Subjects are measured side by side: one warm-up run each (it also triggers torch.compile),
then the timed runs go round the subjects in turn (A B A B ...), so a burst of load on a
shared machine hits every subject alike. Means and standard deviations are over the
timed runs, step-latency percentiles over all their steps. Building or loading a model is
timed apart (`models[].load_s`).

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..io.checkpoint import is_baseline, load_baseline, load_model
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from ..models.config import AutoencoderConfig, CALMConfig, config_from_dict, read_json
from ..runtime.engine import Engine, build_engine
from ..runtime.sampling import SamplingStats
from ..runtime.settings import CANDIDATE_DECODERS, CANDIDATE_DTYPES, EngineOptions, GenerationSettings, SettingsError


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
# The `calm bench` flag each generation setting is typed as, to word the settings gate's errors
FLAGS = {"temperature": "--temp", "num_samples": "--samples", "sampler": "--sampler"}
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
    candidate_dtypes: list[str] = field(default_factory=lambda: ["auto"])
    seed: int = 0
    compile: bool = False
    eager_too: bool = False  # with compile: an eager engine of each subject too, measured in turn with the compiled one
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
        raise UsageError("--K and --concurrency values must be at least 1")
    for temperature in options.temperatures:
        try:
            GenerationSettings(temperature=temperature, num_samples=options.num_samples, sampler=options.sampler)
        except SettingsError as exc:
            raise UsageError(exc.named(FLAGS)) from None
    if options.prompt_tokens < 1 or options.repetitions < 1:
        raise UsageError("-p and -r must be at least 1")
    if options.new_tokens <= max(options.ks):
        raise UsageError(f"-n must be more than K ({max(options.ks)}): a run needs steps after the first chunk")
    if not options.candidate_decoders or set(options.candidate_decoders) - set(CANDIDATE_DECODERS):
        raise UsageError(f"--candidate-decoder takes dense, fast or dense,fast, got '{','.join(options.candidate_decoders)}'")
    if not options.candidate_dtypes or set(options.candidate_dtypes) - set(CANDIDATE_DTYPES):
        raise UsageError(f"--candidate-dtype takes auto, float32, bf16 or a list of them, got '{','.join(options.candidate_dtypes)}'")
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
    """Builders of random-weight models: the token baseline and CALM at each K."""
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


@dataclass
class Arm:
    """One engine under test: a subject with one candidate decoder and dtype, its slots sized to the concurrency."""

    subject: Subject
    candidate_decoder: str | None
    candidate_dtype: str = "auto"
    compile: bool = False
    engine: Engine | None = None

    @property
    def is_calm(self) -> bool:
        return isinstance(self.subject.model, CALM)

    def engine_for(self, concurrency: int) -> Engine:
        if self.engine is None or self.engine.max_batch != concurrency:
            options = EngineOptions(max_batch=concurrency, candidate_decoder=self.candidate_decoder or "dense",
                                    candidate_dtype=self.candidate_dtype, compile=self.compile)
            self.engine = build_engine(self.subject.model, options)
        return self.engine


@dataclass
class Run:
    prefill_s: float
    decode_s: float
    ttft_s: float
    tokens: int
    steps_s: list[float]


def run_once(engine: Engine, prompts: list[list[int]], settings: GenerationSettings) -> Run:
    """Submit every prompt at once and step the engine until all are done, as `calm generate` does."""
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    requests = [engine.submit(p, settings) for p in prompts]
    first: list[float] = []
    laps = []
    sync()
    t0 = time.perf_counter()
    while engine.has_work():
        before = time.perf_counter()
        updates = engine.step()
        now = time.perf_counter()
        laps.append(now - before)
        if not first and any(u.tokens for u in updates):
            first.append(now)
    prefill = sum(r.prefill_s for r in requests)
    return Run(prefill, now - t0 - prefill, first[0] - t0, sum(len(r.tokens) for r in requests), laps[1:])


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _prompts(model: CALM | TokenTransformer, count: int, length: int, seed: int) -> list[list[int]]:
    cpu = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (count, length), generator=cpu).tolist()


def _row(arm: Arm, concurrency: int, temperature: float, options: BenchOptions, runs: list[Run], peak_mb: float,
         warmup_s: float, stats: SamplingStats) -> dict[str, Any]:
    """The figures of one row from its timed runs."""
    k, model = arm.subject.k, arm.subject.model
    prompt = math.ceil(options.prompt_tokens / k) * k
    steps = math.ceil(options.new_tokens / k)
    prefill, prefill_std = _mean_std([concurrency * prompt / r.prefill_s for r in runs])
    rate, rate_std = _mean_std([r.tokens / r.decode_s for r in runs])
    ttft, ttft_std = _mean_std([1000 * r.ttft_s for r in runs])
    laps = [1000 * s for r in runs for s in r.steps_s] or [0.0]
    weight_bytes = decode_weight_bytes(model)
    bandwidth = weight_bytes * rate / (concurrency * k) / 1e9
    row = {
        "kind": "calm" if arm.is_calm else "baseline", "K": k, "batch": concurrency, "temp": temperature,
        "compile": arm.compile, "candidate_decoder": arm.candidate_decoder,
        "candidate_dtype": str(arm.engine.runner.path(temperature).dtype).removeprefix("torch.") if arm.is_calm else None,
        # Candidate chunks decoded per row and step; None for the baseline.
        "decodes_per_step": stats.draws / stats.rows if arm.is_calm and stats.rows else None,
        "prompt_tokens": prompt, "new_tokens": steps * k, "decode_steps": steps,
        "prefill_tok_s": prefill, "prefill_tok_s_std": prefill_std, "decode_tok_s": rate, "decode_tok_s_std": rate_std,
        "vector_steps_s": rate / (concurrency * k), "vector_steps_s_std": rate_std / (concurrency * k),
        "ttft_ms": ttft, "ttft_ms_std": ttft_std,
        "step_ms_p50": _percentile(laps, 0.5), "step_ms_p95": _percentile(laps, 0.95),
        "peak_mem_mb": peak_mb, "weight_mb": weight_bytes / 2**20,
        "bandwidth_gbs": bandwidth, "bandwidth_frac": bandwidth / options.peak_gbs if options.peak_gbs else None,
        "warmup_s": warmup_s,
    }
    return {key: float(f"{v:.5g}") if isinstance(v, float) else v for key, v in row.items()}


def measure(arms: list[Arm], concurrency: int, temperature: float, options: BenchOptions, peak: PeakMemory) -> list[dict[str, Any]]:
    """Rows for every arm at one concurrency and temperature: warm-ups, then timed runs in turn (A B A B)."""
    engines = [arm.engine_for(concurrency) for arm in arms]
    plans = []
    for arm, engine in zip(arms, engines):
        k = arm.subject.k
        settings = GenerationSettings(
            max_tokens=math.ceil(options.new_tokens / k) * k, temperature=temperature, num_samples=options.num_samples,
            sampler=options.sampler, seed=options.seed, ignore_eos=True,
        )
        prompts = _prompts(arm.subject.model, concurrency, math.ceil(options.prompt_tokens / k) * k, options.seed)
        peak.reset()
        t0 = time.perf_counter()
        run_once(engine, prompts, settings)
        plans.append((settings, prompts, time.perf_counter() - t0, peak.read_mb()))
        engine.sampling = SamplingStats()
    runs: list[list[Run]] = [[] for _ in arms]
    for repetition in range(options.repetitions):
        for i, (engine, (settings, prompts, _, _)) in enumerate(zip(engines, plans)):
            seeded = dataclasses.replace(settings, seed=options.seed + 1 + repetition)
            runs[i].append(run_once(engine, prompts, seeded))
    return [
        _row(arm, concurrency, temperature, options, arm_runs, peak_mb, warmup_s, engine.sampling)
        for arm, engine, arm_runs, (_, _, warmup_s, peak_mb) in zip(arms, engines, runs, plans)
    ]


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
    """Measure every subject at every temperature and concurrency, subjects side by side (all in memory)."""
    peak = PeakMemory(device)
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    arms: list[Arm] = []
    dtype = None
    for make in makers:
        subject = make()
        dtype = next(subject.model.parameters()).dtype
        is_calm = isinstance(subject.model, CALM)
        names = options.candidate_decoders if is_calm else [None]  # a baseline has no candidates to decode
        dtypes = options.candidate_dtypes if is_calm else ["auto"]
        modes = [False, True] if options.compile and options.eager_too else [options.compile]
        arms += [Arm(subject, name, dtype_name, mode) for mode in modes for name in names for dtype_name in dtypes]
        models.append({
            "kind": subject.kind, "K": subject.k, "params": sum(p.numel() for p in subject.model.parameters()),
            "weight_mb": round(decode_weight_bytes(subject.model) / 2**20, 2), "load_s": round(subject.load_s, 3),
        })
        progress(f"{subject.kind} K={subject.k}: built/loaded in {subject.load_s:.2f}s")
    for temperature in options.temperatures:
        for concurrency in options.batches:
            progress(f"concurrency {concurrency} T={temperature}: {len(arms)} engines, {options.repetitions} runs each in turn")
            for row in measure(arms, concurrency, temperature, options, peak):
                rows.append(row)
                using = f" {row['candidate_decoder']} decoder, {row['candidate_dtype']}" if row["kind"] == "calm" else ""
                using += ", compiled" if row["compile"] else ""
                # Each row's figures as it lands, warm-up (the compile, when compiled) included: a run cut short
                # by a time limit has lost its JSON, not these lines.
                progress(f"  {row['kind']} K={row['K']}{using}: {row['decode_tok_s']:.1f} decode tok/s, "
                         f"step p50 {row['step_ms_p50']:.2f} ms, peak {row['peak_mem_mb']:.0f} MB, warm-up {row['warmup_s']:.1f} s")
    baseline = {(r["batch"], r["temp"], r["compile"]): r["decode_tok_s"] for r in rows if r["kind"] == "baseline"}
    for r in rows:
        if r["kind"] == "calm":
            base = baseline.get((r["batch"], r["temp"], r["compile"]))
            r["speedup_vs_baseline"] = round(r["decode_tok_s"] / base, 3) if base else None
    rows.sort(key=lambda r: (-r["temp"], r["batch"], r["compile"], r["kind"] != "baseline", r["K"], r["candidate_decoder"] or "", r["candidate_dtype"] or ""))
    return {
        "source": source, "device": str(device), "hardware": _hardware(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "compile": options.compile,
        "prompt_tokens": options.prompt_tokens, "new_tokens": options.new_tokens, "repetitions": options.repetitions,
        "sampler": options.sampler, "samples": options.num_samples, "candidate_decoders": options.candidate_decoders,
        "candidate_dtypes": options.candidate_dtypes,
        "peak_gbs": options.peak_gbs,
        "peak_mem_kind": peak.kind, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "models": models, "rows": rows,
    }
