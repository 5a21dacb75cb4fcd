"""Published figures the emulator is checked against, each with where it comes from.

A `Figure` is one number somebody published (a point, or a range when sources or snapshots
disagree), the conditions it was measured under, and its citation. `kind` says what the
emulator must compute to compare (`tierflow.rdu.calibrate.emulate`):

* ``decode_tps``: single-user (or per-user at `batch`) output tokens/s at ~`prompt` tokens
  of context, the Artificial Analysis measure (speed after the first chunk: no prefill).
* ``e2e_s``: seconds for a batch of `batch` requests of `prompt` tokens in and `output`
  out: one prefill, then decode (LLM-Inference-Bench, input = output length).
* ``ttft_s``: seconds to the first token of `batch` prompts of `prompt` tokens, prefilled
  together (network excluded: the source measures on the node).
* ``switch_s``: seconds to copy the model's weights DDR -> HBM.
* ``switch_ratio``: the same copy on `baseline` over on `profile`.

`fit`: the figure is one the shared constants are fitted to; the others are predictions.
`gated`: the ±15% check applies (`note` says why when it does not).

Sources (keys used in `source`):

- SN40L: Prabhakar et al., "SambaNova SN40L: Scaling the AI Memory Wall with Dataflow and
  Composition of Experts", arXiv 2405.07518 (MICRO 2024), Tab. IV (Llama 3.1 on 16 sockets),
  Tab. V and §VI-C (switching vs DGX).
- BL1: sambanova.ai/blog/sn40l-chip-best-inference-solution (2024-09-10), Tab. 1, figures
  from artificialanalysis.ai.
- DAC: "SambaNova SN40L: Unleashing Agentic AI with Dataflow", DAC 2025,
  62dac.conference-program.com/presentation/?id=SSSN027.
- BL2: sambanova.ai/blog/inference-speed-or-throughput-with-rdus-you-dont-have-to-choose.
- AA-G: artificialanalysis.ai/models/gpt-oss-120b-low/providers (737.9 tok/s); 692.5 tok/s
  an earlier AA snapshot.
- HC: R. Prabhakar, "SambaNova SN40L RDU", Hot Chips 2024, slide 3 ("e.g. 0.01 s for
  Llama 3.1 8B" on a 16-socket node).
- ANL: Chitty-Venkata et al., "LLM-Inference-Bench", arXiv 2411.00136; data
  github.com/argonne-lcf/LLM-Inference-Bench, Plots/Fig_18/SN40L_latency_throughput.csv
  and Plots/Fig_22/all_results_TTFT_ITL.csv (8 x SN40L, SambaFlow, 2024).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

__all__ = ["Figure", "FIGURES", "FigureKind"]

FigureKind = Literal["decode_tps", "e2e_s", "ttft_s", "switch_s", "switch_ratio"]

_ANL_CSV: Final = (
    "LLM-Inference-Bench (arXiv 2411.00136), github.com/argonne-lcf/LLM-Inference-Bench"
    " Plots/Fig_18/SN40L_latency_throughput.csv"
)
_ANL_TTFT: Final = (
    "LLM-Inference-Bench (arXiv 2411.00136), github.com/argonne-lcf/LLM-Inference-Bench"
    " Plots/Fig_22/all_results_TTFT_ITL.csv"
)
_SN_TAB4: Final = (
    "SN40L paper arXiv 2405.07518 Tab. IV; sambanova.ai/blog/sn40l-chip-best-inference-solution"
    " (2024-09-10, Artificial Analysis figures)"
)


class Figure(msgspec.Struct, frozen=True):
    key: str
    kind: FigureKind
    model: str
    profile: str
    low: float
    high: float
    unit: str
    source: str
    batch: int = 1
    prompt: int = 1024
    output: int = 0
    spec_decode: bool = True  # the deployment may speculate (if the model has a draft)
    baseline: str = ""  # switch_ratio: the slower node
    fit: bool = True
    gated: bool = True
    note: str = ""

    @property
    def published(self) -> str:
        if self.low == self.high:
            return f"{self.low:g}"
        return f"{self.low:g}-{self.high:g}"


def _decode16(model: str, low: float, high: float, source: str, note: str = "") -> Figure:
    return Figure(
        f"decode 1 user {model} (16 sockets)", "decode_tps", model, "sn40l-16",
        low, high, "tok/s", source, note=note,
    )


def _anl(model: str, length: int, batch: int, seconds: float, **kw: object) -> Figure:
    return Figure(
        f"e2e {model} bs{batch} {length}/{length} (8 sockets)", "e2e_s", model, "sn40l-8",
        seconds, seconds, "s", _ANL_CSV, batch=batch, prompt=length, output=length,
        spec_decode=False, **kw,  # type: ignore[arg-type]
    )


_BATCHED_NOTE: Final = (
    "not gated: the 2024 SambaFlow research stack's batch-16 graphs take about twice the"
    " step time the bandwidth model gives (3.0 vs 1.5 ms per step for 8B at batch 1); no"
    " published detail says why, and a per-sequence constant for it would fit one stack"
)

FIGURES: Final[tuple[Figure, ...]] = (
    # -- 16 sockets, one user, Artificial Analysis via SambaNova ------------------------
    _decode16("llama-3.1-8b", 1042, 1042, _SN_TAB4, "BF16, no speculative decoding"),
    _decode16("llama-3.1-70b", 457, 457, _SN_TAB4, "BF16, speculative decoding (Tab. IV)"),
    _decode16("llama-3.1-405b", 129, 129, _SN_TAB4, "BF16, speculative decoding (Tab. IV)"),
    _decode16(
        "deepseek-r1", 198, 250,
        "DAC 2025 SSSN027 (198 tok/s, one rack of 16 SN40L); sambanova.ai/blog/"
        "inference-speed-or-throughput-with-rdus-you-dont-have-to-choose (>250 tok/s/user)",
    ),
    _decode16(
        "gpt-oss-120b", 692.5, 737.9,
        "artificialanalysis.ai/models/gpt-oss-120b-low/providers (737.9; 692.5 an earlier"
        " snapshot)",
    ),
    # -- 8 sockets, LLM-Inference-Bench (input = output length) ---------------------------
    _anl("llama-3.1-8b", 1024, 1, 1.5843, note="Meta-Llama-3-8B (same architecture)"),
    _anl("llama-3.1-8b", 2048, 1, 3.2881, note="Meta-Llama-3-8B (same architecture)"),
    _anl("llama-3.1-70b", 1024, 1, 11.893, note="Meta-Llama-3-70B (same architecture)"),
    _anl("mistral-7b", 1024, 1, 1.4857, note="Mistral-7B-v0.1"),
    _anl("llama-3.1-8b", 1024, 16, 3.5426, fit=False, gated=False, note=_BATCHED_NOTE),
    _anl("llama-3.1-70b", 1024, 16, 17.817, fit=False, gated=False, note=_BATCHED_NOTE),
    _anl("mistral-7b", 1024, 16, 3.6948, fit=False, gated=False, note=_BATCHED_NOTE),
    Figure(
        "ttft llama-3.1-8b bs16 1024 (8 sockets)", "ttft_s", "llama-3.1-8b", "sn40l-8",
        0.42, 0.42, "s", _ANL_TTFT, batch=16, prompt=1024, note="Meta-Llama-3-8B",
    ),
    Figure(
        "ttft mistral-7b bs16 1024 (8 sockets)", "ttft_s", "mistral-7b", "sn40l-8",
        0.50, 0.50, "s", _ANL_TTFT, batch=16, prompt=1024, note="Mistral-7B-v0.1",
    ),
    # -- switching: no fitted constant takes part ----------------------------------------
    Figure(
        "switch llama-3.1-8b (16 sockets)", "switch_s", "llama-3.1-8b", "sn40l-16",
        0.01, 0.01, "s", "Hot Chips 2024, R. Prabhakar, 'SambaNova SN40L RDU', slide 3",
        fit=False, note="'e.g. 0.01 s'",
    ),
    Figure(
        "switch speed-up vs DGX H100 (8 sockets)", "switch_ratio", "llama-2-7b", "sn40l-8",
        15, 16, "x",
        "SN40L paper arXiv 2405.07518 Tab. V (15x) and §VI-C (16x); DGX host link 64 GB/s as"
        " the paper assumes",
        baseline="h100-8x", fit=False, note="Samba-CoE experts are Llama2-7B",
    ),
    Figure(
        "switch speed-up vs DGX A100 (8 sockets)", "switch_ratio", "llama-2-7b", "sn40l-8",
        31, 31, "x",
        "SN40L paper arXiv 2405.07518 Tab. V; DGX host link 32 GB/s as the paper assumes",
        baseline="a100-8x", fit=False, note="Samba-CoE experts are Llama2-7B",
    ),
)
