"""The fault suite's parts (loadtest/faults.py, overload.py and soak.py run them; tests/faults/ runs short forms).

- `fabric`: start the fabric under test, find and signal its processes, watch its nodes
  (heartbeats) and probe one directly over NATS;
- `load`: the load (agent sessions from a workload spec, plus closed-loop streamers),
  every call recorded with its outcome, first token and exact token count;
- `ledger`: registry writes through the admin API, and the check that none was lost;
- `base`, `kills`, `outage`, `catalog`: the faults (what they take and return, the kills
  and the stall, the NATS outage, and the list by name);
- `routerlog`: the routers' per-request records (migrations, attempts) and watch lines;
- `report`: one row per fault, the issue's musts judged on it, the table;
- `run`: the sequence (fabric, load, each fault with a steady period and a recovery);
- `capacity`: load at a multiple of a spec's rate, summarised (goodput, TTFT, refusals),
  and the ramp that finds capacity (overload and soak).
"""
