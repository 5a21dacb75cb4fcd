"""The front-door benchmark's parts (loadtest/frontdoor.py): zero backend, wrk, /proc CPU, report."""
