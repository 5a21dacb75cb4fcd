"""The `tierflow` command: run the fabric, run one service, inspect, calibrate.

    tierflow up                     the whole fabric on this machine (NATS + 5 services + nodes)
    tierflow status                 services, nodes and models of a running fabric
    tierflow emulator calibrate     emulated vs published speeds
    tierflow loadtest run SPEC      drive the live fabric with a workload; JSON report + PNG plots
    tierflow sim SPEC               the same workload on a simulated fleet, in virtual time
    tierflow usage                  what each tenant used (the usage ledger), by tenant, model, period
    tierflow <service> [--flags]    one service process (router, model-registry, ...)
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tierflow.cli.audit import audit
from tierflow.cli.emulator import app as emulator_app
from tierflow.cli.keys import app as keys_app
from tierflow.cli.loadtest import app as loadtest_app
from tierflow.cli.nats_auth_cli import app as nats_auth_app
from tierflow.cli.nodes import app as nodes_app
from tierflow.cli.registry_cli import add_registry_commands
from tierflow.cli.services import add_service_commands
from tierflow.cli.sim import sim
from tierflow.cli.status import status
from tierflow.cli.tls_cli import app as tls_app
from tierflow.cli.top import top
from tierflow.cli.up import up
from tierflow.cli.usage import usage

__all__ = ["app", "main"]

app = typer.Typer(
    help="tierflow: an open multi-model inference fabric. Start with `tierflow up`.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,  # plain tracebacks: they end up in service log files
)


@app.callback()
def _client_tls(
    tls_ca: Annotated[str, typer.Option("--tls-ca", help="CA the fabric's servers are signed by, for this command's own connections "
                                        "(default: DATA/tls of a `tierflow up --tls`, DATA = TIERFLOW_DATA_DIR or .tierflow).")] = "",
    tls_cert: Annotated[str, typer.Option("--tls-cert", help="Client certificate to show NATS (with --tls-key).")] = "",
    tls_key: Annotated[str, typer.Option("--tls-key", help="Private key of --tls-cert.")] = "",
    nats_creds: Annotated[str, typer.Option("--nats-creds", help="NATS credentials for this command's connections "
                                            "(default: DATA/auth/admin.creds of a `tierflow up`).")] = "",
) -> None:
    """Options before the command (`tierflow --tls-ca ca.pem status`) are handed to the
    commands as TIERFLOW_TLS_* (what `tierflow.cli.client_tls` reads); services and `up`
    take their own."""
    for name, value in (("TIERFLOW_TLS_CA", tls_ca), ("TIERFLOW_TLS_CERT", tls_cert), ("TIERFLOW_TLS_KEY", tls_key)):
        if value:
            os.environ[name] = value
    if nats_creds:
        os.environ["TIERFLOW_NATS_CREDS"] = nats_creds  # what tierflow.cli.nats_connect reads


app.command("up", help="Run the whole fabric locally: NATS, the five services and emulated nodes.")(up)
app.command("status", help="Show services, nodes and models of a running fabric.")(status)
app.command("top", help="Live view of nodes, models, tiers, queues and rates.")(top)
app.add_typer(nodes_app, name="nodes")
app.command("audit", help="Who changed what: registry admin calls, node cordons and drains, nodes started and stopped.")(audit)
app.command("usage", help="What each tenant used: requests and tokens from the usage ledger, by tenant, model and period.")(usage)
app.add_typer(keys_app, name="keys")
app.add_typer(tls_app, name="tls")
app.add_typer(nats_auth_app, name="nats-auth")
app.add_typer(loadtest_app, name="loadtest", help="Drive the live fabric with a workload spec; compare reports.")
app.command("sim", help="Simulate a workload on a fleet in virtual time (no NATS, no sleeping).")(sim)
app.add_typer(emulator_app, name="emulator", help="The RDU emulator: calibration against published figures.")


add_service_commands(app)
add_registry_commands(app)


def main() -> None:
    app(prog_name="tierflow")


if __name__ == "__main__":
    main()
