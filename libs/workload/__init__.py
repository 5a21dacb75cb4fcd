"""tierflow.workload: one workload description for the live load generator and the simulator.

A spec (YAML, `spec.WorkloadSpec`) says who calls (tenants), what they run (agent flows:
sequences of model calls and tool steps whose prompts grow with the session's history;
plain single calls from a model mix), when sessions arrive (steady, Poisson, bursts,
diurnal) and what counts as good service (SLOs). Everything here is pure and seeded:

    load_spec(path) -> WorkloadSpec                    spec        (SpecError lists every problem by path)
    plan_sessions(spec, ...) -> list[SessionPlan]      sessions    (arrival times + step programs)
    Conversation                                       conversation (messages and prompt token ids, kept incrementally)
    RequestRecord                                      records     (what one request did: the live driver and the simulator both emit these)
    build_report(records, ...) -> Report               report      (percentiles, goodput, rates, over time and in total)
    compare_reports(a, b) -> table                     compare

The live driver (`tierflow loadtest run`) and the simulator (`tierflow sim`) consume the
same `SessionPlan`s and produce the same `RequestRecord`s, so their reports compare.
"""
