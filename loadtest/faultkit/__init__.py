"""The fault suite's parts (loadtest/faults.py runs them; tests/faults/ runs a short form).

- `fabric`: start the fabric under test, find and signal its processes, watch its nodes
  (heartbeats) and probe one directly over NATS;
- `load`: the load (agent sessions from a workload spec, plus closed-loop streamers),
  every call recorded with its outcome, first token and exact token count;
- `ledger`: registry writes through the admin API, and the check that none was lost;
- `catalog`: the faults, one function each;
- `routerlog`: the routers' per-request records (migrations, attempts), from their logs;
- `report`: one row per fault, the issue's musts judged on it, the table;
- `run`: the sequence (fabric, load, each fault with a steady period and a recovery).
"""
