"""tierflow.workload: one workload description for the live load generator and the simulator.

A spec (YAML, `spec.WorkloadSpec`) says who calls (tenants), what they run (agent flows:
sequences of model calls and tool steps whose prompts grow with the session's history;
plain single calls from a model mix), when sessions arrive (steady, Poisson, bursts,
diurnal) and what counts as good service (SLOs). Everything here is pure and seeded:

    load_spec(path) -> WorkloadSpec                    spec        (SpecError lists every problem by path)
    arrival_times(phases, seed=...) -> ndarray         arrivals    (steady, Poisson, bursts, diurnal; thinned)
    plan_sessions(spec, ...) -> list[SessionPlan]      sessions    (arrival times + step programs)
    Conversation                                       conversation (messages and prompt token ids, kept incrementally)
    RequestRecord                                      records     (what one request did: the live driver and the simulator both emit these)
    build_report(records, ...) -> Report               report      (percentiles, goodput, rates, over time and in total)
    compare_table(a, b) -> rich Table                  compare     (two reports side by side, B/A ratios)
    write_plots(report, directory) -> list[Path]       plots       (PNG timelines; matplotlib imported only here)

Beyond reading and writing files (specs, reports, plots), one module does I/O:
`live.run_live(plans, base_url=...) -> LiveRun`, the load generator's shell, sleeps and
runs the plans against an OpenAI-compatible endpoint, recording every call.

The live driver (`tierflow loadtest run`) and the simulator (`tierflow sim`) consume the
same `SessionPlan`s and produce the same `RequestRecord`s, so their reports compare.
"""
