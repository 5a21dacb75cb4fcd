"""tierflow.workload: one workload description for the live load generator and the simulator.

A spec (YAML, `spec.WorkloadSpec`) says who calls (tenants), what they run (agent flows:
sequences of model calls and tool steps whose prompts grow with the session's history;
plain single calls from a model mix), when sessions arrive (steady, Poisson, bursts,
diurnal) and what counts as good service (SLOs). Everything here is pure and seeded:

    load_spec(path) -> WorkloadSpec                    spec        (SpecError lists every problem by path)
    arrival_times(phases, seed=...) -> ndarray         arrivals    (steady, Poisson, bursts, diurnal; thinned)
    plan_sessions(spec, ...) -> list[SessionPlan]      sessions    (arrival times + step programs)
    Conversation                                       conversation (messages, prompt token ids and block hashes, kept incrementally)
    RequestRecord                                      records     (what one request did: the live driver and the simulator both emit these)
    build_report(records, ...) -> Report               report      (percentiles, goodput, rates, over time and in total)
    compare_table(a, b) -> rich Table                  compare     (two reports side by side, B/A ratios)
    write_plots(report, directory) -> list[Path]       plots       (PNG timelines; matplotlib imported only here)

Production traces are a workload too (Mooncake, Azure LLM inference, BurstGPT, and the
fabric's own request log), replayed through the same plans and reports:

    load_trace(path, format=None) -> Trace              traces       (whole file read first; TraceError names file:line: field)
    plan_replay(trace, spec, options) -> Replay         replay       (one plan per request; window, speed, rate scale, model mapping)
    TracePrompt, prompt_token_ids, prompt_block_hashes   trace_text   (exact input tokens; shared hash_ids -> shared text; hashes memoized per shared block)
    TraceSummary, prefix_reuse(...)                     trace_stats  (trace vs sent vs measured; reuse with an unbounded cache)
    export_router_log(lines) -> Export                  trace_export (the router's request records as a tierflow trace)

Beyond reading and writing files (specs, reports, plots), one module does I/O:
`live.run_live(plans, base_url=...) -> LiveRun`, the load generator's shell, sleeps and
runs the plans against an OpenAI-compatible endpoint, recording every call.

The live driver (`tierflow loadtest run`) and the simulator (`tierflow sim`) consume the
same `SessionPlan`s and produce the same `RequestRecord`s, so their reports compare.
"""
